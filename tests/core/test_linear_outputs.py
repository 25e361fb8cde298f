"""The released code's hook sites (`released` option `linear_outputs`): the outputs of every Linear of
each MLP block, scored and pruned as output rows, against a numpy reference written from their
description (docs/method.md, "Mode `released`"), not from the code.

The reference hooks each Linear itself (gate_proj, up_proj, down_proj; fc1, fc2) and keeps its whole
output per batch; the inputs are the same batches the extraction encodes. Statistics: per token over
each stream's counted positions (language: the attention mask; vision: every patch), or (per_position)
the released code's per-position statistics over the rows of each batch, padding included, pooled per
module over a tower's layers with pool_layers. Vision units on the image+text streams, language units
on the text streams; score Σ_k w_k (F_k/(R_k + ε) − 1); per tower, one threshold over every hooked
module: the units scoring ≥ the ⌊α·N⌋-th largest score. Pruning zeroes output rows (and bias entries).
Per architecture (option sites="authors" with the model's type): on Idefics2 the released code hooks only
fc1 of the vision MLPs and names vision layers 21-23 of 27 (docs/method.md, "Per architecture").
"""

import copy

import numpy as np
import polars as pl
import pytest
import torch

from manu_core import data as mdata
from manu_core.arch import mlp_sites
from manu_core.extract import build_streams, extract_activations
from manu_core.importance import ImportanceParams, importance_table, neuron_sums, write_importance
from manu_core.models import ARCHS, TinySpec, build_processor, build_tiny_model, train_tokenizer
from manu_core.prompts import encode_samples
from manu_core.prune import PruneError, prune_units, pruned_weights_are_zero
from manu_core.store import OUTPUTS_DIR, format_summary, inspect_activations, read_layout
from tests.core.helpers import SMALL
from tests.core.test_extract import MLP_BLOCKS
from tests.core.test_position_stats import BATCH, COUNTS, EPS, STATS, TAU, W, chunked, kfloor, per_position

pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = {"language": ("gate_proj", "up_proj", "down_proj"), "vision": ("fc1", "fc2")}
ALPHA = 0.1


@pytest.fixture(scope="module")
def ds():
    return mdata.build_dataset(forget=["001", "002"], n_profiles=5, n_celebrities=0)


def tiny(ds, arch, **sizes):
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 512)
    spec = TinySpec(arch=arch, **{**SMALL, **sizes})
    return build_tiny_model(spec, tok, seed=5).eval(), build_processor(spec, tok)


@pytest.fixture(scope="module", params=ARCHS)
def extracted(request, ds, tmp_path_factory):
    """(store root, {(split, form, tower, layer, module): [batch outputs float64]}, {(split, form): [masks]},
    layers per tower, model)."""
    arch = request.param
    model, processor = tiny(ds, arch)
    streams = {k: v[: COUNTS[k]] for k, v in build_streams(ds, retain_size=None).items()}
    # the released code hooks every layer's Linears, LLaVA's dead last vision layer too
    layers = {t: sorted(s.layer for s in mlp_sites(model, towers=(t,), live_only=False)) for t in LINEARS}
    raw: dict = {}
    handles = []
    for tower, mods in LINEARS.items():
        for layer in layers[tower]:
            for m in mods:
                lin = model.get_submodule(MLP_BLOCKS[arch, tower].format(layer) + f".{m}")
                raw[(tower, layer, m)] = []
                handles.append(lin.register_forward_hook(
                    lambda mod, a, out, k=(tower, layer, m): raw[k].append(out.detach().double().numpy())))
    root = tmp_path_factory.mktemp(f"outputs-{arch}") / "acts"
    try:
        extract_activations(model, processor, streams, root, batch_size=BATCH, position_stats=True,
                            linear_outputs=True, progress=False)
    finally:
        for h in handles:
            h.remove()
    seen, masks = {}, {}
    for split, form in sorted(COUNTS):  # the extraction's order: streams sorted, batches in order
        chunks = [streams[(split, form)][i : i + BATCH] for i in range(0, COUNTS[(split, form)], BATCH)]
        encoded = [encode_samples(processor, c) for c in chunks]
        masks[(split, form)] = [e["attention_mask"].bool().numpy() for e in encoded]
        for e in encoded:  # every patch of every image counts: no image here has padding patches
            assert "pixel_attention_mask" not in e or bool(e["pixel_attention_mask"].all())
    for key, batches in raw.items():
        it = iter(batches)
        for split, form in sorted(COUNTS):
            if key[0] == "language" or form == "multimodal":
                seen[(split, form, *key)] = [next(it) for _ in masks[(split, form)]]
        assert next(it, None) is None
    return root / OUTPUTS_DIR, seen, masks, layers, model


def token_stats(seen, masks, split, form, tower, layer, module):
    """Statistics over the counted tokens of a stream (language: attention mask; vision: every patch)."""
    batches = seen[(split, form, tower, layer, module)]
    if tower == "language":
        tokens = np.concatenate([x[m] for x, m in zip(batches, masks[(split, form)])])
    else:
        tokens = np.concatenate([x.reshape(-1, x.shape[-1]) for x in batches])
    a = np.abs(tokens)
    return {"abs": a.mean(0), "freq": (a > TAU).mean(0), "std": tokens.std(0, ddof=1),
            "rms": np.sqrt((tokens * tokens).mean(0))}


def position_stats(seen, split, form, tower, layers, module):
    """The released per-position statistics of `module` over `layers` stacked (one layer: itself)."""
    n = len(seen[(split, form, tower, layers[0], module)])
    stacked = [np.concatenate([seen[(split, form, tower, l, module)][b] for l in layers]) for b in range(n)]
    return chunked([per_position(x) for x in stacked])


def reference(seen, masks, layers, per_pos, pool, linears=LINEARS):
    """{(tower, layer, module, row): score}, the selected keys, and the smallest gap between a tower's
    threshold score and the next lower one. `linears`: the modules hooked per tower."""
    scores, selected, margin = {}, set(), np.inf
    for tower, mods in linears.items():
        form = "multimodal" if tower == "vision" else "text"
        tower_scores = {}
        for module in mods:
            groups = [(layers[tower], layers[tower][-3:])] if pool else [([l], [l]) for l in layers[tower]]
            for source, targets in groups:
                if per_pos:
                    f, r = (position_stats(seen, s, form, tower, source, module) for s in ("forget", "retain"))
                else:
                    f, r = (token_stats(seen, masks, s, form, tower, source[0], module) for s in ("forget", "retain"))
                score = sum(W[k] * (f[k] / (r[k] + EPS) - 1) for k in STATS)
                for layer in targets:
                    tower_scores.update({(tower, layer, module, u): v for u, v in enumerate(score)})
        ordered = sorted(tower_scores.values(), reverse=True)
        k = kfloor(ALPHA, len(ordered))
        selected |= {key for key, v in tower_scores.items() if v >= ordered[k - 1]}
        below = [v for v in ordered[k:] if v < ordered[k - 1]]  # pooled: a row's score repeats, exactly, per layer
        margin = min(margin, ordered[k - 1] - below[0]) if below else margin
        scores.update(tower_scores)
    return scores, selected, margin


def keys(df):
    return list(zip(df["tower"], df["layer"], df["module"], df["row"]))


def test_the_sub_store_holds_every_linear_output_and_leaves_the_hidden_units_alone(extracted, ds, tmp_path):
    root, seen, _, layers, model = extracted
    layout = read_layout(root)
    mlp = {t: model.get_submodule(MLP_BLOCKS[model.config.model_type, t].format(0)) for t in LINEARS}
    assert layout == {t: [(m, getattr(mlp[t], m).out_features) for m in mods] for t, mods in LINEARS.items()}
    widths = {p.tower: p.width for p in inspect_activations(root).partitions}
    assert widths == {t: sum(w for _, w in layout[t]) for t in LINEARS}
    stored = lambda r: {p.layer for p in inspect_activations(r).partitions if p.tower == "vision"}
    live = {s.layer for s in mlp_sites(model, towers=("vision",))}
    assert stored(root) == set(layers["vision"]) and stored(root.parent) == live  # dead layers: here only
    assert (live < set(layers["vision"])) == (model.config.model_type == "llava")
    assert f"{OUTPUTS_DIR}/: the MLP Linears' outputs" in format_summary(inspect_activations(root.parent))
    # the per-sample means of the sub-store: each module's output averaged over the counted tokens
    first = seen[("forget", "text", "language", 0, "down_proj")][0]
    stored = pl.read_parquet(root / "split=forget/form=text/tower=language/layer=0/part-00000.parquet")
    offset = sum(w for m, w in layout["language"] if m in ("gate_proj", "up_proj"))
    got = np.stack(stored["activation"].to_list()[:BATCH])[:, offset:]
    mask = extracted[2][("forget", "text")][0]
    want = np.stack([x[m].mean(0) for x, m in zip(first, mask)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the hidden-unit store is the same, byte for byte, as an extraction without the option
    if model.config.model_type == "llava":
        m2, p2 = tiny(ds, "llava")
        streams = {k: v[: COUNTS[k]] for k, v in build_streams(ds, retain_size=None).items()}
        plain = extract_activations(m2, p2, streams, tmp_path / "plain", batch_size=BATCH, position_stats=True,
                                    progress=False)
        files = sorted(p.relative_to(plain) for p in plain.rglob("*.parquet"))
        assert files == sorted(p.relative_to(root.parent) for p in root.parent.rglob("*.parquet")
                               if OUTPUTS_DIR not in p.parts)
        assert all((plain / f).read_bytes() == (root.parent / f).read_bytes() for f in files)


@pytest.mark.parametrize("per_pos,pool", [(False, False), (True, False), (True, True)],
                         ids=["tokens", "per_position", "per_position+pool_layers"])
def test_released_linear_outputs_scores_and_selection_match_the_reference(extracted, per_pos, pool):
    root, seen, masks, layers, _ = extracted
    options = {"linear_outputs": True, "per_position": per_pos, "pool_layers": pool}
    table = importance_table(neuron_sums(root, 0.1), ImportanceParams(alpha=ALPHA, mode="released", options=options))
    want, selected, margin = reference(seen, masks, layers, per_pos, pool)
    scored = table.filter(pl.col("score").is_not_null())
    assert set(keys(scored)) == set(want)
    # per_position: float64 moments in the hooks, as the reference; token statistics: the hooks add each
    # sample's tokens in float32 (store.py), so about 1e-6 there (the synthetic stores of
    # test_scoring_modes.py check this same scoring to 1e-9), and a threshold margin wider than that
    rtol, atol = (1e-9, 1e-12) if per_pos else (1e-5, 1e-6)
    np.testing.assert_allclose(scored["score"].to_numpy(), [want[k] for k in keys(scored)], rtol=rtol, atol=atol)
    assert margin > 10 * atol
    picked = table.filter(pl.col("selected"))
    assert set(keys(picked)) == selected
    # one threshold per tower over every module: each tower's share is ⌊α·N⌋ (ties aside), spread over modules
    assert set(picked["module"]) - {"gate_proj", "up_proj", "down_proj", "fc1", "fc2"} == set()


@pytest.mark.parametrize("per_pos,pool", [(False, False), (True, False), (True, True)],
                         ids=["tokens", "per_position", "per_position+pool_layers"])
def test_per_architecture_idefics2_scores_vision_fc1_only_and_llava_is_unchanged(extracted, per_pos, pool):
    """With the model's type (sites="authors", the default): Idefics2's vision tower is scored on its fc1
    outputs only, as the released code hooks it, against the reference hooking fc1 only; LLaVA's table is
    the one without model_type, byte for byte. (Two vision layers: the window is both, as the last three.)"""
    root, seen, masks, layers, model = extracted
    arch = model.config.model_type
    params = ImportanceParams(alpha=ALPHA, mode="released",
                              options={"linear_outputs": True, "per_position": per_pos, "pool_layers": pool})
    sums = neuron_sums(root, 0.1)
    table, before = importance_table(sums, params, model_type=arch), importance_table(sums, params)
    if arch == "llava":
        assert table.equals(before, null_equal=True)
        return
    linears = {**LINEARS, "vision": ("fc1",)}
    assert set(zip(table["tower"], table["module"])) == {("language", m) for m in LINEARS["language"]} | {("vision", "fc1")}
    assert table.filter(pl.col("tower") == "vision").height == sum(
        seen[("forget", "multimodal", "vision", l, "fc1")][0].shape[-1] for l in layers["vision"])
    want, selected, margin = reference(seen, masks, layers, per_pos, pool, linears)
    scored = table.filter(pl.col("score").is_not_null())
    assert set(keys(scored)) == set(want)
    rtol, atol = (1e-9, 1e-12) if per_pos else (1e-5, 1e-6)
    np.testing.assert_allclose(scored["score"].to_numpy(), [want[k] for k in keys(scored)], rtol=rtol, atol=atol)
    assert margin > 10 * atol
    assert set(keys(table.filter(pl.col("selected")))) == selected
    # the language tower is scored as before; sites="uniform" gives the table without model_type back
    lang = lambda t: t.filter(pl.col("tower") == "language").drop("rank", "selected")
    assert lang(table).equals(lang(before), null_equal=True)
    uniform = ImportanceParams(alpha=ALPHA, mode="released", options={**dict(params.options), "sites": "uniform"})
    assert importance_table(sums, uniform, model_type=arch).equals(before, null_equal=True)


def test_idefics2_authors_layers_on_a_deeper_vision_tower(ds, tmp_path):
    """Seven vision layers: the released code's vision 21-23 of 27 map to layers 1-3 of 7 (n−6..n−4), not
    the last three (4-6); pooled over every layer, fc1 outputs only; pruning and the random control stay
    on those fc1 rows."""
    from manu_core.unlearn import random_selection

    model, processor = tiny(ds, "idefics2", vision_layers=7)
    streams = {k: v[: COUNTS[k]] for k, v in build_streams(ds, retain_size=None).items()}
    acts = extract_activations(model, processor, streams, tmp_path / "acts", batch_size=BATCH, linear_outputs=True,
                               progress=False)
    sums = neuron_sums(acts / OUTPUTS_DIR, 0.1)
    pooled = {"linear_outputs": True, "pool_layers": True}
    authors = importance_table(sums, ImportanceParams(alpha=ALPHA, mode="released", options=pooled),
                               model_type="idefics2")
    uniform = importance_table(sums, ImportanceParams(alpha=ALPHA, mode="released", options={**pooled, "sites": "uniform"}),
                               model_type="idefics2")
    scored = lambda t, tower: t.filter((pl.col("tower") == tower) & pl.col("score").is_not_null())
    assert sorted(set(scored(authors, "vision")["layer"])) == [1, 2, 3]
    assert sorted(set(scored(uniform, "vision")["layer"])) == [4, 5, 6]
    assert sorted(set(scored(authors, "language")["layer"])) == sorted(set(scored(uniform, "language")["layer"])) == [0, 1]
    assert set(authors.filter(pl.col("tower") == "vision")["module"]) == {"fc1"}
    assert set(uniform.filter(pl.col("tower") == "vision")["module"]) == {"fc1", "fc2"}
    # one pooled score per fc1 row, whichever layers it lands on
    by_row = lambda t: dict(zip(zip(t["layer"], t["row"]), t["score"]))
    a = by_row(scored(authors, "vision"))
    u = by_row(scored(uniform, "vision").filter(pl.col("module") == "fc1"))
    assert a == {(layer - 3, row): v for (layer, row), v in u.items()}
    # the threshold runs over the 3 × fc1-width scored values: ⌊α·N⌋ of them (ties: whole rows, 3 layers)
    width = model.get_submodule(MLP_BLOCKS["idefics2", "vision"].format(0)).fc1.out_features
    picked = authors.filter((pl.col("tower") == "vision") & pl.col("selected"))
    assert len(scored(authors, "vision")) == 3 * width
    assert picked.height == 3 * -(-kfloor(ALPHA, 3 * width) // 3)  # a row is picked in all three layers
    assert set(picked["module"]) == {"fc1"} and set(picked["layer"]) == {1, 2, 3}
    drawn = random_selection(authors, 0, "tower")
    assert set(drawn.filter(pl.col("selected") & (pl.col("tower") == "vision"))["module"]) == {"fc1"}
    pruned = copy.deepcopy(model)
    report = prune_units(pruned, authors)
    assert pruned_weights_are_zero(pruned, authors) and report.n_pruned == int(authors["selected"].sum())
    for layer in range(7):
        mlp, before = pruned.get_submodule(MLP_BLOCKS["idefics2", "vision"].format(layer)), \
            model.get_submodule(MLP_BLOCKS["idefics2", "vision"].format(layer))
        assert torch.equal(mlp.fc2.weight, before.fc2.weight)  # fc2 never pruned
        zeroed = {r for r in range(width) if not mlp.fc1.weight[r].any()}
        assert zeroed == set(picked.filter(pl.col("layer") == layer)["row"])


def test_pruning_zeroes_output_rows_and_the_random_control_keeps_them(extracted, tmp_path):
    from manu_core.unlearn import random_selection

    root, _, _, _, vanilla = extracted
    arch, model = vanilla.config.model_type, copy.deepcopy(vanilla)  # the fixture's model stays as extracted
    table = importance_table(neuron_sums(root, 0.1),
                             ImportanceParams(alpha=ALPHA, mode="released", options={"linear_outputs": True}))
    path = write_importance(table, tmp_path / "importance.parquet")
    table = pl.read_parquet(path)  # module and row survive the file
    assert {"module", "row"} <= set(table.columns)
    drawn = random_selection(table, 0, "tower")  # keeps module and row: prune_units zeroes output rows for it too
    assert drawn.select("module", "row").equals(table.select("module", "row"))
    assert dict(drawn.group_by("tower").agg(pl.col("selected").sum()).iter_rows()) == dict(
        table.group_by("tower").agg(pl.col("selected").sum()).iter_rows())
    assert not pruned_weights_are_zero(model, table)
    report = prune_units(model, table)
    assert pruned_weights_are_zero(model, table)
    assert report.n_pruned == int(table["selected"].sum())
    assert report.n_units == table.height  # every live layer's Linear outputs
    rows = table.filter(pl.col("selected") & (pl.col("module") == "down_proj"))
    assert rows.height  # residual-stream channels are among the selected
    for layer, row in zip(rows["layer"], rows["row"]):
        lin = model.get_submodule(MLP_BLOCKS[arch, "language"].format(layer) + ".down_proj")
        assert not lin.weight[row].any() and lin.weight.any()


@pytest.mark.parametrize("arch", ARCHS)
def test_hand_cases_down_proj_row_is_a_residual_channel_gate_and_up_rows_silence_a_unit(ds, arch):
    model, _ = tiny(ds, arch)
    mlp_path = MLP_BLOCKS[arch, "language"].format(0)
    mlp = model.get_submodule(mlp_path)
    x = torch.randn(3, 5, mlp.down_proj.out_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, hidden_before = mlp(x), mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    sel = pl.DataFrame({"tower": ["language"] * 3, "layer": [0] * 3, "module": ["down_proj", "gate_proj", "up_proj"],
                        "row": [2, 4, 7], "selected": [True] * 3})
    prune_units(model, sel)
    with torch.no_grad():
        after, hidden = mlp(x), mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    assert not after[..., 2].any()  # residual channel 2 gets nothing from this MLP, whatever its units do
    assert not hidden[..., 4].any() and not hidden[..., 7].any()  # act(0)·up = 0 and act(gate)·0 = 0
    assert mlp.up_proj.weight[4].any() and mlp.gate_proj.weight[7].any()  # gate and up rows masked independently
    keep = [u for u in range(hidden.shape[-1]) if u not in (4, 7)]
    torch.testing.assert_close(hidden[..., keep], hidden_before[..., keep], rtol=0, atol=0)
    assert not torch.equal(after[..., 3], before[..., 3])  # other channels lose units 4 and 7's share only
    # a plain MLP (the vision tower): fc2's row and its bias entry
    vis = model.get_submodule(MLP_BLOCKS[arch, "vision"].format(0))
    y = torch.randn(2, 4, vis.fc2.out_features, generator=torch.Generator().manual_seed(1))
    prune_units(model, pl.DataFrame({"tower": ["vision"], "layer": [0], "module": ["fc2"], "row": [1]}))
    assert vis.fc2.bias[1] == 0
    with torch.no_grad():
        assert not vis(y)[..., 1].any() and vis(y)[..., 0].any()


def test_bad_output_rows_name_the_rule(ds):
    model, _ = tiny(ds, "llava")
    bad_module = pl.DataFrame({"tower": ["language"], "layer": [0], "module": ["fc1"], "row": [0]})
    with pytest.raises(PruneError, match="module 'fc1' of language layer 0, whose MLP has gate_proj, up_proj, down_proj"):
        prune_units(model, bad_module)
    width = model.get_submodule(MLP_BLOCKS["llava", "language"].format(0)).down_proj.out_features
    too_far = pl.DataFrame({"tower": ["language"], "layer": [0], "module": ["down_proj"], "row": [width]})
    with pytest.raises(PruneError, match=f"output row {width} of language layer 0 down_proj is out of range"):
        prune_units(model, too_far)


def test_the_sums_must_match_the_option(extracted):
    root = extracted[0]
    outputs, hidden = neuron_sums(root, 0.1), neuron_sums(root.parent, 0.1)
    with pytest.raises(ValueError, match="these are the sums of hidden units"):
        importance_table(hidden, ImportanceParams(mode="released", options={"linear_outputs": True}))
    for mode in ("paper", "released", "selective"):
        with pytest.raises(ValueError, match="only the released mode's linear_outputs option scores"):
            importance_table(outputs, ImportanceParams(mode=mode))
    with pytest.raises(ValueError, match="linear_outputs must be true or false"):
        ImportanceParams(mode="released", options={"linear_outputs": "yes"})


def test_manu_unlearn_extracts_what_the_options_read(ds, tmp_path):
    from manu_core.unlearn import manu_unlearn

    model, processor = tiny(ds, "llava")
    streams = {k: v[:4] for k, v in build_streams(ds, retain_size=None).items()}
    params = ImportanceParams(alpha=ALPHA, mode="released", options={"linear_outputs": True, "per_position": True})
    res = manu_unlearn(model, processor, streams, tmp_path, params, batch_size=2, progress=False)
    assert read_layout(res.activations / OUTPUTS_DIR) is not None
    assert sorted(res.activations.glob(f"{OUTPUTS_DIR}/split=*/form=*/tower=*/positions-*.parquet"))
    table = pl.read_parquet(res.importance)
    assert res.report.n_pruned == int(table["selected"].sum()) and res.report.n_units == table.height
    assert pruned_weights_are_zero(model, table)
