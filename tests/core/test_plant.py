"""The positive control's plumbing (manu_core/plant.py) on untrained small models: widening keeps the
model's outputs, only the planted slices train, the widened model saves and reloads, and a
selection's planted recall and precision count the right units."""

import polars as pl
import pytest
import torch

from manu_core import data as mdata
from manu_core.arch import mlp_sites
from manu_core.models import TinySpec, build_processor, build_tiny_model, load_model, save_model, train_tokenizer
from manu_core.plant import Plant, PlantError, planted_recall, recall_line, train_planted, widen_mlps
from manu_core.prompts import encode_samples, model_inputs
from manu_core.train import StageConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    ds = mdata.build_dataset(forget=("093", "279"), n_profiles=6, n_celebrities=2, seed=0)
    samples = [s for p in ds.profiles for s in mdata.samples(p, forms=("multimodal",))]
    tok = train_tokenizer([f"{s.question} {s.answer}" for s in samples], 400)
    spec = TinySpec(arch="llava", hidden=32, intermediate=64, layers=2, heads=2, vision_hidden=32,
                    vision_intermediate=48, vision_heads=2)
    return spec, tok, build_processor(spec, tok), samples


def logits(model, processor, samples):
    with torch.no_grad():
        return model(**model_inputs(encode_samples(processor, samples))).logits


def test_widening_adds_units_without_changing_the_outputs(setup):
    spec, tok, processor, samples = setup
    model = build_tiny_model(spec, tok, seed=1).eval()
    before = logits(model, processor, samples[:4])
    units = widen_mlps(model, 5, seed=0)
    assert units == [("language", layer, 64 + i) for layer in (0, 1) for i in range(5)]
    assert [s.width for s in mlp_sites(model, towers=("language",))] == [69, 69]
    assert model.config.get_text_config().intermediate_size == 69
    assert [s.width for s in mlp_sites(model, towers=("vision",))] == [48]  # the vision tower is not planted
    torch.testing.assert_close(logits(model, processor, samples[:4]), before, rtol=0, atol=1e-6)
    with pytest.raises(PlantError, match="only the language tower"):
        widen_mlps(model, 2, tower="vision")


def test_only_the_planted_slices_train_and_the_model_reloads(setup, tmp_path):
    spec, tok, processor, samples = setup
    model = build_tiny_model(spec, tok, seed=1).eval()
    units = widen_mlps(model, 4, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    curve = train_planted(model, processor, samples[:16], units, StageConfig(epochs=2, lr=1e-2, batch_size=8), seed=0,
                          progress=False)
    assert curve and all(p.requires_grad for p in model.parameters())  # unfrozen again afterwards
    mlp = model.model.language_model.layers[0].mlp
    name = "model.language_model.layers.0.mlp"
    assert not torch.equal(mlp.down_proj.weight[:, 64:], before[f"{name}.down_proj.weight"][:, 64:])  # planted: trained
    assert torch.equal(mlp.down_proj.weight[:, :64], before[f"{name}.down_proj.weight"][:, :64])  # the rest: untouched
    assert torch.equal(mlp.gate_proj.weight[:64], before[f"{name}.gate_proj.weight"][:64])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mlp." in n and "language_model" in n for n in changed), changed
    out = save_model(model, processor, tmp_path / "planted")
    reloaded, proc2 = load_model(out)
    torch.testing.assert_close(logits(reloaded, proc2, samples[:3]), logits(model, processor, samples[:3]))
    with pytest.raises(PlantError, match="MLP layers this model lacks"):
        train_planted(model, processor, samples[:2], [("language", 9, 0)], StageConfig(epochs=1), seed=0, progress=False)


def test_planted_recall_counts_hits_per_tower():
    planted = [("language", 0, 10), ("language", 0, 11), ("language", 1, 10), ("language", 1, 11)]
    sel = pl.DataFrame({"tower": ["language"] * 4 + ["vision"] * 2, "layer": [0, 0, 1, 1, 0, 0],
                        "unit": [10, 3, 11, 12, 10, 11], "selected": [True, True, True, False, True, False]})
    rows = {r["tower"]: r for r in planted_recall(sel, planted).iter_rows(named=True)}
    assert (rows["language"]["planted"], rows["language"]["selected"], rows["language"]["hits"]) == (4, 3, 2)
    assert rows["language"]["recall"] == 0.5 and rows["language"]["precision"] == pytest.approx(2 / 3)
    assert rows["vision"]["planted"] == 0 and rows["vision"]["recall"] is None and rows["vision"]["precision"] == 0.0
    assert rows["all"]["hits"] == 2 and rows["all"]["selected"] == 4
    assert "language 2/4 (50 %)" in recall_line(planted_recall(sel, planted))
    none = planted_recall(sel.with_columns(selected=pl.lit(False)), planted)
    assert none.filter(pl.col("tower") == "language")["precision"][0] is None


def test_a_linear_output_selection_counts_gate_and_up_rows_not_down_rows():
    planted = [("language", 0, 5), ("language", 0, 6)]
    sel = pl.DataFrame({"tower": ["language"] * 4, "layer": [0] * 4, "unit": [0, 1, 2, 3],
                        "module": ["gate_proj", "up_proj", "down_proj", "down_proj"], "row": [5, 5, 6, 7],
                        "selected": [True, True, True, True]})
    row = planted_recall(sel, planted).filter(pl.col("tower") == "language").row(0, named=True)
    assert (row["selected"], row["hits"]) == (1, 1)  # unit 5 (gate and up rows); down rows are channels, not units


def test_plant_settings_are_checked():
    with pytest.raises(PlantError, match="at least 1 new unit"):
        Plant(units=0)
    with pytest.raises(PlantError, match="must be >= 0"):
        Plant(units=4, rehearse=-1)
