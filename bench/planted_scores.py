"""Why a scoring mode does or does not find the planted units: the terms of each mode's score for the
planted units beside every other language unit, on a planted preset (docs/embedded.md, "The positive
control").

    python bench/planted_scores.py [--preset lite-planted] [--alpha 0.05]

One extraction of the vanilla model on its forget/retain streams; then, per scoring mode, the median
over planted units and over the other language units of each term the mode's score is built from
(the importance table's forget_* and retain_* columns: paper's form contrasts I_abs, I_freq, I_var,
I_rms per split; released's and selective's token statistics), the median score, the median rank
within the language tower, and the planted recall at --alpha. Nothing is chosen here; it measures.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import polars as pl

from manu_core.extract import extract_activations
from manu_core.importance import ImportanceParams, importance_table, neuron_sums
from manu_core.models import load_model
from manu_core.plant import planted_recall, planted_units
from manu_core.presets import get_preset, preset_dataset, resolve_model
from tasks.cache import models_dir

MODES = ("paper", "released", "selective")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lite-planted")
    ap.add_argument("--alpha", type=float, default=0.05)
    args = ap.parse_args()
    preset = get_preset(args.preset)
    model_dir = resolve_model(preset.name, models=models_dir(), progress=False)
    planted = planted_units(model_dir)
    if not planted:
        raise SystemExit(f"{model_dir} records no planted units: pass a planted preset (tiny-planted, lite-planted).")
    model, processor = load_model(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        acts = extract_activations(model, processor, preset_dataset(preset), Path(tmp) / "acts", seed=preset.seed,
                                   progress=False)
        sums = neuron_sums(acts, ImportanceParams().tau)
    keys = pl.DataFrame(planted, schema={"tower": pl.String, "layer": pl.Int64, "unit": pl.Int64}, orient="row")
    print(f"{preset.name}: {len(planted)} planted units; medians over the language tower's planted / other units")
    for mode in MODES:
        table = importance_table(sums, ImportanceParams(alpha=args.alpha, mode=mode)).cast(
            {"layer": pl.Int64, "unit": pl.Int64})
        lang = (table.filter(pl.col("tower") == "language").with_columns(rank_in_tower=pl.col("score").rank(descending=True))
                .join(keys.with_columns(planted=pl.lit(True)), on=["tower", "layer", "unit"], how="left")
                .with_columns(pl.col("planted").fill_null(False)))
        terms = [c for c in lang.columns if c.startswith(("forget_", "retain_"))]
        med = lang.group_by("planted").agg(*(pl.col(c).median() for c in [*terms, "score", "rank_in_tower"]))
        rows = {r["planted"]: r for r in med.iter_rows(named=True)}
        recall = planted_recall(table, planted).filter(pl.col("tower") == "language").row(0, named=True)
        print(f"\n{mode} (α={args.alpha:g}): planted recall {recall['hits']}/{recall['planted']}, "
              f"{recall['selected']} language units selected")
        print(f"  {'term':<20} {'planted':>10} {'other':>10}")
        for c in [*terms, "score", "rank_in_tower"]:
            print(f"  {c:<20} {rows[True][c]:10.4g} {rows[False][c]:10.4g}")


if __name__ == "__main__":
    main()
