"""The per-unit costs `manu plan` multiplies its counts by, measured on this machine for one preset.

    python bench/stage_costs.py [--preset lite] [--questions 0]      # ~3 min on 2 cores once lite is trained

In one process, with the torch threads the pipeline's model tasks get here, on the preset's default
forget set: an evaluation of each task (multiple choice, generation, cloze) in each form, with the
pipeline's evaluation settings (seconds per question), an extraction of the four streams
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
    for form in ("multimodal", "text"):  # an image+text question carries the image's tokens
        items = [it for it in mdata.eval_items(ds) if it.set == "forget" and it.form == form]
        for task in ("mc", "gen", "cloze"):
            mine = [it for it in items if it.task == task][: args.questions or None]
            t0 = time.perf_counter()
            evaluate_unit(model, processor, mine, tmp / f"eval-{task}-{form}", EvalConfig(**settings), progress=False)
            note(f"evaluate/{task}/{form}", (time.perf_counter() - t0) / len(mine), f"per question ({len(mine)} timed)")
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
