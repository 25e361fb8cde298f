"""MANU end to end on one model, as plain functions: extract -> importance -> prune.

The Prefect pipeline runs these steps as separate cached tasks; this module strings them together
for the `manu demo` command, tests and benchmarks, with the same functions underneath.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from manu_core.data import Dataset
from manu_core.extract import extract_activations
from manu_core.importance import ImportanceParams, compute_importance, write_importance
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
    dataset: Dataset,
    workdir: str | Path,
    params: ImportanceParams,
    *,
    aggregation: str = "mean",
    batch_size: int = 32,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> ManuResult:
    """Prune `model` in place with MANU (method.md): activations of forget/retain x both forms,
    importance and top-α selection, zeroed units. Writes `activations/` and `importance.parquet`
    under `workdir`."""
    workdir = Path(workdir)
    acts = extract_activations(model, processor, dataset, workdir / "activations", aggregation=aggregation,
                               batch_size=batch_size, device=device, seed=seed, progress=progress)
    table = compute_importance(acts, params)
    imp = write_importance(table, workdir / "importance.parquet")
    report = prune_units(model, table)
    log.info("MANU pruned %d of %d units (α=%s, scope=%s)", report.n_pruned, report.n_units, params.alpha, params.scope)
    return ManuResult(acts, imp, report)


def random_selection(importance: pl.DataFrame, seed: int) -> pl.DataFrame:
    """The control: as many units as `importance` selects, drawn uniformly (seeded) from all of its
    neurons in one global draw (per-tower or per-layer counts of a scoped selection are not kept)."""
    k = int(importance["selected"].sum())
    rows = importance.select("tower", "layer", "unit").rows()
    picks = set(random.Random(f"random-prune/{seed}").sample(range(len(rows)), k))
    return importance.select("tower", "layer", "unit").with_columns(
        selected=pl.Series([i in picks for i in range(len(rows))], dtype=pl.Boolean)
    )
