"""Benchmark: each method's unlearning step, wall time and peak memory, on one model and split.

    python bench/bench_baselines.py                 # lite preset, forget_5, every method
    python bench/bench_baselines.py --model tiny

Each method runs in its own process (so peak RSS is its own), after the model is loaded:
  manu       extraction (4 streams) + importance (Polars) + pruning
  ga, grad_diff, kl, npo   the gradient loop (manu_core/baselines.py) with the preset's baseline
             settings (full training, lr = the preset's fine-tune lr, 1 epoch, batch 4, image+text)
  prompting  nothing to compute (a system prompt at evaluation time)
Printed: seconds of the step, peak RSS of the process and its growth over the loaded model. NPO's
reference model (trained on the retain set only) is trained once before the timings, as the
pipeline caches it per split; its training time is printed apart.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ("manu", "ga", "grad_diff", "kl", "npo")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak() -> bool:
    """Linux: reset this process's peak RSS (VmHWM) so the step's own peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def step_peak_mib() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def one(args) -> None:
    import torch

    from manu_core import data as mdata
    from manu_core.models import load_model
    from manu_core.presets import get_preset, preset_dataset, resolve_model
    from tasks.cache import models_dir

    torch.set_num_threads(2)
    preset = get_preset(args.model)
    ds = preset_dataset(preset)
    model, processor = load_model(resolve_model(args.model, models=models_dir()))
    import gc

    gc.collect()
    loaded = float(next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines()
                        if l.startswith("VmRSS:"))) / 1024
    can_reset = reset_peak()
    t0 = time.perf_counter()
    if args.one == "manu":
        from manu_core.importance import ImportanceParams
        from manu_core.unlearn import manu_unlearn

        with tempfile.TemporaryDirectory() as work:
            manu_unlearn(model, processor, ds, work, ImportanceParams(alpha=preset.alpha), progress=False)
    else:
        from manu_core.baselines import LOSSES, BaselineConfig, unlearn_gradient

        forget = [s for pid in ds.split.forget_ids for s in mdata.samples(ds.profile(pid))]
        retain = [s for pid in ds.split.retain_ids for s in mdata.samples(ds.profile(pid))]
        frozen = {"vanilla": resolve_model(args.model, models=models_dir()), "reference": args.reference}.get(LOSSES[args.one].frozen)
        frozen_model = load_model(frozen)[0] if frozen else None
        cfg = BaselineConfig(args.one, lora=False, lr=preset.finetune.lr, epochs=1, batch_size=4)
        unlearn_gradient(model, processor, forget, retain, cfg, frozen=frozen_model, progress=False)
    dt = time.perf_counter() - t0
    peak = step_peak_mib() if can_reset else rss_mib()
    print(json.dumps({"method": args.one, "seconds": round(dt, 2), "peak_rss_mib": round(peak, 1),
                      "growth_mib": round(peak - loaded, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lite")
    ap.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--reference", help="NPO's reference model folder (default: the never-learned reference, trained here if not cached, timed apart)")
    args = ap.parse_args()
    if args.one:
        return one(args)

    from manu_core.presets import resolve_model, resolve_reference
    from tasks.cache import models_dir

    vanilla = resolve_model(args.model, models=models_dir())
    ref_seconds = None
    ref_dir = Path(args.reference) if args.reference else None
    if not args.reference:  # the forget set's never-learned reference, as the flow's NPO takes it
        t0 = time.perf_counter()
        ref_dir = resolve_reference(args.model, models=models_dir(), progress=False)
        ref_seconds = time.perf_counter() - t0
    rows = []
    for m in METHODS:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", m, "--reference", str(ref_dir)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    manu = next(r for r in rows if r["method"] == "manu")
    print(f"model: {args.model} ({vanilla.name}), forget split of the preset, 2 threads, one process per method")
    print("peak RSS: the step's own peak (Linux VmHWM reset after loading); growth: over the loaded model's RSS")
    print(f"{'method':<10} {'seconds':>8} {'x MANU':>7} {'peak RSS MiB':>13} {'growth MiB':>11}")
    for r in rows:
        print(f"{r['method']:<10} {r['seconds']:8.2f} {r['seconds'] / manu['seconds']:7.2f} "
              f"{r['peak_rss_mib']:13.1f} {r['growth_mib']:11.1f}")
    print("prompting: no unlearning step (a system prompt at evaluation time)")
    if ref_seconds is not None:
        print(f"npo's reference model (the never-learned reference: retain only, once per split; 0 s when cached): "
              f"{ref_seconds:.1f} s")


if __name__ == "__main__":
    main()
