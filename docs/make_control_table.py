"""The table docs/embedded.md opens with: on the positive control and on the default stand-ins, each
scoring mode beside the random control and the attribution bound, from the comparisons the
`positive-control`, `control-lite` and `control-pieces` deployments wrote (docs/make_example.py).

    python docs/make_control_table.py [--alpha 0.05]

Per model and run at --alpha (the planted fraction): forget and retain multiple-choice drops in
points with their 95 % profile-bootstrap intervals, image+text and text only (the random control: the
mean over its seeds, intervals averaged), the share of the never-learned headroom where the sweep had
a reference, and the planted recall in the language tower where the model has planted units. Nothing
is recomputed: it reads comparison/drops.parquet, reference.parquet and planted.parquet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

DOCS = Path(__file__).resolve().parent
SOURCES = (("lite-planted (positive control)", "example-positive-control"), ("lite (default)", "example-control-lite"),
           ("lite-pieces (shared pieces)", "example-control-pieces"))
FORMS = ("multimodal", "text")


def _cell(g: pl.DataFrame, set_: str) -> str:
    cells = []
    for form in FORMS:
        r = g.filter((pl.col("set") == set_) & (pl.col("form") == form))
        if r.is_empty():
            cells.append("–")
            continue
        drop, lo, hi = (float(r[c].mean()) for c in ("drop", "lo", "hi"))
        cells.append(f"{drop:+.1f} [{lo:+.1f}, {hi:+.1f}]")
    return " / ".join(cells)


def table(alpha: float) -> str:
    lines = ["| model | run (α = %g) | forget drop, image+text / text | retain drop, image+text / text | "
             "share of headroom | planted recall |" % alpha, "|---|---|---|---|---|---|"]
    for title, folder in SOURCES:
        comp = DOCS / folder / "comparison"
        if not (comp / "drops.parquet").is_file():
            lines.append(f"| {title} | not run (docs/{folder}/ missing) | | | | |")
            continue
        drops = pl.read_parquet(comp / "drops.parquet").filter(pl.col("strength") == alpha)
        ref = pl.read_parquet(comp / "reference.parquet") if (comp / "reference.parquet").is_file() else None
        planted = pl.read_parquet(comp / "planted.parquet") if (comp / "planted.parquet").is_file() else None
        for (curve,), g in drops.sort("curve").group_by("curve", maintain_order=True):
            seeds = g["seed"].n_unique() if g["seed"].is_not_null().any() else 1
            name = curve + (f" ({seeds} seeds, mean)" if seeds > 1 else "")
            share = "–"
            if ref is not None:
                r = ref.filter((pl.col("curve") == curve) & (pl.col("strength") == alpha))
                share = " / ".join(f"{r.filter(pl.col('form') == f)['share'].mean():.2f}" for f in FORMS)
            recall = "–"
            if planted is not None:
                p = planted.filter((pl.col("curve") == curve) & (pl.col("strength") == alpha)
                                   & (pl.col("tower") == "language"))
                recall = f"{100 * p['recall'].mean():.0f} %" if p.height else "–"
            lines.append(f"| {title} | {name} | {_cell(g, 'forget')} | {_cell(g, 'retain')} | {share} | {recall} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpha", type=float, default=0.05)
    print(table(ap.parse_args().alpha))


if __name__ == "__main__":
    main()
