"""`manu plan`: what a run or a sweep will do, and about how long it will take, before it starts.

    manu plan --deployment full-sweep          # a deployment of prefect.yaml, with its parameters
    manu plan --model lite --alpha 0.1         # one run, as `manu run` would do it

The plan counts, per stage, the task runs and the work in them: models unlearned, extractions and
their samples, evaluation units and their questions per task (after the caps), trainings (the
baselines, the never-learned references, which are also NPO's, and an embedded preset's vanilla model
where the models folder does not hold them trained yet: those it holds are listed, not counted) and
logit lenses. A two-phase sweep counts
phase one exactly and phase two at one setting per curve, the rule's choice (a random control beside
its MANU variant; both at most twice when the rule picks different strengths). The estimate multiplies
that work by per-unit costs measured on this machine class (`bench/stage_costs.json`, written by
`bench/stage_costs.py` with the preset it measured), adding the model stages as if they ran one after
another on one device slot, as they do on a CPU: "unknown" where no cost was measured (a GPU before
`bench/gpu_check.sh` has measured one, a checkpoint of another size). Nothing here loads a model.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from flows.pipeline import (METHODS, RunConfig, SweepConfig, _kept, _phase_one, curve_of, reporting)
from manu_core.data import VALIDATION
from manu_core.presets import resolve_model, resolve_reference
from manu_core.vocab import forget_name

COSTS = Path(__file__).resolve().parents[1] / "bench" / "stage_costs.json"


@dataclass
class Plan:
    """Work per stage (stage -> Counter of units) and the estimate in seconds (None: unknown)."""

    work: dict[str, Counter] = field(default_factory=dict)
    runs: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, Optional[float]] = field(default_factory=dict)
    machine: str = ""
    costs_from: str = ""
    trained: list[str] = field(default_factory=list)  # embedded models already trained: on disk, not counted

    def add(self, stage: str, runs: int = 1, **units: float) -> None:
        self.runs[stage] += runs
        self.work.setdefault(stage, Counter()).update({k: v for k, v in units.items() if v})

    @property
    def total(self) -> Optional[float]:
        vals = list(self.seconds.values())
        return None if not vals or any(v is None for v in vals) else sum(vals)


def machine_class(device: str) -> str:
    """'cpu-2' (a CPU with 2 cores), 'cuda:<device name>' or the device as given."""
    if device == "cpu":
        return f"cpu-{os.cpu_count()}"
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                return f"cuda:{torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - a plan never fails for want of a GPU
            pass
    return device


def _items(config: RunConfig, forget) -> dict[tuple[str, str, str], int]:
    """Questions per (set, form, task) of a split, after the run's caps (what `evaluate` asks)."""
    from manu_core import data as mdata
    from manu_core.evaluate import cap_profiles
    from tasks.stages import benchmark_of, dataset_of

    spec = config.data_spec(forget)
    items = benchmark_of(spec).items if spec.get("benchmark") else mdata.eval_items(dataset_of(spec))
    out: Counter = Counter()
    for s in config.eval.sets:
        mine = cap_profiles([it for it in items if it.set == s], config.eval.max_profiles.get(s, 0), config.eval.seed)
        out.update((it.set, it.form, it.task) for it in mine if it.form in config.eval.forms
                   and (config.eval.tasks is None or it.task in config.eval.tasks))
    return out


def _stream_samples(spec: dict) -> int:
    """Samples of the four activation streams `prepare_data` builds for a split (retain matched)."""
    from manu_core.extract import build_streams, match_retain
    from tasks.stages import benchmark_of, dataset_of

    retain, seed = spec.get("retain_size", "match"), spec.get("seed", 0)
    streams = (match_retain(benchmark_of(spec).streams(), retain, seed) if spec.get("benchmark")
               else build_streams(dataset_of(spec), retain_size=retain, seed=seed))
    return sum(len(v) for v in streams.values())


def _trained(resolve) -> bool:
    """Whether `resolve(models)` finds an embedded model already trained in the pipeline's models folder."""
    from manu_core.models import ModelError
    from tasks.cache import models_dir

    try:
        resolve(models_dir())
    except ModelError:
        return False
    return True


def _evaluations(plan: Plan, items: dict, models: int, stage: str = "evaluate", *, unlearned: int = 0) -> None:
    """`models` trained models and `unlearned` unlearned ones, each answering `items`. Counted apart:
    an unlearned model often answers at length where a trained one stops, and generation costs per token."""
    per_task = Counter()
    for (_, form, task), n in items.items():  # image+text questions cost more than text-only ones
        per_task[f"{task} questions ({form})"] += n * models
        per_task[f"{task} questions ({form}, unlearned)"] += n * unlearned
    units = len({(s, f) for s, f, _ in items}) * (models + unlearned)
    plan.add(stage, units, **per_task)


def _split(plan: Plan, config: RunConfig, sweep: Optional[SweepConfig], forget, methods: list[str],
           phase: Optional[int], chosen: bool) -> None:
    variants = [(m, v) for m in methods for v in METHODS[m].variants(config, sweep)]
    if chosen:  # phase two: one setting per curve (the rule's pick), random controls beside their MANU variant
        per_curve: dict[str, tuple[str, dict]] = {}
        for m, v in variants:
            if not reporting.dropped_weights(v):
                per_curve.setdefault(curve_of(m, v)[0], (m, v))
        keep = {curve_of(m, v) for m, v in per_curve.values()}
        variants = [(m, v) for m, v in variants if _kept(m, v, keep)]
    items = _items(config, forget)
    spec = config.data_spec(forget)
    n_samples = _stream_samples(spec)
    _evaluations(plan, items, 1, unlearned=len(variants))  # the vanilla model and each variant
    if any(METHODS[m].needs_activations for m, _ in variants):
        plan.add("extract", 1, samples=n_samples)
    plan.add("unlearned models", len(variants))
    for m, v in variants:
        if m in ("ga", "grad_diff", "kl", "npo"):
            plan.add("baseline training", 1)
    if any(m == "attribution" for m, _ in variants):
        plan.add("attribution", 1)
    preset = config.preset()
    # NPO's π_ref is the split's never-learned reference: one training serves both (free on a planted
    # preset, whose reference is its planted units zeroed)
    npo_ref = "npo" in {m for m, _ in variants} and not config.reference and preset is not None
    judged = preset is not None and (config.never_learned == "train" or (config.never_learned == "auto" and preset.plant))
    if (npo_ref or judged) and not preset.plant:
        if _trained(lambda models: resolve_reference(preset.name, forget, models=models, progress=False, train=False)):
            plan.trained.append(f"the never-learned reference of {forget_name(forget)}")
        else:
            plan.add("preset training", 1, **{"never-learned reference": 1})
    if judged:
        _evaluations(plan, {k: n for k, n in items.items() if k[0] == "forget"}, 1)
    if phase != 1:
        plan.add("logit lens", 1 + sum(bool(METHODS[m].lens) for m, _ in variants))
    if config.relearn.enabled:
        attacks = sum(len(config.relearn.attacks) * len(config.relearn.masks) for m, _ in variants if m != "prompting")
        plan.add("relearning", attacks)


def plan(config: RunConfig, sweep: Optional[SweepConfig] = None, method: str = "manu",
         costs: Optional[dict] = None) -> Plan:
    """The work `manu(config, sweep, method)` will do, and its estimate on this machine class."""
    out = Plan(machine=machine_class(config.device))
    preset = config.preset()
    if preset is not None:
        if _trained(lambda models: resolve_model(preset.name, models=models, progress=False, train=False)):
            out.trained.append(f"the vanilla {preset.name}")
        else:
            out.add("preset training", 1, vanilla=1)
    splits = [config.data_spec()["forget"]] if sweep is None else sweep.forget_splits
    methods = [method] if sweep is None else sweep.methods
    if sweep is not None and sweep.two_phase and VALIDATION in splits and len(splits) > 1:
        _split(out, _phase_one(config), sweep, VALIDATION, methods, 1, chosen=False)
        for f in splits:
            if f != VALIDATION:
                _split(out, config, sweep, f, methods, 2, chosen=True)
        out.notes.append("two phases: every variant on validation (multiple choice only), then one setting per "
                         "curve on the other splits (the rule's choice; a random control at most twice)")
    else:
        for f in splits:
            _split(out, config, sweep, f, methods, None, chosen=False)
    estimate(out, config, costs)
    return out


ORCHESTRATION = "orchestration"  # the plan's row for the cost of running the tasks themselves

# The cost key of each stage measured per task run (bench/stage_costs.py).
PER_RUN = {"baseline training": "baseline/run", "preset training": "preset/train", "logit lens": "lens/run",
           "unlearned models": "prune/run", "attribution": "attribution/run", "relearning": "relearn/run"}


def load_costs() -> dict:
    return json.loads(COSTS.read_text()) if COSTS.is_file() else {}


def estimate(plan: Plan, config: RunConfig, costs: Optional[dict] = None) -> None:
    """Fill `plan.seconds` per stage from the measured costs of this machine class and preset."""
    costs = load_costs() if costs is None else costs
    preset = config.preset()
    entry = costs.get(plan.machine, {}).get(preset.name if preset else "") if preset else None
    plan.costs_from = entry.get("measured", "") if entry else ""
    c = (entry or {}).get("seconds", {})
    plan.work.pop(ORCHESTRATION, None)  # estimated again: its row is recounted below
    plan.seconds.pop(ORCHESTRATION, None)
    for stage, work in plan.work.items():
        if not c:
            plan.seconds[stage] = None
        elif stage == "evaluate":
            plan.seconds[stage] = sum(n * _question_cost(c, k) for k, n in work.items())
        elif stage == "extract":
            plan.seconds[stage] = work["samples"] * c["extract/sample"]
        else:  # a cost per task run; one not measured (relearning) leaves the stage, and the total, unknown
            cost = c.get(PER_RUN[stage])
            plan.seconds[stage] = None if cost is None else plan.runs[stage] * cost
    if c.get("task/run") is not None and plan.work:  # what running a task costs beyond its work
        # the counted task runs, and a selection or training step beside each unlearned model's results
        runs = sum(plan.runs.values()) + plan.runs["unlearned models"]
        plan.work[ORCHESTRATION] = Counter({"task runs (Prefect states, cache keys, result files)": runs})
        plan.seconds[ORCHESTRATION] = runs * c["task/run"]


def _plural(n: float, unit: str) -> str:
    """"s" where a count of `unit` reads as a plural ("4 never-learned references"); units already
    plural or qualified ("samples", "gen questions (text)") stay as they are."""
    return "s" if n != 1 and not unit.endswith(("s", ")")) else ""


def _question_cost(c: dict, work: str) -> float:
    """Seconds per question of an evaluation work key, "gen questions (multimodal, unlearned)": the cost
    measured on an unlearned stand-in where there is one (else the trained model's)."""
    task, inside = work.split()[0], work.split("(")[1].rstrip(")")
    form, _, unlearned = inside.partition(", ")
    trained = c[f"evaluate/{task}/{form}"]
    return c.get(f"evaluate/{task}/{form}/unlearned", trained) if unlearned else trained


def _fmt(s: Optional[float]) -> str:
    if s is None:
        return "unknown"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def plan_markdown(plan: Plan, title: str = "") -> str:
    """The plan as a table: stage, task runs, work, estimate; the total and where the costs come from."""
    lines = [f"# Plan{': ' + title if title else ''}", "",
             "| stage | task runs | work | estimate |", "|---|---|---|---|"]
    for stage, work in plan.work.items():
        desc = ", ".join(f"{n:,} {k}{_plural(n, k)}" for k, n in sorted(work.items())) or "-"
        runs = "-" if stage == ORCHESTRATION else f"{plan.runs[stage]:,}"  # its runs are the other rows'
        lines.append(f"| {stage} | {runs} | {desc} | {_fmt(plan.seconds.get(stage))} |")
    total = plan.total
    where = (f"costs measured on {plan.machine} ({plan.costs_from}; bench/stage_costs.py)" if plan.costs_from else
             f"no costs measured for {plan.machine} and this model: run bench/stage_costs.py (a CPU) or "
             "bench/gpu_check.sh (a GPU)")
    lines += ["", f"Estimated wall time: **{_fmt(total)}**"
              + (" (model stages one after another on one device slot)" if total is not None else "")
              + f"; {where}."]
    lines += [f"- {n}" for n in plan.notes]
    if plan.trained:
        lines.append(f"- already trained, so not counted: {', '.join(plan.trained)} (artifacts/models)")
    return "\n".join(lines) + "\n"


def deployment_parameters(name: str) -> tuple[RunConfig, Optional[SweepConfig]]:
    """A deployment of prefect.yaml as its run would start: its config and sweep parameters."""
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    if name not in names:
        from manu_core.vocab import did_you_mean

        raise ValueError(f"no deployment {name!r} in prefect.yaml.{did_you_mean(name, names)} Deployments: "
                         f"{', '.join(names)}.")
    params = next(d for d in spec["deployments"] if d["name"] == name).get("parameters") or {}
    sweep = params.get("sweep")
    return RunConfig(**(params.get("config") or {})), SweepConfig(**sweep) if sweep is not None else None
