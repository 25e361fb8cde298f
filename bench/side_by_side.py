"""Vanilla, the five baselines and MANU side by side on one embedded preset and forget split.

    python bench/side_by_side.py                    # lite, its forget_5, MANU at α = 0.1, retain capped at 25 profiles
    python bench/side_by_side.py --model tiny --alpha 0.05 --retain-profiles 2

Runs the `manu` flow as a sweep over every method (cached tasks: a rerun only reads), then prints the
sweep table's path and its markdown (image+text, text, average per set, task and metric).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lite")
    ap.add_argument("--forget", default=None, help="a split name (default: the preset's own split)")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--retain-profiles", type=int, default=25)
    args = ap.parse_args()

    from flows.pipeline import ALL_METHODS, EvalSettings, RunConfig, SweepConfig, manu

    cfg = RunConfig(model=args.model, eval=EvalSettings(max_profiles={"retain": args.retain_profiles}))
    sweep = SweepConfig(forget_splits=[args.forget or cfg.data_spec()["forget"]], alphas=[args.alpha], ablations=False, methods=list(ALL_METHODS))
    t0 = time.perf_counter()
    out = Path(manu(cfg, sweep))
    print(f"sweep table: {out / 'sweep.parquet'} ({time.perf_counter() - t0:.0f} s)")
    print((out / "sweep.md").read_text())


if __name__ == "__main__":
    main()
