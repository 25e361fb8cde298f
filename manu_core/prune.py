"""Selective pruning (method.md, "Pruning"; paper Section 3.2): θ' = 0 for every weight of a
selected neuron, θ otherwise.

A selection is a table of (tower, layer, unit) rows: the importance step's output (one row per
neuron, with a bool `selected` column: only selected rows are pruned) or just the rows to prune.
`prune_units` zeroes, in place, each unit's weights as `arch.unit_weights` lists them (gated MLP:
gate_proj row, up_proj row (and their bias entries), down_proj column; plain MLP: fc1 row and bias,
fc2 column). No hook is involved, so nothing is left behind and the model keeps its shapes: it
saves with `save_pretrained` and reloads with `from_pretrained`.

Why a pruned unit contributes nothing: its down_proj / fc2 column is zero, so whatever value the
unit takes, its contribution to the MLP output is 0·a = 0. Its activation is also exactly 0 for the
activations used here (gated: up row zero gives up_i = 0, so act(gate_i)·0 = 0; plain: fc1 row and
bias zero give pre-activation 0, and GELU/QuickGELU/SiLU(0) = 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from manu_core.arch import TOWERS, MlpSite, get_adapter, mlp_sites, unit_weights
from manu_core.io import atomic_dir, atomic_write_json

SELECTION_FILE = "selection.parquet"
REPORT_FILE = "prune_report.json"


class PruneError(ValueError):
    """Bad selection: the message names the rule, the value and the fix."""


@dataclass(frozen=True)
class PruneReport:
    """What `prune_units` did: units zeroed per (tower, layer), out of the model's units."""

    per_site: tuple[tuple[str, int, int, int], ...]  # (tower, layer, pruned, width), pruned > 0 only
    n_pruned: int
    n_units: int  # hidden units of every live site of the model

    @property
    def fraction(self) -> float:
        return self.n_pruned / self.n_units if self.n_units else 0.0

    def as_dict(self) -> dict:
        return {
            "n_pruned": self.n_pruned, "n_units": self.n_units, "fraction": self.fraction,
            "per_site": [dict(tower=t, layer=l, pruned=p, width=w) for t, l, p, w in self.per_site],
        }


def selection_frame(selection: pl.DataFrame | Iterable[tuple[str, int, int]]) -> pl.DataFrame:
    """The rows to prune as a (tower, layer, unit) DataFrame, deduplicated and sorted.

    Accepts the importance table (rows with `selected` True are kept), a table of just the rows to
    prune, or an iterable of (tower, layer, unit) tuples."""
    if isinstance(selection, pl.DataFrame):
        missing = [c for c in ("tower", "layer", "unit") if c not in selection.columns]
        if missing:
            raise PruneError(
                f"a selection needs columns tower, layer, unit; missing {', '.join(missing)} "
                f"(columns: {', '.join(selection.columns)}). Pass the importance table or (tower, layer, unit) rows."
            )
        df = selection
        if "selected" in df.columns:
            if df.schema["selected"] != pl.Boolean:
                raise PruneError(f"column `selected` must be Boolean; got {df.schema['selected']}.")
            df = df.filter(pl.col("selected"))
        df = df.select(pl.col("tower").cast(pl.String), pl.col("layer").cast(pl.Int64), pl.col("unit").cast(pl.Int64))
    else:
        rows = [tuple(r) for r in selection]
        bad = [r for r in rows if len(r) != 3]
        if bad:
            raise PruneError(f"selection rows must be (tower, layer, unit); got {bad[0]!r}.")
        df = pl.DataFrame(rows, schema={"tower": pl.String, "layer": pl.Int64, "unit": pl.Int64}, orient="row")
    if df.null_count().sum_horizontal().item():
        raise PruneError("selection has null tower/layer/unit values; every row needs all three.")
    order = {t: i for i, t in enumerate(TOWERS)}
    return (
        df.unique()
        .with_columns(_t=pl.col("tower").replace_strict(order, default=len(TOWERS)))
        .sort("_t", "layer", "unit")
        .drop("_t")
    )


def unit_groups(model, df: pl.DataFrame) -> list[tuple[MlpSite, torch.Tensor]]:
    """Validate rows against the model: (site, unit indices) per (tower, layer)."""
    bad_towers = sorted(set(df["tower"].to_list()) - set(TOWERS))
    if bad_towers:
        raise PruneError(f"Unknown tower {bad_towers[0]!r} in the selection. Available: {', '.join(TOWERS)}.")
    sites = {(s.tower, s.layer): s for s in mlp_sites(model, live_only=False)}
    out = []
    for (tower, layer), g in df.group_by("tower", "layer", maintain_order=True):
        site = sites.get((tower, layer))
        if site is None:
            layers = sorted(l for t, l in sites if t == tower)
            raise PruneError(
                f"selection names {tower} layer {layer}, which this {get_adapter(model).model_type} model does not "
                f"have ({tower} layers: {layers[0]}..{layers[-1]}). Was the selection made for another model?"
            )
        units = g["unit"]
        if units.min() < 0 or units.max() >= site.width:
            bad = units.filter((units < 0) | (units >= site.width))[0]
            raise PruneError(
                f"unit {bad} of {tower} layer {layer} is out of range: that layer has {site.width} units "
                f"(0..{site.width - 1}). Was the selection made for another model?"
            )
        out.append((site, torch.tensor(units.to_list(), dtype=torch.long)))
    return out


def prune_units(model, selection: pl.DataFrame | Iterable[tuple[str, int, int]]) -> PruneReport:
    """Zero every weight of each selected unit, in place (method.md, "Pruning"). An empty selection
    (α = 0) changes nothing. Returns what was pruned."""
    df = selection_frame(selection)
    groups = unit_groups(model, df)
    per_site = []
    with torch.no_grad():
        for site, idx in groups:
            for w in unit_weights(model, site):
                w.param.index_fill_(w.dim, idx.to(w.param.device), 0)
            per_site.append((site.tower, site.layer, int(idx.numel()), site.width))
    n_units = sum(s.width for s in mlp_sites(model))
    return PruneReport(tuple(per_site), sum(p[2] for p in per_site), n_units)


def pruned_weights_are_zero(model, selection: pl.DataFrame | Iterable[tuple[str, int, int]]) -> bool:
    """True when every weight slice of every selected unit is exactly zero."""
    for site, idx in unit_groups(model, selection_frame(selection)):
        for w in unit_weights(model, site):
            if bool(w.param.detach().index_select(w.dim, idx.to(w.param.device)).any()):
                return False
    return True


def save_pruned(model, processor, selection: pl.DataFrame | Iterable[tuple[str, int, int]], out_dir: str | Path,
                report: PruneReport | None = None) -> Path:
    """Save the pruned model (`save_pretrained`, safetensors) and processor into `out_dir`, with the
    selection beside it as `selection.parquet` (the table as given: with scores when it has them) and,
    when given, the prune report. Written atomically: `out_dir` appears complete or not at all."""
    df = selection if isinstance(selection, pl.DataFrame) else selection_frame(selection)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        df.write_parquet(tmp / SELECTION_FILE, statistics=False)
        if report is not None:
            atomic_write_json(tmp / REPORT_FILE, report.as_dict())
    return Path(out_dir)
