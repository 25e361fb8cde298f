"""The gradient baselines' strength axis extended downward, measured as a two-phase sweep's first phase
measures it (docs/embedded.md, "The baseline axis extended downward"; declared before its results).

    python bench/baseline_axis.py                      # lite, validation, scales 0.001 / 0.003 / 0.01 / 0.03
    python bench/baseline_axis.py --scales 0.1 0.3 1   # other points of the axis

GA, gradient difference, KL minimisation and NPO at lr x each scale of the preset's fine-tune lr (full
fine-tune, 1 epoch, batch 4, image+text, as in full-sweep), each evaluated on the validation split by
likelihood multiple choice on forget, retain and celebrity (15 / 15 / 10 seeded profiles, both forms):
the `manu` flow in this process with the phase-one settings (flows/pipeline.py, `_phase_one`). NPO's
reference is the validation split's never-learned reference (trained on first use, ~7 min on 2 cores).
Prints each point's drops and, per method, the setting the rule picks (the strongest whose retain drop
is at most the budget in both forms) among the points measured here."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

METHODS = ["ga", "grad_diff", "kl", "npo"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lite")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03])
    ap.add_argument("--budget", type=float, default=5.0, help="retain multiple-choice drop budget (points)")
    args = ap.parse_args()

    from flows.pipeline import RunConfig, SweepConfig, _phase_one, manu

    config = _phase_one(RunConfig(model=args.model, lens_samples=1, never_learned="none",  # lens: 1 sample (0 = all)
                                  eval={"sets": ["forget", "retain", "celebrity"],
                                        "max_profiles": {"forget": 15, "retain": 15, "celebrity": 10}}))
    sweep = SweepConfig(forget_splits=["validation"], methods=METHODS, baseline_scales=args.scales,
                        retain_budget=args.budget, two_phase=False)
    t0 = time.time()
    state = manu(config, sweep, return_state=True)
    assert state.is_completed(), state
    out = Path(state.result())
    print(f"{args.model}, validation, phase-one evaluation; {time.time() - t0:.0f} s; sweep folder {out}")
    import polars as pl

    df = pl.read_parquet(out / "sweep.parquet").filter((pl.col("task") == "mc") & (pl.col("metric") == "accuracy"))
    vanilla = {(r["set"], r["form"]): 100 * r["value"] for r in df.filter(pl.col("family") == "vanilla").iter_rows(named=True)}
    rows = []
    for (family, lr), part in df.filter(pl.col("family").is_in(METHODS)).group_by(["family", "lr"]):
        drops = {(r["set"], r["form"]): vanilla[r["set"], r["form"]] - 100 * r["value"] for r in part.iter_rows(named=True)}
        rows.append((family, lr, drops))
    lrs = sorted({lr for _, lr, _ in rows})
    print(f"{'method':<10} {'lr':>9} | forget (mm / text) | retain (mm / text) | celebrity (mm / text)")
    chosen = {}
    for m in METHODS:
        for lr in lrs:
            got = [d for mm, l, d in rows if mm == m and l == lr]
            if not got:
                continue
            d = got[0]
            cell = lambda s: f"{d[s, 'multimodal']:6.1f} / {d[s, 'text']:5.1f}"  # noqa: E731
            within = all(d["retain", f] <= args.budget for f in ("multimodal", "text"))
            print(f"{m:<10} {lr:9.2g} | {cell('forget'):>18} | {cell('retain'):>18} | {cell('celebrity'):>21}"
                  + ("   within budget" if within else ""))
            if within:
                chosen[m] = lr  # lrs ascend: the last within budget is the strongest
    for m in METHODS:
        print(f"{m}: " + (f"strongest within the {args.budget:g}-point retain budget: lr {chosen[m]:g}"
                          if m in chosen else "no point within the budget"))


if __name__ == "__main__":
    main()
