"""Activation extraction: hooks, per-sample reductions, padding, streams, store layout, crash safety."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from manu_core import data as mdata
from manu_core import extract as mextract
from manu_core.arch import get_adapter, mlp_sites
from manu_core.extract import (
    ExtractionError,
    activation_hooks,
    build_streams,
    extract_activations,
    extract_stream,
    position_mask,
)
from manu_core.models import ARCHS, TinySpec, build_processor, build_tiny_model, train_tokenizer
from manu_core.prompts import encode_samples, model_inputs
from manu_core.store import check_complete, inspect_activations, read_token_totals
from tests.core.helpers import SMALL, tiny_qwen2_vl


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ds():
    return mdata.build_dataset(forget=["001", "002"], n_profiles=5, n_celebrities=0)


@pytest.fixture(scope="module")
def models(ds):
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 512)
    out = {}
    for arch in ARCHS:
        spec = TinySpec(arch=arch, **SMALL)
        out[arch] = (build_tiny_model(spec, tok, seed=3).eval(), build_processor(spec, tok))
    return out


@pytest.fixture(scope="module")
def streams(ds):
    """The four streams, cut to a few samples each (keeps whole-extraction tests fast)."""
    return {k: v[:5] for k, v in build_streams(ds).items()}


def form_samples(ds, form, n=None):
    out = [s for p in ds.profiles for s in mdata.samples(p, (form,))]
    return out[:n] if n else out


# Where each architecture's MLP blocks are, written here from the models' own module trees (not
# from manu_core.arch), so the reference does not reuse the implementation's hook sites.
MLP_BLOCKS = {("llava", "language"): "model.language_model.layers.{}.mlp",
              ("llava", "vision"): "model.vision_tower.encoder.layers.{}.mlp",
              ("idefics2", "language"): "model.text_model.layers.{}.mlp",
              ("idefics2", "vision"): "model.vision_model.encoder.layers.{}.mlp",
              ("qwen2_vl", "language"): "model.language_model.layers.{}.mlp",
              ("qwen2_vl", "vision"): "model.visual.blocks.{}.mlp"}


def _hidden(mlp, x: torch.Tensor) -> torch.Tensor:
    """The MLP's hidden units computed from its input: act(gate(x))·up(x) (gated: Llama, Mistral,
    Qwen2) or act(fc1(x)) (plain: CLIP, SigLIP, Qwen2-VL's vision blocks)."""
    if hasattr(mlp, "gate_proj"):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    act = mlp.activation_fn if hasattr(mlp, "activation_fn") else mlp.act  # Qwen2-VL's VisionMlp: `act`
    return act(mlp.fc1(x))


def capture(model, sites, enc):
    """Reference: every site's full (.., d_mlp) hidden units, recomputed from the MLP block's input."""
    caps = {}
    arch = model.config.model_type
    handles = [model.get_submodule(MLP_BLOCKS[arch, s.tower].format(s.layer)).register_forward_pre_hook(
        lambda m, a, s=s: caps.__setitem__(s, _hidden(m, a[0]).detach().clone())) for s in sites]
    try:
        with torch.no_grad():
            model(**model_inputs(enc))
    finally:
        for h in handles:
            h.remove()
    return caps


def n_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ----------------------------------------------------------------------------------------------
# Reductions


def test_position_mask_hand_case():
    batch = {
        "input_ids": torch.zeros(2, 6, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]),  # right- and left-padded rows
        "answer_mask": torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool),
    }
    assert position_mask(batch, "mean").int().tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert position_mask(batch, "answer").int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    assert position_mask(batch, "last").int().tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]]
    with pytest.raises(ExtractionError, match="leaves no position for batch row"):
        position_mask({**batch, "answer_mask": torch.zeros(2, 6, dtype=torch.bool)}, "answer")
    with pytest.raises(ExtractionError, match="Unknown aggregation 'answers'. Did you mean 'answer'"):
        position_mask(batch, "answers")


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_direct_computation_for_every_aggregation(ds, models, arch):
    """mean / answer / last against the full activation tensors; vision = mean of every position
    (LLaVA: CLS + 16 patches; Idefics2: 16 patches)."""
    model, proc = models[arch]
    sites = mlp_sites(model)
    ss = form_samples(ds, "multimodal", 5)
    enc = encode_samples(proc, ss)
    caps = capture(model, sites, enc)
    attn, ans = enc["attention_mask"].bool(), enc["answer_mask"]
    last = attn.sum(1) - 1  # right padding
    for agg in ("mean", "answer", "last"):
        got = extract_stream(model, proc, ss, aggregation=agg, batch_size=5, progress=False)
        assert set(got) == set(sites)
        for s in sites:
            x = caps[s].double()
            if s.tower == "vision":
                assert x.shape[1] == (17 if arch == "llava" else 16)
                ref = x.mean(1)
            elif agg == "mean":
                ref = torch.stack([x[b][attn[b]].mean(0) for b in range(len(ss))])
            elif agg == "answer":
                ref = torch.stack([x[b][ans[b]].mean(0) for b in range(len(ss))])
            else:
                ref = torch.stack([x[b, last[b]] for b in range(len(ss))])
            assert got[s].dtype == np.float32 and got[s].shape == (5, s.width)
            np.testing.assert_allclose(got[s], ref.numpy(), atol=1e-6, rtol=1e-5, err_msg=f"{agg} {s.name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_token_statistics_match_the_full_activations(ds, models, arch):
    """Per-sample token sums (store.py: Σ|a|, Σa², #(a>0), #(|a|>0.1), position counts, max |a|)
    against the full (B, T, d) tensors, over the counted positions only (right padding present)."""
    model, proc = models[arch]
    sites = mlp_sites(model)
    ss = form_samples(ds, "multimodal", 5)
    enc = encode_samples(proc, ss)
    caps = capture(model, sites, enc)
    attn = enc["attention_mask"].bool()
    assert not attn.all(), "the batch should have padding"
    [(chunk, acts, tok)] = list(mextract.iter_stream(model, proc, ss, batch_size=5, progress=False, token_stats=True))
    assert tok.tokens["language"].tolist() == attn.sum(1).tolist()
    for s in sites:
        x = caps[s].double()
        rows = [x[b] for b in range(len(ss))] if s.tower == "vision" else [x[b][attn[b]] for b in range(len(ss))]
        if s.tower == "vision":
            assert tok.tokens["vision"].tolist() == [r.shape[0] for r in rows]
        ref = {"abs": [r.abs().sum(0) for r in rows], "sq": [(r * r).sum(0) for r in rows],
               "pos": [(r > 0).sum(0).double() for r in rows], "active": [(r.abs() > 0.1).sum(0).double() for r in rows]}
        for k, v in ref.items():
            np.testing.assert_allclose(tok.stats[s][k], torch.stack(v).numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{k} {s.name}")
        np.testing.assert_allclose(acts[s] * np.asarray(tok.tokens[s.tower])[:, None],
                                   torch.stack([r.sum(0) for r in rows]).numpy(), rtol=1e-5, atol=1e-5)
        assert tok.max_abs[s] == pytest.approx(max(float(r.abs().max()) for r in rows), rel=1e-6)


def test_store_holds_token_statistics_and_means_only_without_them(tmp_path, streams, models):
    model, proc = models["llava"]
    with_tok = extract_activations(model, proc, streams, tmp_path / "tok", batch_size=4, progress=False)
    without = extract_activations(model, proc, streams, tmp_path / "plain", batch_size=4, progress=False,
                                  token_stats=False)
    a, b = inspect_activations(with_tok), inspect_activations(without)
    assert all(p.token_stats for p in a.partitions) and not any(p.token_stats for p in b.partitions)
    for p, q in zip(a.partitions, b.partitions):  # the same rows; the totals sit in the footer
        x, y = pl.read_parquet(p.parts[0].path), pl.read_parquet(q.parts[0].path)
        assert x.equals(y) and x.columns == ["sample_id", "profile_id", "activation"]
        t = read_token_totals(p.parts[0].path)
        assert read_token_totals(q.parts[0].path) is None
        assert t["samples"] == p.samples and t["max_abs"] > 0
        assert t["token_pos"].max() <= t["tokens"] and t["token_active"].max() <= t["tokens"]
    # the totals are the per-sample statistics of the stream, added up
    ss = streams[("forget", "text")]
    [(_, acts, tok)] = list(mextract.iter_stream(model, proc, ss, batch_size=len(ss), progress=False, token_stats=True))
    site = mlp_sites(model)[1]
    t = read_token_totals(a.get("forget", "text", site.tower, site.layer).parts[0].path)
    assert t["tokens"] == tok.tokens["language"].sum()
    np.testing.assert_allclose(t["token_sq"], tok.stats[site]["sq"].astype(np.float64).sum(0), rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_a_sample(ds, models, arch, side):
    model, proc = models[arch]
    for form in ("multimodal", "text"):
        ss = sorted(form_samples(ds, form), key=lambda s: len(s.question) + len(s.answer))
        short, long_ = ss[0], ss[-1]
        for agg in ("mean", "answer", "last"):
            kw = dict(aggregation=agg, padding_side=side, progress=False)
            alone = extract_stream(model, proc, [short], batch_size=1, **kw)
            padded = extract_stream(model, proc, [long_, short, ss[len(ss) // 2]], batch_size=3, **kw)
            assert set(alone) == set(padded)
            assert all(s.tower == "language" for s in alone) == (form == "text")
            for s in alone:
                np.testing.assert_allclose(padded[s][1], alone[s][0], atol=1e-5, rtol=0, err_msg=f"{form} {agg} {s.name}")


def test_prefetching_the_next_batch_changes_nothing(ds, models):
    model, proc = models["idefics2"]
    ss = form_samples(ds, "multimodal", 7)
    a = extract_stream(model, proc, ss, batch_size=3, prefetch=False, progress=False)
    b = extract_stream(model, proc, ss, batch_size=3, prefetch=True, progress=False)
    assert all(np.array_equal(a[s], b[s]) for s in a)


def test_prompt_only_forward(ds, models):
    model, proc = models["llava"]
    ss = form_samples(ds, "text", 3)
    with pytest.raises(ExtractionError, match="needs the batch's answer_mask|must include the answers"):
        extract_stream(model, proc, ss, aggregation="answer", with_answers=False, progress=False)
    a = extract_stream(model, proc, ss, with_answers=False, progress=False)
    b = extract_stream(model, proc, ss, with_answers=True, progress=False)
    s = mlp_sites(model)[0]
    assert a[s].shape == b[s].shape and not np.allclose(a[s], b[s])


# ----------------------------------------------------------------------------------------------
# Hooks


def test_hooks_are_gone_after_extraction_and_after_an_error(ds, models):
    model, proc = models["idefics2"]
    before = n_hooks(model)
    extract_stream(model, proc, form_samples(ds, "multimodal", 2), progress=False)
    assert n_hooks(model) == before == 0
    with pytest.raises(RuntimeError, match="boom"):
        with activation_hooks(model, mlp_sites(model)) as rec:
            assert n_hooks(model) == len(rec.sites) == 4
            raise RuntimeError("boom")
    assert n_hooks(model) == 0
    # an error raised inside a hook (vision-free batch run without set_batch) also cleans up
    with pytest.raises(ExtractionError, match="fired before `set_batch`"):
        with activation_hooks(model, mlp_sites(model, towers=("language",))):
            enc = encode_samples(proc, form_samples(ds, "text", 2))
            with torch.no_grad():
                model(**model_inputs(enc))
    assert n_hooks(model) == 0


def test_recorder_errors(ds, models):
    model, proc = models["llava"]
    enc = encode_samples(proc, form_samples(ds, "text", 2))
    with activation_hooks(model, mlp_sites(model)) as rec:
        with pytest.raises(ExtractionError, match="vision sites were given for a batch without images"):
            rec.set_batch(enc)
    with activation_hooks(model, mlp_sites(model, towers=("language",))) as rec:
        rec.set_batch(enc)
        with pytest.raises(ExtractionError, match="did not run in this forward"):
            rec.collect()


def test_extraction_leaves_model_mode_and_skips_lm_head(ds, models):
    model, proc = models["llava"]
    model.train()
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        extract_stream(model, proc, form_samples(ds, "text", 2), progress=False)
    finally:
        h.remove()
        was = model.training
        model.eval()
    assert was and not calls


# ----------------------------------------------------------------------------------------------
# Image layouts


def test_idefics2_layout_drops_padding_images_and_patches(models):
    model, _ = models["idefics2"]
    cfg = model.config
    pv = torch.randn(3, 2, 3, 64, 64)
    pv[0, 1] = 0  # sample 0 has one image (the second slot is padding), samples 1 and 2 two each
    pam = torch.ones(3, 2, 64, 64, dtype=torch.long)
    pam[2, 1, :, 32:] = 0  # right half of sample 2's second image is padding: 8 of its 16 patches
    lay = get_adapter(model).image_layout(cfg, {"input_ids": torch.zeros(3, 4, dtype=torch.long), "pixel_values": pv,
                                                 "pixel_attention_mask": pam})
    assert lay.image_sample.tolist() == [0, 1, 1, 2, 2]
    assert lay.positions.shape == (5, 16)
    assert lay.positions.sum(1).tolist() == [16, 16, 16, 16, 8]
    assert lay.positions[4].view(4, 4)[:, :2].all() and not lay.positions[4].view(4, 4)[:, 2:].any()


def test_qwen2_vl_needs_only_its_registry_entry():
    """Per-sample vision means for a third architecture, whose vision MLP sees (P, d) with all
    images' patches concatenated, through the same hooks."""
    torch.manual_seed(0)
    model = tiny_qwen2_vl().eval()
    ids = torch.full((2, 12), 5)
    ids[0, 1], ids[0, 2:6] = 150, 151  # image of 4x4 patches -> 4 tokens
    ids[1, 1], ids[1, 2:8] = 150, 151  # image of 4x6 patches -> 6 tokens
    am = torch.ones_like(ids)
    am[0, -2:] = 0
    enc = {"input_ids": ids, "attention_mask": am, "pixel_values": torch.randn(40, 3 * 2 * 8 * 8),
           "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 6]]), "mm_token_type_ids": (ids == 151).int()}
    sites = mlp_sites(model)
    caps = capture(model, sites, enc)
    with activation_hooks(model, sites) as rec, torch.no_grad():
        rec.set_batch(enc)
        model.model(**enc)
        got = rec.collect()
    for s in sites:
        x = caps[s]
        if s.tower == "vision":
            ref = torch.stack([x[:16].mean(0), x[16:].mean(0)])
        else:
            ref = torch.stack([x[0, :10].mean(0), x[1].mean(0)])
        np.testing.assert_allclose(got[s], ref.numpy(), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Streams and the store


def test_retain_subsample_seeded_and_sized():
    ds = mdata.build_dataset(forget=["001", "002"], n_profiles=12, n_celebrities=0)
    every = build_streams(ds, retain_size=None)
    a, b = build_streams(ds, seed=0), build_streams(ds, seed=0)
    c = build_streams(ds, seed=1)
    assert a == b and a != c
    for form in ("multimodal", "text"):
        assert a[("forget", form)] == every[("forget", form)]
        assert len(a[("retain", form)]) == len(a[("forget", form)]) < len(every[("retain", form)])
        assert set(a[("retain", form)]) <= set(every[("retain", form)])
        keep = [s for s in every[("retain", form)] if s in set(a[("retain", form)])]
        assert a[("retain", form)] == keep  # dataset order kept
        assert {s.profile_id for s in a[("retain", form)]} <= set(ds.split.retain_ids)
    pairs = lambda ss: {s.sample_id.rsplit("/", 1)[0] for s in ss}  # noqa: E731
    text, mm = pairs(a[("retain", "text")]), pairs(a[("retain", "multimodal")])
    assert len(text & mm) >= len(text) - 3  # the two forms ask about (nearly) the same facts
    assert all(len(v) == 7 for k, v in build_streams(ds, retain_size=7).items() if k[0] == "retain")
    with pytest.raises(ExtractionError, match="retain_size=10000 but the retain set has only"):
        build_streams(ds, retain_size=10000)
    with pytest.raises(ExtractionError, match="retain_size must be 'match', an integer >= 1 or None"):
        build_streams(ds, retain_size="all")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", ARCHS)
def test_store_layout_and_deterministic_bytes(tmp_path, streams, models, arch):
    model, proc = models[arch]
    a = extract_activations(model, proc, streams, tmp_path / "a", batch_size=4, progress=False)
    b = extract_activations(model, proc, streams, tmp_path / "b", batch_size=4, progress=False)
    fa, fb = _files(a), _files(b)
    assert fa == fb and any(k.endswith(".parquet") for k in fa)
    summary = inspect_activations(a)
    check_complete(summary)
    for p in summary.partitions:
        assert p.samples == len(streams[(p.split, p.form)])
    vision = {(p.split, p.form) for p in summary.partitions if p.tower == "vision"}
    language = {(p.split, p.form) for p in summary.partitions if p.tower == "language"}
    assert vision == {("forget", "multimodal"), ("retain", "multimodal")}  # vision only for multimodal
    assert language == {(s, f) for s in ("forget", "retain") for f in ("multimodal", "text")}
    live = {(s.tower, s.layer, s.width) for s in mlp_sites(model)}
    assert {(p.tower, p.layer, p.width) for p in summary.partitions} == live
    # rows hold the stream's samples in order, with the values extract_stream gives
    df = pl.read_parquet(a / "split=forget/form=text/tower=language/layer=1/part-00000.parquet")
    ss = streams[("forget", "text")]
    assert df["sample_id"].to_list() == [s.sample_id for s in ss]
    ref = extract_stream(model, proc, ss, batch_size=4, progress=False)[mlp_sites(model)[1]]
    np.testing.assert_array_equal(np.stack(df["activation"].to_list()), ref)


def test_parts_split_a_stream_without_changing_it(tmp_path, streams, models):
    model, proc = models["llava"]
    one = extract_activations(model, proc, streams, tmp_path / "one", batch_size=2, progress=False)
    many = extract_activations(model, proc, streams, tmp_path / "many", batch_size=2, part_rows=2, progress=False)
    part_dir = "split=forget/form=multimodal/tower=vision/layer=0"
    assert len(list((many / part_dir).glob("part-*.parquet"))) > 1
    for p in inspect_activations(one).partitions:
        rel = p.dir.relative_to(one)
        x = pl.read_parquet(one / rel / "*.parquet").select("sample_id", "activation")
        y = pl.read_parquet(many / rel / "*.parquet").select("sample_id", "activation")
        assert x.equals(y), rel
    with pytest.raises(ExtractionError, match="part_rows must be a multiple of batch_size"):
        extract_activations(model, proc, streams, tmp_path / "bad", batch_size=4, part_rows=6, progress=False)


def test_a_crash_never_leaves_a_partial_extraction(tmp_path, streams, models, monkeypatch):
    model, proc = models["llava"]
    root = tmp_path / "acts"
    good = _files(extract_activations(model, proc, streams, root, batch_size=4, progress=False))
    calls = {"n": 0}
    real = mextract.write_partition

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(mextract, "write_partition", flaky)
    with pytest.raises(OSError, match="disk full"):
        extract_activations(model, proc, streams, root, batch_size=4, aggregation="last", progress=False)
    assert _files(root) == good  # the previous complete extraction is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts"]  # no temporary folder left
    with pytest.raises(OSError, match="disk full"):
        calls["n"] = 0
        extract_activations(model, proc, streams, tmp_path / "fresh", batch_size=4, progress=False)
    assert not (tmp_path / "fresh").exists()


def test_bad_stream_inputs(tmp_path, ds, models):
    model, proc = models["llava"]
    mm = form_samples(ds, "multimodal", 2)
    with pytest.raises(ExtractionError, match="stream keys must be"):
        extract_activations(model, proc, {("forgotten", "text"): mm}, tmp_path / "x", progress=False)
    with pytest.raises(ExtractionError, match="holds samples of another form"):
        extract_activations(model, proc, {("forget", "text"): mm}, tmp_path / "x", progress=False)
    with pytest.raises(ExtractionError, match="mixes multimodal and text-only"):
        extract_stream(model, proc, mm + form_samples(ds, "text", 1), progress=False)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        extract_activations(model, proc, ds, tmp_path / "x", dtype="float33", progress=False)


def test_dataset_input_builds_the_four_streams(tmp_path, models):
    ds = mdata.build_dataset(forget=["001"], n_profiles=3, n_celebrities=0)
    model, proc = models["idefics2"]
    root = extract_activations(model, proc, ds, tmp_path / "acts", batch_size=16, retain_size=3, seed=4, progress=False)
    want = {k: len(v) for k, v in build_streams(ds, retain_size=3, seed=4).items()}
    got = {(p.split, p.form): p.samples for p in inspect_activations(root).partitions}
    assert got == want and want[("retain", "text")] == 3


def test_idefics2_several_images_padding_images_and_padding_patches(models):
    """End to end: sample 0 has one image (its second slot is a padding image, which the model
    drops), sample 1 has two, the right half of whose second is padding (pixel_attention_mask).
    Each sample's vision activation is the mean over the real patches of all its images."""
    from PIL import Image

    model, proc = models["idefics2"]
    ims = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    texts = ["User:<image>Who is this?<end_of_utterance>\nAssistant:",
             "User:<image><image>Who are they?<end_of_utterance>\nAssistant:"]
    enc = dict(proc(text=texts, images=[[ims[0]], ims[1:]], padding=True, return_tensors="pt"))
    assert enc["pixel_values"].shape[:2] == (2, 2) and not enc["pixel_values"][0, 1].any()
    enc["pixel_attention_mask"][1, 1, :, 32:] = 0
    enc["pixel_values"][1, 1, :, :, 32:] = 0
    sites = mlp_sites(model, towers=("vision",))
    caps = capture(model, sites, enc)
    with activation_hooks(model, sites) as rec, torch.no_grad():
        rec.set_batch(enc)
        model.model(**enc)
        got = rec.collect()
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[:, :2] = True  # the left half of the last image: 8 of its 16 patches
    for s in sites:
        x = caps[s].double()  # (3 real images, 16 patches, d)
        assert x.shape[:2] == (3, 16)
        ref = torch.stack([x[0].mean(0), torch.cat([x[1], x[2][keep.flatten()]]).mean(0)])
        np.testing.assert_allclose(got[s], ref.numpy(), atol=1e-6, rtol=1e-5)
