"""`manu plan` (flows/plan.py): the work a sweep will do, counted before it starts, and its estimate
from measured per-unit costs ("unknown" without them)."""

import pytest

from flows.plan import deployment_parameters, estimate, plan, plan_markdown
from flows.pipeline import RunConfig, SweepConfig

COSTS = {"seconds": {"evaluate/mc/multimodal": 0.1, "evaluate/gen/multimodal": 0.5, "evaluate/cloze/multimodal": 0.2,
                     "evaluate/mc/text": 0.05, "evaluate/gen/text": 0.3, "evaluate/cloze/text": 0.1, "extract/sample": 0.01,
                     "baseline/run": 30.0, "preset/train": 600.0, "lens/run": 2.0, "prune/run": 1.0,
                     "attribution/run": 10.0, "relearn/run": 20.0}, "measured": "a test's costs"}


def small() -> tuple[RunConfig, SweepConfig]:
    cfg = RunConfig(model="tiny", eval={"sets": ["forget", "retain"], "max_profiles": {"retain": 3}})
    sweep = SweepConfig(forget_splits=["validation", ["093", "279", "303"]], scorings=["paper"], alphas=[0.05, 0.2],
                        random_seeds=[0, 1], ablations=False, methods=["manu", "random", "ga"], baseline_scales=[0.1, 1.0])
    return cfg, sweep


def test_a_two_phase_sweep_is_counted_phase_by_phase():
    cfg, sweep = small()
    p = plan(cfg, sweep)
    # phase one: vanilla + 2 manu + 4 random + 2 ga on validation, forget and retain x 2 forms, multiple choice only;
    # phase two: vanilla + 1 manu + 2 random (its control) + 1 ga on the reported split, every task
    assert p.runs["unlearned models"] == 8 + 4 and p.runs["evaluate"] == 9 * 4 + 5 * 4
    assert p.runs["baseline training"] == 3 and p.runs["extract"] == 2 and p.runs["logit lens"] == 3  # phase two: vanilla, manu, ga (no lens for random)
    assert set(p.work["evaluate"]) == {f"{t} questions ({f}{u})" for t in ("mc", "gen", "cloze")
                                       for f in ("multimodal", "text") for u in ("", ", unlearned")}
    # the vanilla model's questions apart from the unlearned models': phase two, 1 vanilla and 4 variants alike
    assert p.work["evaluate"]["gen questions (text, unlearned)"] == 4 * p.work["evaluate"]["gen questions (text)"]
    one = plan(cfg, sweep.model_copy(update={"two_phase": False}))
    assert one.runs["evaluate"] == 2 * 9 * 4 and one.runs["evaluate"] > p.runs["evaluate"]


def test_the_estimate_is_the_work_times_the_measured_costs_or_unknown():
    cfg, sweep = small()
    p = plan(cfg, sweep, costs={})
    assert p.total is None and "unknown" in plan_markdown(p) and "run bench/stage_costs.py" in plan_markdown(p)
    estimate(p, cfg, {p.machine: {"tiny": COSTS}})
    c, w = COSTS["seconds"], p.work["evaluate"]
    # no cost measured on an unlearned stand-in: its questions cost what the trained model's do
    assert p.seconds["evaluate"] == pytest.approx(sum(n * c[f"evaluate/{k.split()[0]}/{k.split('(')[1].split(',')[0].rstrip(')')}"]
                                                      for k, n in w.items()))
    assert p.seconds["baseline training"] == 3 * 30.0 and p.total == pytest.approx(sum(p.seconds.values()))
    assert "Estimated wall time: **" in plan_markdown(p) and "a test's costs" in plan_markdown(p)
    assert "orchestration" not in p.seconds  # no per-run cost measured
    # measured: an unlearned model's questions at their own cost, and every task run at the cost of running one
    unlearned = {k + "/unlearned": 3 * v for k, v in c.items() if k.startswith("evaluate/")}
    estimate(p, cfg, {p.machine: {"tiny": {**COSTS, "seconds": {**c, **unlearned, "task/run": 0.5}}}})
    assert p.seconds["evaluate"] == pytest.approx(sum(n * c[f"evaluate/{k.split()[0]}/{k.split('(')[1].split(',')[0].rstrip(')')}"]
                                                      * (3 if "unlearned" in k else 1) for k, n in w.items()))
    runs = sum(p.runs.values()) + p.runs["unlearned models"]
    assert p.seconds["orchestration"] == pytest.approx(0.5 * runs) and p.total == pytest.approx(sum(p.seconds.values()))
    estimate(p, cfg, {p.machine: {"tiny": COSTS}})  # estimated again: no orchestration row left from before
    assert "orchestration" not in p.seconds and "orchestration" not in p.work


def test_a_deployment_is_planned_with_its_parameters():
    cfg, sweep = deployment_parameters("full-sweep")
    assert cfg.model == "lite" and sweep is not None and "validation" in sweep.forget_splits
    with pytest.raises(ValueError, match="no deployment 'full-swep' in prefect.yaml. Did you mean 'full-sweep'?"):
        deployment_parameters("full-swep")


def test_embedded_models_are_counted_until_they_are_trained(tmp_path, monkeypatch):
    from manu_core.presets import PRESETS, as_trained_here, reference_preset

    monkeypatch.setenv("MANU_ARTIFACTS", str(tmp_path))  # an empty models folder: nothing trained yet
    cfg = RunConfig(model="tiny", never_learned="train", eval={"sets": ["forget"]})
    forget = ["093", "279", "303"]
    sweep = SweepConfig(forget_splits=["validation", forget], scorings=["paper"], alphas=[0.1], random_seeds=[0],
                        ablations=False, methods=["manu"])
    cold = plan(cfg, sweep)
    # the vanilla, and the reported split's reference (phase one, on validation, judges against none)
    assert cold.runs["preset training"] == 2 and not cold.trained
    assert cold.work["preset training"] == {"vanilla": 1, "never-learned reference": 1}
    assert "| 1 never-learned reference, 1 vanilla |" in plan_markdown(cold)
    two = plan(cfg, sweep.model_copy(update={"forget_splits": ["validation", forget, ["097", "104", "133"]]}))
    assert "| 2 never-learned references, 1 vanilla |" in plan_markdown(two)  # a count reads as a plural
    for p in (as_trained_here(PRESETS["tiny"]), reference_preset(as_trained_here(PRESETS["tiny"]), forget)):
        (tmp_path / "models" / f"{p.name}-{p.key()}").mkdir(parents=True)
        (tmp_path / "models" / f"{p.name}-{p.key()}" / "manu_preset.json").write_text("{}")
    warm = plan(cfg, sweep)
    assert warm.runs["preset training"] == 0 and "preset training" not in warm.work
    assert warm.trained == ["the vanilla tiny", "the never-learned reference of 3 ids"]  # vocab.forget_name
    assert "already trained, so not counted: the vanilla tiny, the never-learned reference of 3 ids" in \
        plan_markdown(warm)
