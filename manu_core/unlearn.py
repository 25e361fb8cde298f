"""MANU end to end on one model, as plain functions: extract -> importance -> prune.

The Prefect pipeline runs these steps as separate cached tasks; this module strings them together
for tests, notebooks and benchmarks, with the same functions underneath.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from manu_core.extract import extract_activations
from manu_core.importance import ImportanceParams, compute_importance, require_selection, write_importance
from manu_core.prune import PruneReport, prune_units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManuResult:
    activations: Path
    importance: Path
    report: PruneReport


def manu_unlearn(
    model,
    processor,
    dataset,
    workdir: str | Path,
    params: ImportanceParams,
    *,
    aggregation: str = "mean",
    batch_size: int = 32,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    images=None,
) -> ManuResult:
    """Prune `model` in place with MANU (method.md): activations of forget/retain x both forms,
    importance and top-α selection, zeroed units. Writes `activations/` (with what `params` needs:
    position statistics, Linear outputs) and `importance.parquet` under `workdir`. `dataset`: the embedded Dataset, or the four streams (split, form) -> samples,
    e.g. a local benchmark's `Benchmark.streams()` with `images=Benchmark.image`."""
    workdir = Path(workdir)
    acts = extract_activations(model, processor, dataset, workdir / "activations", aggregation=aggregation,
                               batch_size=batch_size, device=device, seed=seed, progress=progress, images=images,
                               **params.extraction())
    table = compute_importance(acts, params, model_type=model.config.model_type)  # the released mode's sites
    require_selection(table, params)
    imp = write_importance(table, workdir / "importance.parquet")
    report = prune_units(model, table)
    log.info("MANU pruned %d of %d units (α=%s, scope=%s)", report.n_pruned, report.n_units, params.alpha, params.scope)
    return ManuResult(acts, imp, report)


def random_selection(importance: pl.DataFrame, seed: int, scope: str = "tower") -> pl.DataFrame:
    """The control: as many units as `importance` selects, drawn uniformly (seeded, deterministic)
    within each tower (scope "tower"), or within each (tower, layer) (scope "layer"), keeping each
    group's selected count; scope "global" is one draw over all neurons (group counts not kept).

    Returns (tower, layer, unit, selected) in `importance`'s row order, with module and row when the
    table has them (Linear outputs: prune_units then zeroes output rows, as for the selection shadowed)."""
    groups = {"global": [], "tower": ["tower"], "layer": ["tower", "layer"]}
    if scope not in groups:
        raise ValueError(f"scope must be one of {', '.join(groups)}; got {scope!r}. "
                         "Use the scope the selection was made with ('tower' for a global one).")
    for col in ("tower", "layer", "unit", "selected"):
        if col not in importance.columns:
            raise ValueError(f"random_selection needs an importance table with column {col!r}; "
                             f"got columns {importance.columns}.")
    keys = groups[scope]
    site = [c for c in ("module", "row") if c in importance.columns]  # a Linear-output table keeps its names
    frame = importance.select("tower", "layer", "unit", *site, "selected").with_row_index("_row")
    picks: set[int] = set()
    parts = frame.partition_by(keys, maintain_order=True, as_dict=True) if keys else {(): frame}
    for key, part in sorted(parts.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        k = int(part["selected"].sum())
        if not k:
            continue
        name = "/".join(str(x) for x in key)
        rng = random.Random(f"random-prune/{seed}/{scope}/{name}")  # str seeds: same draw in every process
        rows = part["_row"].to_list()
        picks.update(rows[i] for i in rng.sample(range(len(rows)), k))
    return frame.select("tower", "layer", "unit", *site, selected=pl.col("_row").is_in(sorted(picks)))
