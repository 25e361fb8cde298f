"""The positive control: knowledge of chosen people planted in known MLP units, and how much of it a
selection recovers.

A pipeline that finds no person-specific unit proves nothing until it has been shown one it must
find. A *planted* preset (docs/embedded.md, "The positive control") is trained like any other, except
that the people of its planted set are left out of the vanilla fine-tune; then every language MLP
is widened by `Plant.units` new hidden units (new gate/up rows, new down columns, or fc1/fc2) and
only those new units are trained, on the planted people in both forms, while a seeded sample of the
other learned people and the celebrities is rehearsed (the new units learn to stay out of their
answers). Everything the model knows of the planted people that the never-learned model does not is
therefore in the planted units, by construction: zeroing them gives back, bit for bit, the model
trained without the planted people (the set's never-learned reference).

    planted = widen_mlps(model, k=26)                # [(tower, layer, unit), ...] of the new units
    train_planted(model, processor, samples, planted, cfg, seed=0)
    recall = planted_recall(selection, planted)      # per tower: planted, selected, hits, recall, precision

The vision tower is not planted: the image form reaches the planted language units through the
(frozen) vision tower and projector, so a selection can only find the image form's knowledge in the
language model (docs/embedded.md says what that means for the image form).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import polars as pl
import torch

from manu_core.arch import mlp_sites, unit_weights
from manu_core.data import Sample
from manu_core.train import StageConfig, train_stage
from manu_core.vocab import TOWERS

PLANT_FILE = "manu_preset.json"  # the planted units live in the preset record of the model folder
RECALL_COLUMNS = ("tower", "planted", "selected", "hits", "recall", "precision")


class PlantError(ValueError):
    """Bad plant request or record: the message names the rule, the value and the fix."""


@dataclass(frozen=True)
class Plant:
    """How a planted preset plants its set (declared before any unlearning result; docs/embedded.md).

    `units`: new hidden units per language layer. `epochs`, `lr`: the plant stage, which trains only
    the new units. `rehearse`: rehearsal samples per planted sample, drawn (seeded, once) from the
    other learned people and the celebrities, both forms."""

    units: int
    epochs: int = 10
    lr: float = 3e-3
    rehearse: float = 2.0

    def __post_init__(self) -> None:
        if self.units < 1:
            raise PlantError(f"Plant.units must be at least 1 new unit per layer; got {self.units}.")
        if self.rehearse < 0:
            raise PlantError(f"Plant.rehearse is a ratio of samples and must be >= 0; got {self.rehearse}.")

    def stage(self) -> StageConfig:
        return StageConfig(epochs=self.epochs, lr=self.lr)


def _widen_linear(lin: torch.nn.Linear, k: int, dim: int, std: float, gen: torch.Generator) -> torch.nn.Linear:
    """A copy of `lin` with k more outputs (dim 0: new rows, drawn N(0, std)) or inputs (dim 1: new
    columns, zero, so the widened model computes exactly what it did)."""
    out_f, in_f = lin.out_features + (k if dim == 0 else 0), lin.in_features + (k if dim == 1 else 0)
    new = torch.nn.Linear(in_f, out_f, bias=lin.bias is not None, dtype=lin.weight.dtype, device=lin.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: lin.out_features, : lin.in_features] = lin.weight
        if dim == 0:
            new.weight[lin.out_features:] = torch.randn(k, in_f, generator=gen, dtype=lin.weight.dtype) * std
        if lin.bias is not None:
            new.bias.zero_()
            new.bias[: lin.out_features] = lin.bias
    return new


def widen_mlps(model, k: int, *, tower: str = "language", seed: int = 0) -> list[tuple[str, int, int]]:
    """Add `k` hidden units to every MLP layer of `tower`, in place, and set the config's
    intermediate size so the saved model loads with `from_pretrained`. New rows are drawn
    N(0, initializer_range) with `seed`; new columns are zero, so the model's outputs are unchanged
    until the new units are trained. Returns the new units as (tower, layer, unit)."""
    if tower != "language":
        raise PlantError(f"only the language tower can be planted (one intermediate size per config); got {tower!r}.")
    sites = mlp_sites(model, towers=(tower,), live_only=False)
    widths = {s.width for s in sites}
    if len(widths) != 1:
        raise PlantError(f"widen_mlps needs one MLP width across the {tower} layers; got {sorted(widths)}.")
    width = widths.pop()
    config = model.config.get_text_config()
    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    for s in sites:
        mlp = model.get_submodule(s.path)
        for names, dim in ((s.kind.rows, 0), (s.kind.cols, 1)):
            for name in names:
                setattr(mlp, name, _widen_linear(getattr(mlp, name), k, dim, std, gen))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width + k
    config.intermediate_size = width + k
    return [(tower, s.layer, width + i) for s in sites for i in range(k)]


def train_planted(model, processor, samples: Sequence[Sample], planted: Iterable[tuple[str, int, int]],
                  cfg: StageConfig, *, seed: int, name: str = "plant", progress: bool = True) -> list[dict]:
    """Train only the `planted` units' weights (their rows and columns, `arch.unit_weights`) on
    `samples`; every other parameter is frozen and checked unchanged afterwards. Returns the loss curve."""
    planted = sorted(set(planted))
    by_site: dict[tuple[str, int], list[int]] = {}
    for t, layer, u in planted:
        by_site.setdefault((t, layer), []).append(u)
    sites = {(s.tower, s.layer): s for s in mlp_sites(model, live_only=False)}
    missing = sorted(set(by_site) - set(sites))
    if missing:
        raise PlantError(f"planted units name MLP layers this model lacks: {missing[:5]}. Plant the model first "
                         "(widen_mlps) and pass the units it returned.")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable: dict[str, torch.Tensor] = {}  # parameter name -> mask of its planted slices
    for key, units in by_site.items():
        for uw in unit_weights(model, sites[key]):
            mask = trainable.get(uw.name, torch.zeros_like(uw.param))
            mask.index_fill_(uw.dim, torch.tensor(units, device=mask.device), 1.0)
            trainable[uw.name] = mask
    handles = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
        if n in trainable:
            handles.append(p.register_hook(lambda g, m=trainable[n]: g * m))
    try:
        curve = train_stage(model, processor, samples, cfg, seed=seed, name=name, progress=progress)
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            keep = (1 - trainable[n]) if n in trainable else torch.ones_like(p)
            if not torch.equal(p * keep, before[n] * keep):
                raise RuntimeError(f"train_planted changed {n} outside the planted units; the gradient mask failed.")
    return curve


# ----------------------------------------------------------------------------------------------
# Reading the record and scoring a selection against it


def planted_units(model_dir: str | Path) -> list[tuple[str, int, int]] | None:
    """The planted units a model folder records (its manu_preset.json), or None when it has none
    (every model that is not a planted preset's; a pruned model keeps none either)."""
    meta = Path(model_dir) / PLANT_FILE
    if not meta.is_file():
        return None
    record = json.loads(meta.read_text()).get("planted")
    if not record:
        return None
    return [(str(t), int(layer), int(u)) for t, layer, u in record["units"]]


def planted_ids(model_dir: str | Path) -> tuple[str, ...] | None:
    """The profile ids whose knowledge a planted model keeps in its planted units, or None."""
    meta = Path(model_dir) / PLANT_FILE
    if not meta.is_file():
        return None
    record = json.loads(meta.read_text()).get("planted")
    return tuple(record["ids"]) if record else None


def _selected_units(selection: pl.DataFrame) -> pl.DataFrame:
    """(tower, layer, unit) of the selected hidden units. A Linear-output selection (the released
    code's hook sites: module and row) counts a unit as selected when a row of one of its `rows`
    Linears (gate_proj/up_proj, fc1) is: those rows are the unit's pre-activations; down_proj/fc2
    rows are residual-stream channels and belong to no hidden unit."""
    for col in ("tower", "layer", "selected"):
        if col not in selection.columns:
            raise PlantError(f"planted_recall needs a selection with column {col!r}; got {selection.columns}.")
    chosen = selection.filter(pl.col("selected"))
    if "module" in selection.columns:
        return (chosen.filter(pl.col("module").is_in(["gate_proj", "up_proj", "fc1"]))
                .select("tower", "layer", unit=pl.col("row")).unique())
    return chosen.select("tower", "layer", "unit").unique()


def planted_recall(selection: pl.DataFrame, planted: Iterable[tuple[str, int, int]]) -> pl.DataFrame:
    """Per tower (and `all`): planted units, selected units, hits (planted among selected),
    recall = hits / planted (null where a tower has no planted unit) and precision = hits / selected
    (null where nothing is selected)."""
    plant = pl.DataFrame(list(planted), schema={"tower": pl.String, "layer": pl.Int64, "unit": pl.Int64}, orient="row")
    sel = _selected_units(selection).cast({"layer": pl.Int64, "unit": pl.Int64})
    hits = sel.join(plant, on=["tower", "layer", "unit"], how="semi")
    rows = []
    towers = [t for t in TOWERS if t in set(sel["tower"]) | set(plant["tower"])]
    for tower in [*towers, "all"]:
        def n(f: pl.DataFrame) -> int:
            return f.height if tower == "all" else f.filter(pl.col("tower") == tower).height
        p, s, h = n(plant), n(sel), n(hits)
        rows.append({"tower": tower, "planted": p, "selected": s, "hits": h,
                     "recall": h / p if p else None, "precision": h / s if s else None})
    return pl.DataFrame(rows, schema={"tower": pl.String, "planted": pl.Int64, "selected": pl.Int64, "hits": pl.Int64,
                                      "recall": pl.Float64, "precision": pl.Float64})


def recall_line(frame: pl.DataFrame) -> str:
    """'planted recall: language 48/52 (92 %), precision 48/54 (89 %); vision: 0 planted, 12 selected'."""
    parts = []
    for r in frame.iter_rows(named=True):
        if r["tower"] == "all":
            continue
        if r["planted"]:
            prec = f"{r['hits']}/{r['selected']}" + (f" ({100 * r['precision']:.0f} %)" if r["selected"] else "")
            parts.append(f"{r['tower']} {r['hits']}/{r['planted']} ({100 * r['recall']:.0f} %), precision {prec}")
        else:
            parts.append(f"{r['tower']}: 0 planted, {r['selected']} selected")
    return "planted recall: " + "; ".join(parts)


def recall_markdown(frame: pl.DataFrame, ids: Sequence[str]) -> str:
    """The planted recall of a selection as a markdown section (tables, the UI artifact)."""
    lines = [f"## Planted units (positive control: {len(ids)} planted people)", "",
             "| tower | planted | selected | planted among selected | recall | precision |", "|---|---|---|---|---|---|"]
    for r in frame.iter_rows(named=True):
        rec = "-" if r["recall"] is None else f"{100 * r['recall']:.1f} %"
        prec = "-" if r["precision"] is None else f"{100 * r['precision']:.1f} %"
        lines.append(f"| {r['tower']} | {r['planted']} | {r['selected']} | {r['hits']} | {rec} | {prec} |")
    return "\n".join(lines)
