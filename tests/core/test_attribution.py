"""Gradient x activation attribution: equals an independent autograd computation, vision units get
nothing from text-only samples, the top unit matters more than a low one, the table prunes, runs repeat."""

import math
import random

import numpy as np
import polars as pl
import pytest
import torch

from manu_core import data as mdata
from manu_core.arch import get_site, mlp_sites
from manu_core.attribution import AttributionError, attribution_table, unit_attribution
from manu_core.models import ARCHS, TinySpec, build_processor, build_tiny_model, train_tokenizer
from manu_core.prompts import encode_samples, model_inputs
from manu_core.prune import prune_units, pruned_weights_are_zero, selection_frame
from manu_core.train import answer_loss
from tests.core.helpers import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    ds = mdata.build_dataset(forget=["001"], n_profiles=3, n_celebrities=0)
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 512)
    forget = mdata.samples(ds.profiles[0])[:6]  # both forms, interleaved
    retain = mdata.samples(ds.profiles[1])[:6]
    assert {s.form for s in forget} == {"multimodal", "text"}
    return tok, forget, retain


def fresh(setup, arch: str, dtype: torch.dtype = torch.float32):
    tok = setup[0]
    spec = TinySpec(arch=arch, **SMALL)
    return build_tiny_model(spec, tok, seed=5).to(dtype), build_processor(spec, tok)


def loss64(model, enc):
    """Mean cross-entropy over the answer tokens (what train.answer_loss computes), through the full
    model and its LM head, in float64 so that finite differences are precise."""
    logits = model(**model_inputs(enc)).logits[:, :-1].double()
    labels = enc["labels"][:, 1:]
    keep = labels != -100
    return torch.nn.functional.cross_entropy(logits[keep], labels[keep])


def scaled_loss(model, proc, sample, site, units, scale, loss=answer_loss):
    """Answer loss of one sample with units' activations multiplied by `scale(x_u)`."""

    def pre(module, args):
        x = args[0].clone()
        x[..., units] = x[..., units] * scale(x[..., units])
        return (x, *args[1:])

    h = model.get_submodule(site.hook_path).register_forward_pre_hook(pre)
    try:
        return loss(model, encode_samples(proc, [sample]))
    finally:
        h.remove()


def manual(model, proc, sample, site, units):
    """Σ_t |a·∂L/∂a| for `units` of `site` on one sample, and the signed Σ_t a·∂L/∂a: the gradient of L
    w.r.t. a per-position factor (1 + δ_t) on each unit's activation, at δ = 0."""
    box = {}

    def scale(xu):
        box["d"] = torch.zeros_like(xu, requires_grad=True)
        return 1 + box["d"]

    loss = scaled_loss(model, proc, sample, site, units, scale, loss64)
    if "d" not in box:  # the site did not run (vision on a text-only sample): the loss does not depend on it
        return np.zeros(len(units)), np.zeros(len(units))
    (g,) = torch.autograd.grad(loss, box["d"])  # (..., len(units)) = a(t) ∂L/∂a(t)
    g = g.flatten(0, -2).double()
    return g.abs().sum(0).numpy(), g.sum(0).numpy()


def some_units(model):
    return [(s, [0, 5, s.width - 1]) for s in mlp_sites(model)]


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_independent_autograd_and_finite_differences(setup, arch):
    _, forget, _ = setup
    model, proc = fresh(setup, arch, torch.float64)  # float64: finite differences are precise
    samples = forget[:3]  # multimodal, text, multimodal
    per_sample = [{s: manual(model, proc, x, s, u) for s, u in some_units(model)} for x in samples]

    # the manual signed sum is dL/dε of scaling the whole unit by (1 + ε): check it by central differences.
    # RMSNorm and softmax run in float32 even in a float64 model, so h is large (its O(h²) error is ~1e-5 here)
    site = get_site(model, "language", 1)
    mm = samples[0]
    h = 0.1
    with torch.no_grad():
        plus, minus = (scaled_loss(model, proc, mm, site, [5], lambda xu, e=e: 1 + e, loss64).item() for e in (h, -h))
        enc = encode_samples(proc, [mm])
        assert loss64(model, enc).item() == pytest.approx(answer_loss(model, enc).item(), rel=1e-6)
    assert (plus - minus) / (2 * h) == pytest.approx(per_sample[0][site][1][1], rel=1e-3)

    # rtol 1e-5: both losses take the softmax in float32 (answer_loss's logits.float(), loss64's RMSNorm)
    one = unit_attribution(model, proc, samples[:1], batch_size=1, progress=False)
    for s, units in some_units(model):
        np.testing.assert_allclose(one[(s.tower, s.layer)][units], per_sample[0][s][0], rtol=1e-5, atol=1e-12)
    assert all(v.dtype == np.float64 for v in one.values())

    # batches of two (padding, forms batched separately) give the mean of the per-sample values
    both = unit_attribution(model, proc, samples, batch_size=2, progress=False)
    for s, units in some_units(model):
        expect = sum(p[s][0] for p in per_sample) / len(samples)
        np.testing.assert_allclose(both[(s.tower, s.layer)][units], expect, rtol=1e-5, atol=1e-12)
        assert (both[(s.tower, s.layer)] > 0).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_vision_units_get_nothing_from_text_only_samples(setup, arch):
    _, forget, _ = setup
    model, proc = fresh(setup, arch)
    text = [s for s in forget if s.image is None]
    mm = [s for s in forget if s.image is not None]
    on_text = unit_attribution(model, proc, text, progress=False)
    assert {k for k in on_text} == {(s.tower, s.layer) for s in mlp_sites(model)}
    for (tower, _), v in on_text.items():
        assert (v == 0).all() if tower == "vision" else (v > 0).any()
    on_mm = unit_attribution(model, proc, mm, progress=False)
    mixed = unit_attribution(model, proc, forget, progress=False)
    for key, v in mixed.items():
        if key[0] == "vision":  # the mean counts text samples as 0
            np.testing.assert_allclose(v, on_mm[key] * len(mm) / len(forget), rtol=1e-5)
            assert (v > 0).any()


def test_zeroing_the_top_unit_moves_the_loss_more_than_a_low_one(setup):
    _, forget, _ = setup
    model, proc = fresh(setup, "llava")
    attr = unit_attribution(model, proc, forget, progress=False)
    with torch.no_grad():
        base = [answer_loss(model, encode_samples(proc, [x])).item() for x in forget]

    def effect(site, u):  # mean over samples of |ΔL| when unit u is zeroed
        with torch.no_grad():
            return np.mean([abs(scaled_loss(model, proc, x, site, [u], lambda xu: 0 * xu).item() - b)
                            for x, b in zip(forget, base)])

    rng = random.Random(0)
    for tower in ("language", "vision"):
        sites = [s for s in mlp_sites(model) if s.tower == tower]
        scores = [(float(attr[(s.tower, s.layer)][u]), s, u) for s in sites for u in range(s.width)]
        scores.sort(key=lambda t: -t[0])
        top = scores[:3]
        low = rng.sample(scores[len(scores) // 2 :], 3)
        top_effect = np.mean([effect(s, u) for _, s, u in top])
        low_effect = np.mean([effect(s, u) for _, s, u in low])
        assert top_effect > 2 * low_effect, (tower, top_effect, low_effect)  # 3-20x on seeds 0-3


@pytest.mark.parametrize("arch", ARCHS)
def test_table_selects_alpha_per_tower_and_prunes(setup, arch):
    _, forget, retain = setup
    model, proc = fresh(setup, arch)
    alpha, eps = 0.1, 1e-5
    table = attribution_table(model, proc, forget, retain, alpha=alpha, eps=eps, progress=False)
    assert {"tower", "layer", "unit", "selected", "score", "forget_attr", "retain_attr", "rank"} <= set(table.columns)
    assert table.schema["selected"] == pl.Boolean and table.schema["layer"] == pl.Int64
    widths = {t: sum(s.width for s in mlp_sites(model) if s.tower == t) for t in ("language", "vision")}
    assert table.height == sum(widths.values())
    np.testing.assert_allclose(table["score"], table["forget_attr"] / (table["retain_attr"] + eps))
    for tower, n in widths.items():
        g = table.filter(pl.col("tower") == tower)
        k = math.floor(alpha * n)
        assert g["selected"].sum() == k > 0
        assert g.filter("selected")["score"].min() >= g.filter(~pl.col("selected"))["score"].max()
        assert sorted(g.filter("selected")["rank"].to_list()) == list(range(1, k + 1))

    glob = attribution_table(model, proc, forget, retain, alpha=alpha, scope="global", progress=False)
    assert glob["selected"].sum() == math.floor(alpha * table.height)

    report = prune_units(model, table)
    assert report.n_pruned == int(table["selected"].sum()) == selection_frame(table).height
    assert pruned_weights_are_zero(model, table)


def test_errors_name_the_rule(setup):
    _, forget, retain = setup
    model, proc = fresh(setup, "llava")
    with pytest.raises(AttributionError, match="selects no unit"):
        attribution_table(model, proc, forget[:1], retain[:1], alpha=1e-4, progress=False)
    with pytest.raises(AttributionError, match="Unknown scope"):
        attribution_table(model, proc, forget, retain, alpha=0.1, scope="layer")
    with pytest.raises(AttributionError, match="alpha must be in"):
        attribution_table(model, proc, forget, retain, alpha=1.5)
    with pytest.raises(AttributionError, match="empty"):
        unit_attribution(model, proc, [])
    with pytest.raises(AttributionError, match="batch_size"):
        unit_attribution(model, proc, forget, batch_size=0)


def test_deterministic_and_leaves_the_model_as_it_was(setup):
    _, forget, _ = setup
    model, proc = fresh(setup, "llava")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = unit_attribution(model, proc, forget, batch_size=4, progress=False)
    b = unit_attribution(model, proc, forget, batch_size=4, progress=False)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(not model.get_submodule(s.hook_path)._forward_pre_hooks for s in mlp_sites(model))  # hooks removed
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    # frozen parameters (the graph then starts at the hooked activations) give the same values
    for p in model.parameters():
        p.requires_grad_(False)
    c = unit_attribution(model, proc, forget, batch_size=4, progress=False)
    assert all(np.allclose(a[k], c[k], rtol=1e-6, atol=0) for k in a)
