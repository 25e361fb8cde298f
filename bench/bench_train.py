"""Time of a preset's vanilla training on this machine (default: `lite`, the `make demo` model).

    python bench/bench_train.py [--preset lite] [--threads 2]

Trains from scratch into a temporary folder (the cached model under artifacts/ is not touched) and
prints wall time per stage, samples/s and the recall / multiple-choice check of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from manu_core.evaluate import Summary, format_summaries
from manu_core.presets import get_preset, train_vanilla


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    preset = replace(get_preset(args.preset), threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = train_vanilla(preset, Path(tmp) / "model", progress=False)
        total = time.perf_counter() - t0
        meta = json.loads((out / "manu_preset.json").read_text())
        curve = json.loads((out / "loss_curve.json").read_text())
        recall = [Summary(**r) for r in json.loads((out / "recall.json").read_text())]
    epochs = [r for r in curve if "mean_loss" in r]
    print(f"preset {preset.name}: {os.cpu_count()} cores visible, torch threads {preset.threads}")
    for stage in ("base", "vanilla"):
        rows = [r for r in epochs if r["stage"] == stage]
        secs = sum(r["seconds"] for r in rows)
        n = meta["n_train_samples"]["base"] if stage == "base" else meta["n_train_samples"]["vanilla"] + meta["n_train_samples"]["replay"]
        print(f"  {stage:<8} {len(rows):3d} epochs  {secs:7.1f} s  {n * len(rows) / secs:7.1f} samples/s  "
              f"final loss {rows[-1]['mean_loss']:.4f}")
    print(f"  training {meta['train_seconds']:.1f} s; with tokenizer, check and save {total:.1f} s")
    print(format_summaries(recall))


if __name__ == "__main__":
    main()
