"""Pruning: α = 0 changes nothing; pruned units are zero and contribute nothing; save/reload."""

import polars as pl
import pytest
import torch

from manu_core import data as mdata
from manu_core.arch import get_site, mlp_sites, unit_weights
from manu_core.prompts import encode_samples
from manu_core.models import ARCHS, TinySpec, build_processor, build_tiny_model, load_model, train_tokenizer
from manu_core.prompts import model_inputs
from manu_core.prune import (
    SELECTION_FILE,
    PruneError,
    prune_units,
    pruned_weights_are_zero,
    save_pruned,
    selection_frame,
)
from tests.core.helpers import SMALL


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    ds = mdata.build_dataset(forget=["001"], n_profiles=3, n_celebrities=0)
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 512)
    samples = [s for s in mdata.samples(ds.profiles[0]) if s.image][:4]
    return tok, samples


def fresh(setup, arch):
    tok, samples = setup
    spec = TinySpec(arch=arch, **SMALL)
    model, proc = build_tiny_model(spec, tok, seed=5).eval(), build_processor(spec, tok)
    return model, proc, encode_samples(proc, samples)


def logits(model, enc):
    with torch.no_grad():
        return model(**model_inputs(enc)).logits


def selection_for(model):
    """A few units in every live layer of both towers."""
    return [(s.tower, s.layer, u) for s in mlp_sites(model) for u in (0, 3, s.width - 1)]


@pytest.mark.parametrize("arch", ARCHS)
def test_alpha_zero_leaves_logits_identical(setup, arch):
    model, _, enc = fresh(setup, arch)
    before = logits(model, enc)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    empty = pl.DataFrame({"tower": [], "layer": [], "unit": [], "score": [], "selected": []},
                         schema={"tower": pl.String, "layer": pl.Int64, "unit": pl.Int64, "score": pl.Float64, "selected": pl.Boolean})
    for sel in ([], empty):
        report = prune_units(model, sel)
        assert report.n_pruned == 0 and report.fraction == 0
    assert torch.equal(logits(model, enc), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_units_are_zero_and_contribute_nothing(setup, arch):
    model, _, enc = fresh(setup, arch)
    sel = selection_for(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_units(model, sel)
    assert report.n_pruned == len(sel) and report.n_units == sum(s.width for s in mlp_sites(model))
    assert sum(p for _, _, p, _ in report.per_site) == len(sel)
    assert pruned_weights_are_zero(model, sel)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0  # no hooks

    # exactly the method's slices changed: gate/up rows + down column; fc1 row and bias + fc2 column
    touched = {}
    for s in mlp_sites(model):
        units = torch.tensor([u for t, l, u in sel if (t, l) == (s.tower, s.layer)])
        for w in unit_weights(model, s):
            touched[w.name] = (w.dim, units)
    for name, after in model.state_dict().items():
        before = state[name]
        if name not in touched:
            assert torch.equal(after, before), name
            continue
        dim, units = touched[name]
        keep = torch.ones(after.shape[dim], dtype=torch.bool)
        keep[units] = False
        assert torch.equal(after.index_select(dim, keep.nonzero().flatten()), before.index_select(dim, keep.nonzero().flatten()))
        assert not after.index_select(dim, units).any()

    # the pruned units' activations (the input of down_proj / fc2) are exactly 0 at every position,
    # and perturbing them changes no logit: the model does not depend on them
    pruned = {(t, l): [u for tt, ll, u in sel if (tt, ll) == (t, l)] for t, l, _ in sel}
    seen = {}

    def watch(site):
        def hook(module, args):
            seen[site.name] = args[0][..., pruned[(site.tower, site.layer)]].clone()
        return hook

    sites = mlp_sites(model)
    handles = [model.get_submodule(s.hook_path).register_forward_pre_hook(watch(s)) for s in sites]
    base = logits(model, enc)
    for h in handles:
        h.remove()
    assert set(seen) == {s.name for s in sites}
    assert all(bool((v == 0).all()) for v in seen.values())

    def perturb(site):
        def hook(module, args):
            x = args[0].clone()
            x[..., pruned[(site.tower, site.layer)]] = 1e3 * torch.randn_like(x[..., pruned[(site.tower, site.layer)]])
            return (x,)
        return hook

    handles = [model.get_submodule(s.hook_path).register_forward_pre_hook(perturb(s)) for s in sites]
    try:
        assert torch.equal(logits(model, enc), base)
    finally:
        for h in handles:
            h.remove()
    assert not torch.equal(base, logits(fresh(setup, arch)[0], enc))  # pruning did change the model


def test_importance_table_prunes_selected_rows_only(setup):
    model, _, enc = fresh(setup, "llava")
    table = pl.DataFrame({
        "tower": ["language", "language", "vision", "vision"], "layer": [0, 1, 0, 0], "unit": [5, 6, 7, 8],
        "score": [3.0, 0.1, 2.0, 0.2], "selected": [True, False, True, False],
    })
    assert selection_frame(table).rows() == [("language", 0, 5), ("vision", 0, 7)]
    report = prune_units(model, table)
    assert report.n_pruned == 2
    assert pruned_weights_are_zero(model, [("language", 0, 5), ("vision", 0, 7)])
    assert not pruned_weights_are_zero(model, [("language", 1, 6)])
    # duplicates are harmless; order does not matter
    assert selection_frame([("vision", 0, 1), ("language", 1, 2), ("vision", 0, 1)]).rows() == [
        ("language", 1, 2), ("vision", 0, 1)]


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_give_identical_logits(tmp_path, setup, arch):
    model, proc, enc = fresh(setup, arch)
    table = pl.DataFrame(selection_for(model), schema={"tower": pl.String, "layer": pl.Int64, "unit": pl.Int64},
                         orient="row").with_columns(score=pl.lit(1.5), selected=pl.lit(True))
    report = prune_units(model, table)
    out = save_pruned(model, proc, table, tmp_path / "pruned", report=report)
    assert (out / "config.json").is_file() and (out / "prune_report.json").is_file()
    assert pl.read_parquet(out / SELECTION_FILE).equals(table)  # kept beside the weights, as given
    model2, proc2 = load_model(out)
    assert torch.equal(logits(model2, encode_samples(proc2, setup[1])), logits(model, enc))
    assert pruned_weights_are_zero(model2, table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary folder left


def test_bad_selections_are_explained(setup):
    model, _, _ = fresh(setup, "llava")  # vision layer 1 exists but is dead (vision_feature_layer=-2)
    with pytest.raises(PruneError, match="Unknown tower 'text'"):
        prune_units(model, [("text", 0, 1)])
    with pytest.raises(PruneError, match="language layer 7, which this llava model does not have \\(language layers: 0..1\\)"):
        prune_units(model, [("language", 7, 1)])
    with pytest.raises(PruneError, match="unit 64 of language layer 0 is out of range: that layer has 64 units"):
        prune_units(model, [("language", 0, 64)])
    with pytest.raises(PruneError, match="unit -1 of vision layer 0 is out of range"):
        prune_units(model, [("vision", 0, -1)])
    with pytest.raises(PruneError, match="missing unit"):
        prune_units(model, pl.DataFrame({"tower": ["vision"], "layer": [0]}))
    with pytest.raises(PruneError, match="must be \\(tower, layer, unit\\)"):
        prune_units(model, [("vision", 0)])
    assert get_site(model, "vision", 1).live is False
    assert prune_units(model, [("vision", 1, 0)]).n_pruned == 1  # a dead layer exists and can be pruned
