"""The per-unit costs `manu plan` multiplies its counts by, measured on this machine for one preset.

    python bench/stage_costs.py [--preset lite] [--questions 0]      # ~3 min on 2 cores once lite is trained

In one process, with the torch threads the pipeline's model tasks get here, on the preset's default
forget set: an evaluation of each task (multiple choice, generation, cloze) in each form, with the
pipeline's evaluation settings (seconds per question), on the trained model and on a stand-in for an
unlearned one (10 % of its language MLP units zeroed: it answers at length, as unlearned models do),
the cost of running a task at all (a cached Prefect task that does nothing, per run), an extraction of the four streams
(seconds per sample), a gradient-ascent baseline as a sweep trains it (seconds per run), a logit lens
(per run), an attribution pass (per run), a pruned model saved and loaded back (per unlearned model),
and the preset's training time from its manu_preset.json (measured when it was trained, on this
machine class). Writes bench/stage_costs.json[<machine class>][<preset>] (other entries kept) and
prints every figure as it is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


PROBE_RUNS = 40


def task_overhead(n: int = PROBE_RUNS, settle_s: float = 5.0) -> float:
    """What running one task costs a sweep beyond its work, in wall seconds on this machine: the CPU
    time that runs of a task that does nothing take, in this process and its children (the temporary
    Prefect server a sweep without PREFECT_API_URL starts, as `docs/make_example.py` runs it, records
    their states after the client has moved on), divided by the torch threads the model stages keep
    busy, whose work that CPU time displaces. The task is decorated as the pipeline's are (`manu_task`:
    cache key, persisted JSON result, key lock); the runs go one after another in a flow, then the
    server gets `settle_s` to catch up."""
    import psutil
    import torch
    from prefect import flow

    from tasks.stages import manu_task

    me = psutil.Process()

    def cpu() -> float:
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    @manu_task(name="stage-costs-probe")
    def probe(i: int, salt: str) -> str:
        return f"{salt}/{i}"

    @flow(name="stage-costs-probe")
    def probe_flow(salt: str) -> float:
        probe(-1, salt)  # the first run pays for the flow's setup
        time.sleep(settle_s)
        idle0 = cpu()
        time.sleep(settle_s)
        idle = cpu() - idle0  # what the server spends doing nothing, per settle_s
        c0 = cpu()
        for i in range(n):
            probe(i, salt)
        time.sleep(settle_s)
        return (cpu() - c0 - idle) / n / torch.get_num_threads()

    return probe_flow(f"{time.time_ns()}")  # a new salt: every run misses the cache, as a cold sweep's do


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--questions", type=int, default=0, help="questions per evaluation task timed (0: the whole "
                    "forget set's, as a unit of the sweep has: 40 questions in part-filled batches cost twice as "
                    "much per question)")
    args = ap.parse_args()

    import torch

    from flows.pipeline import EMBEDDED_BASELINE, EvalSettings
    from flows.plan import COSTS, machine_class
    from manu_core import data as mdata
    from manu_core.attribution import attribution_frame
    from manu_core.baselines import BaselineConfig, unlearn_gradient
    from manu_core.evaluate import EvalConfig, evaluate_unit
    from manu_core.extract import build_streams, extract_activations
    from manu_core.lens import lens_table
    from manu_core.models import load_model, save_model
    from manu_core.presets import get_preset, preset_dataset, resolve_model
    from bench.bench_eval import damaged
    from tasks.cache import models_dir

    preset = get_preset(args.preset)
    model_dir = resolve_model(args.preset, models=models_dir())
    model, processor = load_model(model_dir)
    ds = preset_dataset(preset)
    tmp = Path(tempfile.mkdtemp(prefix="manu-costs-"))
    seconds: dict[str, float] = {}

    def note(key: str, value: float, what: str) -> None:
        seconds[key] = value
        print(f"{key:<22} {value:9.4f} s  {what}", flush=True)

    settings = EvalSettings().config_for(str(model_dir))
    # A trained model stops after its short answer; an unlearned one often writes to the budget, and
    # generation costs per token. The stand-in for an unlearned model: a copy with 10 % of its language
    # MLP units zeroed at random (seeded; the sweep's smallest alpha), as bench/bench_eval.py damages one.
    standin = damaged(load_model(model_dir)[0], 0.1)
    forget_items = [it for it in mdata.eval_items(ds) if it.set == "forget"]
    for name, m, suffix in (("trained", model, ""), ("unlearned stand-in", standin, "/unlearned")):
        for form in ("multimodal", "text"):  # an image+text question carries the image's tokens
            for task in ("mc", "gen", "cloze"):
                mine = [it for it in forget_items if it.form == form and it.task == task][: args.questions or None]
                t0 = time.perf_counter()
                evaluate_unit(m, processor, mine, tmp / f"eval-{task}-{form}{suffix.replace('/', '-')}",
                              EvalConfig(**settings), progress=False)
                note(f"evaluate/{task}/{form}{suffix}", (time.perf_counter() - t0) / len(mine),
                     f"per question ({len(mine)} timed, {name})")
    note("task/run", task_overhead(), "per task run (the CPU time of a Prefect task that does nothing, "
                                      f"client and server, over the torch threads; {PROBE_RUNS} runs)")
    streams = build_streams(ds)
    n = sum(len(v) for v in streams.values())
    t0 = time.perf_counter()
    extract_activations(model, processor, streams, tmp / "acts", batch_size=32, progress=False)
    note("extract/sample", (time.perf_counter() - t0) / n, f"per sample ({n} samples, 4 streams)")
    t0 = time.perf_counter()
    lens_table(model, processor, streams, max_samples=32, progress=False)
    note("lens/run", time.perf_counter() - t0, "per logit lens (32 samples per stream)")
    forget = [s for pid in ds.split.forget_ids for s in mdata.samples(ds.profile(pid))]
    retain = [s for pid in ds.split.retain_ids for s in mdata.samples(ds.profile(pid))]
    t0 = time.perf_counter()
    attribution_frame(model, processor, forget, retain, batch_size=8, progress=False)
    note("attribution/run", time.perf_counter() - t0, "per attribution pass (forget and retain, both forms)")
    t0 = time.perf_counter()
    save_model(model, processor, tmp / "pruned")
    load_model(tmp / "pruned")
    note("prune/run", time.perf_counter() - t0, "per unlearned model (saved and loaded back)")
    copy = load_model(model_dir)[0]
    cfg = BaselineConfig("ga", **{**EMBEDDED_BASELINE, "lr": preset.finetune.lr}, forms=("multimodal",))
    t0 = time.perf_counter()
    unlearn_gradient(copy, processor, forget, retain, cfg, progress=False)
    note("baseline/run", time.perf_counter() - t0, "per baseline training (gradient ascent, the sweep's epochs)")
    meta = json.loads((Path(model_dir) / "manu_preset.json").read_text())
    note("preset/train", float(meta["train_seconds"]), "per preset training (manu_preset.json's train_seconds)")

    machine = machine_class("cpu")
    costs = json.loads(COSTS.read_text()) if COSTS.is_file() else {}
    costs.setdefault(machine, {})[args.preset] = {
        "measured": f"{datetime.date.today()}, bench/stage_costs.py, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} thread(s)",
        "seconds": seconds}
    from manu_core.io import atomic_write_json

    atomic_write_json(COSTS, costs)
    print(f"-> {COSTS} [{machine}][{args.preset}]")


if __name__ == "__main__":
    main()
