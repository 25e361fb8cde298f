"""The released code's per-position statistics (`released` option `per_position`) against a numpy
reference written from their description (docs/method.md, "Mode `released`"), not from the code.

The reference captures every batch's hidden units itself (recomputed from each MLP block's input, as
tests/core/test_extract.py does), then, per batch and site: the rows of the hooked tensor at each
position, padding included (pooled: the rows of every layer of the tower stacked); per position mean
|a|, share of |a| > 0.1, std (rows − 1) and rms; the per-position values of each chunk of 10
consecutive batches averaged together, then the chunks averaged; vision units on the image+text
streams, language units on the text streams; score Σ_k w_k (F_k/(R_k + ε) − 1) with w = abs 2,
freq 0, std 2, rms 2; per tower the units scoring ≥ the ⌊α·N⌋-th largest score.
"""

import math
from fractions import Fraction

import numpy as np
import polars as pl
import pytest

from manu_core import data as mdata
from manu_core.arch import mlp_sites
from manu_core.extract import build_streams, extract_activations
from manu_core.importance import ImportanceParams, importance_table, neuron_sums, position_statistics
from manu_core.models import ARCHS, TinySpec, build_processor, build_tiny_model, train_tokenizer
from manu_core.store import ActivationStoreError, format_summary, inspect_activations
from tests.core.helpers import SMALL
from tests.core.test_extract import MLP_BLOCKS, _hidden

pytestmark = pytest.mark.usefixtures("one_thread")

# Unequal sample counts per (split, form); batches of 2 -> 12, 11, 10 and 9 batches: chunks of 10 and
# of fewer; retain/text ends with a batch of one row (no std: left out of the std's average).
COUNTS = {("forget", "multimodal"): 24, ("forget", "text"): 22, ("retain", "multimodal"): 20, ("retain", "text"): 17}
BATCH, CHUNK, TAU, EPS = 2, 10, 0.1, 1e-5
W = {"abs": 2.0, "freq": 0.0, "std": 2.0, "rms": 2.0}
STATS = ("abs", "freq", "std", "rms")


@pytest.fixture(scope="module")
def ds():
    return mdata.build_dataset(forget=["001", "002"], n_profiles=5, n_celebrities=0)


@pytest.fixture(scope="module", params=ARCHS)
def extracted(request, ds, tmp_path_factory):
    """(activation root, {(split, form, site): [batch hidden units (rows, T, width) float64]}, sites)."""
    arch = request.param
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 512)
    spec = TinySpec(arch=arch, **SMALL)
    model, processor = build_tiny_model(spec, tok, seed=5).eval(), build_processor(spec, tok)
    streams = {k: v[: COUNTS[k]] for k, v in build_streams(ds, retain_size=None).items()}
    sites = mlp_sites(model)
    raw: dict = {s: [] for s in sites}  # per site, its batches in forward order
    handles = [model.get_submodule(MLP_BLOCKS[arch, s.tower].format(s.layer)).register_forward_pre_hook(
        lambda m, a, s=s: raw[s].append(_hidden(m, a[0]).double().numpy())) for s in sites]
    root = tmp_path_factory.mktemp(f"positions-{arch}") / "acts"
    try:
        extract_activations(model, processor, streams, root, batch_size=BATCH, position_stats=True, progress=False)
    finally:
        for h in handles:
            h.remove()
    seen = {}  # streams run in (split, form) order; the vision tower does not run on text
    for s in sites:
        batches = iter(raw[s])
        for split, form in sorted(COUNTS):
            if s.tower == "language" or form == "multimodal":
                seen[(split, form, s)] = [next(batches) for _ in range(-(-COUNTS[(split, form)] // BATCH))]
        assert next(batches, None) is None
    return root, seen, sites


def per_position(x):
    """(rows, T, width) -> {stat: (T, width)} over the rows at each position (one row: std NaN)."""
    a = np.abs(x)
    std = x.std(0, ddof=1) if len(x) > 1 else np.full(x.shape[1:], np.nan)
    return {"abs": a.mean(0), "freq": (a > TAU).mean(0), "std": std, "rms": np.sqrt((x * x).mean(0))}


def chunked(batches):
    """The released averaging: per chunk of 10 batches, the per-position values concatenated and
    averaged; then the chunk means averaged. batches: [{stat: (T, width)}]. A one-row batch's std
    (all NaN) is left out of its chunk's std."""
    chunks = [batches[i : i + CHUNK] for i in range(0, len(batches), CHUNK)]
    out = {}
    for k in STATS:
        parts = [[b[k] for b in c if not (k == "std" and np.isnan(b[k]).all())] for c in chunks]
        out[k] = np.mean([np.concatenate(p).mean(0) for p in parts], 0)
    return out


def reference_stats(seen, sites):
    """{(split, form, tower, layer or -1): {stat: (width,)}}."""
    out = {}
    for split, form in COUNTS:
        live = [s for s in sites if (split, form, s) in seen]
        for s in live:
            out[(split, form, s.tower, s.layer)] = chunked([per_position(x) for x in seen[(split, form, s)]])
        for tower in sorted({s.tower for s in live}):
            layers = [s for s in live if s.tower == tower]
            n = len(seen[(split, form, layers[0])])
            stacked = [np.concatenate([seen[(split, form, s)][b] for s in layers]) for b in range(n)]
            out[(split, form, tower, -1)] = chunked([per_position(x) for x in stacked])
    return out


def test_position_statistics_match_the_reference(extracted):
    root, seen, sites = extracted
    assert "position statistics (the released mode's per_position): 6 positions-*.parquet" in format_summary(
        inspect_activations(root))  # forget and retain: language and vision on image+text, language on text
    want = reference_stats(seen, sites)
    got = position_statistics(root)
    assert got is not None
    keys = set(got.select("split", "form", "tower", "layer").unique().iter_rows())
    assert keys == set(want)
    for (split, form, tower, layer), ref in want.items():
        g = got.filter((pl.col("split") == split) & (pl.col("form") == form) & (pl.col("tower") == tower)
                       & (pl.col("layer") == layer)).sort("unit")
        for k in STATS:
            np.testing.assert_allclose(g[f"pos_{k}"].to_numpy(), ref[k], rtol=1e-9, atol=1e-12,
                                       err_msg=f"{split}/{form} {tower} {layer} {k}")


def kfloor(alpha, n):
    return math.floor(Fraction(repr(alpha)) * n)


def reference_released(seen, sites, alpha, pool):
    """{(tower, layer, unit): score} and the selected set."""
    stats = reference_stats(seen, sites)
    scores, selected = {}, set()
    for tower in sorted({s.tower for s in sites}):
        form = "multimodal" if tower == "vision" else "text"
        layers = sorted(s.layer for s in sites if s.tower == tower)
        groups = [(-1, layers[-3:])] if pool else [(l, [l]) for l in layers]
        tower_scores = {}
        for source, targets in groups:
            f, r = stats[("forget", form, tower, source)], stats[("retain", form, tower, source)]
            score = sum(W[k] * (f[k] / (r[k] + EPS) - 1) for k in STATS)
            for layer in targets:
                tower_scores.update({(tower, layer, u): v for u, v in enumerate(score)})
        k = kfloor(alpha, len(tower_scores))
        if k:
            threshold = sorted(tower_scores.values(), reverse=True)[k - 1]
            selected |= {key for key, v in tower_scores.items() if v >= threshold}
        scores.update(tower_scores)
    return scores, selected


@pytest.mark.parametrize("pool", [False, True], ids=["per-layer", "pool_layers"])
@pytest.mark.parametrize("alpha", [0.1])
def test_released_per_position_scores_and_selection_match_the_reference(extracted, pool, alpha):
    root, seen, sites = extracted
    options = {"per_position": True, "pool_layers": pool}
    table = importance_table(neuron_sums(root, 0.1), ImportanceParams(alpha=alpha, mode="released", options=options))
    want, selected = reference_released(seen, sites, alpha, pool)
    scored = table.filter(pl.col("score").is_not_null())
    keys = list(zip(scored["tower"], scored["layer"], scored["unit"]))
    assert set(keys) == set(want)
    np.testing.assert_allclose(scored["score"].to_numpy(), [want[k] for k in keys], rtol=1e-9, atol=1e-12)
    picked = table.filter(pl.col("selected"))
    assert set(zip(picked["tower"], picked["layer"], picked["unit"])) == selected


def test_per_position_without_position_statistics_is_an_error_naming_the_fix(extracted, tmp_path):
    import shutil

    root, _, _ = extracted
    bare = tmp_path / "acts"
    shutil.copytree(root, bare)
    for f in bare.glob("split=*/form=*/tower=*/positions-*.parquet"):
        f.unlink()
    sums = neuron_sums(bare, 0.1)
    with pytest.raises(ActivationStoreError, match="position_stats=True"):
        importance_table(sums, ImportanceParams(mode="released", options={"per_position": True}))
    # without the option the same store scores as before
    assert importance_table(sums, ImportanceParams(mode="released")).height == sums.select(
        "tower", "layer", "unit").unique().height


def test_batches_of_one_row_have_no_std_and_scoring_says_so(ds, tmp_path):
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 512)
    spec = TinySpec(**SMALL)
    model, processor = build_tiny_model(spec, tok, seed=5).eval(), build_processor(spec, tok)
    streams = {k: v[:3] for k, v in build_streams(ds, retain_size=None).items()}
    root = extract_activations(model, processor, streams, tmp_path / "acts", batch_size=1, position_stats=True,
                               progress=False)
    with pytest.raises(ValueError, match="batches of at least 2 rows"):
        importance_table(neuron_sums(root, 0.1), ImportanceParams(mode="released", options={"per_position": True}))


def test_per_position_option_is_checked():
    with pytest.raises(ValueError, match="per_position must be true or false"):
        ImportanceParams(mode="released", options={"per_position": "yes"})
