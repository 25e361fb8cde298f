"""Selective pruning (method.md, "Pruning"; paper Section 3.2): θ' = 0 for every weight of a
selected neuron, θ otherwise.

A selection is a table of (tower, layer, unit) rows: the importance step's output (one row per
neuron, with a bool `selected` column: only selected rows are pruned) or just the rows to prune.
`prune_units` zeroes, in place, each unit's weights as `arch.unit_weights` lists them (gated MLP:
gate_proj row, up_proj row (and their bias entries), down_proj column; plain MLP: fc1 row and bias,
fc2 column). No hook is involved, so nothing is left behind and the model keeps its shapes: it
saves with `save_pretrained` and reloads with `from_pretrained`.

Linear outputs (the `released` mode's `linear_outputs` option, as the authors' released code prunes):
a selection whose table has `module` and `row` columns names output rows of the MLP's Linears
(gate_proj, up_proj, down_proj; fc1, fc2), and `prune_units` zeroes each one's weight row and bias
entry instead. For gate_proj / up_proj / fc1 that silences the hidden unit of that row (gate and up
independently: act(0)·up = 0, act(gate)·0 = 0); for down_proj / fc2 it zeroes one residual-stream
channel of the MLP's output (its bias entry too), whatever the hidden units do.

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

from manu_core.arch import TOWERS, MlpSite, get_adapter, mlp_sites, output_sites, unit_weights
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
    n_units: int  # hidden units of every live site of the model (Linear-output pruning: their outputs)

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


def _is_outputs(selection) -> bool:
    return isinstance(selection, pl.DataFrame) and "module" in selection.columns


def output_rows(model, selection: pl.DataFrame) -> list[tuple[MlpSite, str, torch.Tensor]]:
    """A Linear-output selection (columns tower, layer, module, row; only `selected` rows when it has
    that column), validated against the model: (site, module, output rows) per (tower, layer, module)."""
    missing = [c for c in ("tower", "layer", "module", "row") if c not in selection.columns]
    if missing:
        raise PruneError(f"a Linear-output selection needs columns tower, layer, module, row; missing "
                         f"{', '.join(missing)}. Pass the importance table of a linear_outputs scoring.")
    df = selection.filter(pl.col("selected")) if "selected" in selection.columns else selection
    df = df.select("tower", "layer", "module", "row").unique().sort("tower", "layer", "module", "row")
    if df.null_count().sum_horizontal().item():
        raise PruneError("selection has null tower/layer/module/row values; every row needs all four.")
    sites = {(s.tower, s.layer, s.module): s for s in _every_output_site(model)}
    out = []
    for (tower, layer, module), g in df.group_by("tower", "layer", "module", maintain_order=True):
        site = sites.get((tower, layer, module))
        if site is None:
            linears = [m for t, l, m in sites if (t, l) == (tower, layer)]
            if not linears:
                raise PruneError(f"selection names {tower} layer {layer}, which this {get_adapter(model).model_type} "
                                 "model does not have. Was the selection made for another model?")
            raise PruneError(f"selection names module {module!r} of {tower} layer {layer}, whose MLP has "
                             f"{', '.join(linears)}. Was the selection made for another model?")
        width = site.width
        rows = g["row"]
        if rows.min() < 0 or rows.max() >= width:
            raise PruneError(f"output row {rows.filter((rows < 0) | (rows >= width))[0]} of {tower} layer {layer} "
                             f"{module} is out of range (0..{width - 1}). Was the selection made for another model?")
        out.append((site, module, torch.tensor(rows.to_list(), dtype=torch.long)))
    return out


def _every_output_site(model) -> list[MlpSite]:
    """The Linear-output sites of every layer, dead vision layers included (what the extraction hooks)."""
    return output_sites(model, mlp_sites(model, live_only=False))


def _output_params(model, site: MlpSite, module: str) -> list[torch.nn.Parameter]:
    lin = model.get_submodule(f"{site.path}.{module}")
    return [lin.weight] + ([lin.bias] if lin.bias is not None else [])  # row i: weight[i, :], bias[i]


@dataclass(frozen=True)
class PrunedSlice:
    """Slices `index` along `dim` of `param`: what a selection zeroes in one parameter."""

    param: torch.nn.Parameter
    dim: int
    index: torch.Tensor


def pruned_slices(model, selection: pl.DataFrame | Iterable[tuple[str, int, int]]
                  ) -> tuple[list[PrunedSlice], dict[tuple[str, int], int]]:
    """Every parameter slice the selection zeroes (hidden units: `arch.unit_weights`; a Linear-output
    table: those output rows and bias entries), and the units pruned per (tower, layer); validated
    against the model."""
    out, per_layer = [], {}
    if _is_outputs(selection):
        for site, module, rows in output_rows(model, selection):  # type: ignore[arg-type]
            out += [PrunedSlice(p, 0, rows) for p in _output_params(model, site, module)]
            per_layer[(site.tower, site.layer)] = per_layer.get((site.tower, site.layer), 0) + int(rows.numel())
        return out, per_layer
    for site, idx in unit_groups(model, selection_frame(selection)):
        out += [PrunedSlice(w.param, w.dim, idx) for w in unit_weights(model, site)]
        per_layer[(site.tower, site.layer)] = int(idx.numel())
    return out, per_layer


def prune_units(model, selection: pl.DataFrame | Iterable[tuple[str, int, int]]) -> PruneReport:
    """Zero every weight of each selected unit, in place (method.md, "Pruning"). An empty selection
    (α = 0) changes nothing. Returns what was pruned. A table with `module` and `row` columns (a
    linear_outputs scoring) zeroes those Linears' output rows instead (module docstring); the report
    then counts Linear outputs (per layer: pruned of the layer's outputs; n_units: every layer's, dead
    vision layers included, as the extraction hooks them)."""
    slices, per_layer = pruned_slices(model, selection)
    with torch.no_grad():
        for sl in slices:
            sl.param.index_fill_(sl.dim, sl.index.to(sl.param.device), 0)
    outputs = _is_outputs(selection)
    widths: dict[tuple[str, int], int] = {}  # units per layer: hidden units, or the layer's Linear outputs together
    for s in _every_output_site(model) if outputs else mlp_sites(model, live_only=False):
        widths[(s.tower, s.layer)] = widths.get((s.tower, s.layer), 0) + s.width
    counted = mlp_sites(model, live_only=not outputs)  # Linear outputs: every layer is hooked, dead ones too
    per_site = tuple((t, l, n, widths[(t, l)]) for (t, l), n in
                     sorted(per_layer.items(), key=lambda kv: (TOWERS.index(kv[0][0]), kv[0][1])))
    return PruneReport(per_site, sum(p[2] for p in per_site), sum(widths[(s.tower, s.layer)] for s in counted))


def pruned_weights_are_zero(model, selection: pl.DataFrame | Iterable[tuple[str, int, int]]) -> bool:
    """True when every weight slice of every selected unit (or output row) is exactly zero."""
    return all(not bool(sl.param.detach().index_select(sl.dim, sl.index.to(sl.param.device)).any())
               for sl in pruned_slices(model, selection)[0])


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
