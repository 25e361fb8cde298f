"""Qwen2-VL without torchvision: the image-only processor (each image placeholder expanded to
grid_t * grid_h * grid_w / merge^2 image tokens, as the real Qwen2VLProcessor does), its folder, the
fallback in `load_model`, and the adapter's sites and image layout on the `tiny-qwen2vl` preset's
architecture (built untrained: the trained preset runs in tests/pipeline/test_qwen2vl_flow.py)."""

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from manu_core import data as mdata
from manu_core import models as mmodels
from manu_core.arch import get_adapter, mlp_sites
from manu_core.extract import activation_hooks
from manu_core.models import (
    QWEN2_VL_CHAT_TEMPLATE,
    ModelError,
    Qwen2VLImageOnlyProcessor,
    Qwen2VLSpec,
    build_processor,
    build_tiny_model,
    load_model,
    save_model,
    train_tokenizer,
)
from manu_core.portraits import image_for, portrait
from manu_core.presets import PRESETS
from manu_core.prompts import build_prompt, encode_samples, end_of_answer, model_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = PRESETS["tiny-qwen2vl"].spec
SQUARE, WIDE = (64, 64), (96, 48)  # (width, height): 8 x 8 and 6 x 12 patches of 8 pixels, no resize


@pytest.fixture(scope="module")
def ds():
    return mdata.build_dataset(forget=["001"], n_profiles=3, n_celebrities=0)


@pytest.fixture(scope="module")
def processor(ds):
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 300)
    return build_processor(SPEC, tok)


def picture(size):
    return portrait("001").resize(size)


def real_processor(processor, monkeypatch):
    """transformers' own Qwen2VLProcessor on the same tokenizer and image processor, its video
    processor left out (the class check that needs torchvision skipped for that one argument)."""
    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
    return Qwen2VLProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                            video_processor=None, chat_template=processor.chat_template)


def test_image_only_processor_expands_each_image_to_its_grid(processor, monkeypatch):
    """Images of two sizes, one and two per sample: image_grid_thw is each image's patch grid,
    pixel_values its patches in order, and each placeholder becomes t*h*w / merge^2 image tokens,
    bit for bit what the real processor returns."""
    square, wide = picture(SQUARE), picture(WIDE)
    prompts = [build_prompt(processor, "Who is this?", image=True),
               build_prompt(processor, "And this one?", image=True, history=[("Who is this?", True, "Ann")])]
    images = [square, wide, square]  # sample 0: square; sample 1: wide (its history turn), then square
    out = processor(text=prompts, images=images, return_tensors="pt", padding=True)

    patch, merge, frames = SPEC.patch, SPEC.merge, 2  # Qwen2-VL's temporal patch: an image is two frames
    grids = [(1, h // patch, w // patch) for w, h in (SQUARE, WIDE, SQUARE)]
    assert out["image_grid_thw"].tolist() == [list(g) for g in grids]
    assert out["pixel_values"].shape == (sum(np.prod(g) for g in grids), 3 * frames * patch * patch)  # (P, C·T·p·p)
    alone = processor.image_processor(images=images, return_tensors="pt")
    assert torch.equal(out["pixel_values"], alone["pixel_values"])

    tok = processor.tokenizer
    ids = out["input_ids"]
    image_id, start, end = tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
    runs = []  # per sample, the image-token runs between <|vision_start|> and <|vision_end|>
    for row in ids.tolist():
        starts, ends = [i for i, t in enumerate(row) if t == start], [i for i, t in enumerate(row) if t == end]
        runs.append([row[a + 1:b] for a, b in zip(starts, ends)])
    per_image = [int(np.prod(g)) // merge**2 for g in grids]
    assert per_image == [16, 18, 16]
    assert [[len(r) for r in rs] for rs in runs] == [per_image[:1], per_image[1:]]
    assert all(set(r) == {image_id} for rs in runs for r in rs)
    assert (ids == image_id).sum().item() == sum(per_image)
    assert torch.equal(out["mm_token_type_ids"], (ids == image_id).long())

    real = real_processor(processor, monkeypatch)(text=prompts, images=images, return_tensors="pt", padding=True)
    assert set(real) == set(out)
    for k in real:
        assert torch.equal(real[k], out[k]), k


def test_chat_format_and_training_batches(processor, ds):
    """Qwen2-VL-Instruct's turns; an answer ends with <|im_end|> and only it and the answer are labelled."""
    assert processor.chat_template == QWEN2_VL_CHAT_TEMPLATE
    assert build_prompt(processor, "Who?", image=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Who?<|im_end|>\n<|im_start|>assistant\n")
    assert end_of_answer(processor) == "<|im_end|>" == processor.tokenizer.eos_token
    batch = [s for s in mdata.samples(ds.profiles[0]) if s.image][:2]
    enc = encode_samples(processor, batch)
    for row, s in enumerate(batch):
        labelled = enc["input_ids"][row][enc["answer_mask"][row]]
        assert processor.tokenizer.decode(labelled) == f" {s.answer}<|im_end|>"


def test_folder_is_a_qwen2vl_checkpoint_and_loads_back(processor, tmp_path):
    """save_pretrained writes what a real Qwen2VLProcessor loads (its class named, a
    preprocessor_config.json for its video processor); the image-only processor reads it back."""
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["patch_size"] == SPEC.patch
    back = Qwen2VLImageOnlyProcessor.from_pretrained(tmp_path)
    assert isinstance(back.image_processor, Qwen2VLImageProcessorPil)
    assert back.chat_template == processor.chat_template
    prompt = [build_prompt(processor, "Who is this?", image=True)]
    a, b = (p(text=prompt, images=[picture(WIDE)], return_tensors="pt") for p in (processor, back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_falls_back_only_without_torchvision(processor, ds, tmp_path, monkeypatch):
    """`load_model` tries the folder's own processor; only a Qwen2-VL folder whose Qwen2VLProcessor
    cannot be built because torchvision does not import gets the image-only one."""
    model = build_tiny_model(SPEC, processor.tokenizer, seed=0).eval()
    save_model(model, processor, tmp_path / "m")
    if mmodels._torchvision_imports():
        pytest.skip("torchvision imports here: load_model returns the real Qwen2VLProcessor")
    loaded, proc = load_model(tmp_path / "m")
    assert type(proc) is Qwen2VLImageOnlyProcessor
    batch = [s for s in mdata.samples(ds.profiles[0]) if s.image][:2]
    enc = model_inputs(encode_samples(proc, batch))
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, model(**enc).logits)
    # the hub's Qwen2-VL layout: a legacy preprocessor_config.json (min/max_pixels), chat_template.json,
    # no processor_config.json
    hub = tmp_path / "m"
    (hub / "processor_config.json").unlink()
    template = (hub / "chat_template.jinja").read_text()
    (hub / "chat_template.jinja").unlink()
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    ip = json.loads((hub / "preprocessor_config.json").read_text())
    size = ip.pop("size")
    (hub / "preprocessor_config.json").write_text(json.dumps({**ip, "min_pixels": size["shortest_edge"],
                                                              "max_pixels": size["longest_edge"],
                                                              "processor_class": "Qwen2VLProcessor"}))
    _, proc2 = load_model(hub)
    assert type(proc2) is Qwen2VLImageOnlyProcessor and proc2.chat_template == template
    enc2 = model_inputs(encode_samples(proc2, batch))
    assert set(enc2) == set(enc) and all(torch.equal(enc2[k], enc[k]) for k in enc)
    # a machine where torchvision imports: the real processor's error is not hidden
    monkeypatch.setattr(mmodels, "_torchvision_imports", lambda: True)
    with pytest.raises(ImportError, match="(?i)torchvision"):
        load_model(tmp_path / "m")


def test_tiny_qwen2vl_sites_and_image_layout(processor, ds):
    """On the preset's architecture: language and vision MLP sites (every vision block live), and
    per-sample vision means over each sample's own patches, for images of two sizes in one batch."""
    model = build_tiny_model(SPEC, processor.tokenizer, seed=0).eval()
    sites = mlp_sites(model)
    assert [(s.tower, s.layer, s.width, s.kind.name) for s in sites] == (
        [("language", i, SPEC.intermediate, "gated") for i in range(SPEC.layers)]
        + [("vision", i, SPEC.vision_intermediate, "plain") for i in range(SPEC.vision_layers)])
    assert [s.hook_path for s in sites if s.tower == "vision"] == [f"model.visual.blocks.{i}.mlp.fc2" for i in range(2)]

    batch = [next(s for s in mdata.samples(p) if s.image) for p in ds.profiles[:3]]  # three people's portraits
    sizes = dict(zip([s.image for s in batch], (SQUARE, WIDE, SQUARE), strict=True))
    enc = model_inputs(encode_samples(processor, batch, images=lambda key: image_for(key).resize(sizes[key])))
    layout = get_adapter(model).image_layout(model.config, enc)
    assert layout.image_sample.tolist() == [0, 1, 2]
    patches = [64, 72, 64]
    assert layout.positions.sum(1).tolist() == patches

    caps = {}
    handles = [model.get_submodule(s.hook_path).register_forward_pre_hook(
        lambda m, a, s=s: caps.__setitem__(s, a[0].detach().clone())) for s in sites]
    try:
        with activation_hooks(model, sites) as rec, torch.no_grad():
            rec.set_batch(enc)
            model.model(**enc)
            got = rec.collect()
    finally:
        for h in handles:
            h.remove()
    mask = enc["attention_mask"].bool()
    bounds = np.cumsum([0, *patches])
    for s in sites:
        x = caps[s]  # vision: (P, units), every image's patches in order; language: (B, T, units)
        if s.tower == "vision":
            ref = torch.stack([x[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
        else:
            ref = torch.stack([x[i][mask[i]].mean(0) for i in range(len(batch))])
        np.testing.assert_allclose(got[s], ref.numpy(), atol=1e-6, rtol=1e-5)


def test_spec_rules_and_existing_builders():
    with pytest.raises(ModelError, match="mrope_section must sum to head_dim / 2 = 16"):
        Qwen2VLSpec(mrope_section=(4, 4, 4))
    with pytest.raises(ModelError, match="multiple of patch x merge"):
        Qwen2VLSpec(image_size=40)
    with pytest.raises(ModelError, match="mlp_ratio"):
        Qwen2VLSpec(vision_hidden=64, vision_intermediate=96)
    # The builders dispatch on the spec's type; the LLaVA/Idefics2 bodies, whose source every other
    # preset's key hashes, are the functions as written (presets.Preset.key).
    import inspect

    assert inspect.getsource(mmodels.build_processor).startswith("def build_processor(spec: TinySpec")
    assert PRESETS["tiny-qwen2vl"].key() != PRESETS["tiny"].key()
