"""Model building and loading: tiny LLaVA / Idefics2 / Qwen2-VL built offline, and real checkpoints by path.

The tiny models are ordinary `transformers` models (LlavaForConditionalGeneration,
Idefics2ForConditionalGeneration, Qwen2VLForConditionalGeneration) with a tokenizer trained on the
profile text and a real processor (Qwen2-VL: the image-only processor below where torchvision is
missing), so every other module runs the same code on them as on LLaVA-1.5-7B. The config values
that matter are in docs/embedded.md (notably initializer_range=0.1, without which the loss plateaus).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessorPil,
    Idefics2Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

from manu_core.vocab import did_you_mean

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<end_of_utterance>"]
ARCHS = ("llava", "idefics2")

# Chat formats of the real checkpoints (LLaVA-1.5: "USER: <image>\n... ASSISTANT:", as in
# method.md; Idefics2: "User:<image>...<end_of_utterance>\nAssistant:"), as processor chat templates
# so prompts are built the same way for tiny and real models (`prompts.build_prompt`).
LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'][0]['text'] if m['content'] is not string else m['content'] }}{{ '\\n' }}"
    "{% elif m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IDEFICS2_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'][0]['text'] if m['content'] is not string else m['content'] }}<end_of_utterance>\n"
    "{% elif m['role'] == 'user' %}User:"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% else %}Assistant: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}<end_of_utterance>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ModelError(ValueError):
    """Bad model input: the message names the rule, the value and the fix."""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model (defaults: tiny-models.md, 'Configs that work')."""

    arch: str = "llava"
    hidden: int = 128
    intermediate: int = 512
    layers: int = 4
    heads: int = 4
    vision_hidden: int = 64
    vision_intermediate: int = 256
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 64
    patch: int = 16
    vocab_size: int = 4096  # BPE merges target; the model's vocab is len(tokenizer)
    vision_feature_layer: int = -2  # LLaVA reads the penultimate vision layer, as LLaVA-1.5 does
    initializer_range: float = 0.1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ModelError(f"Unknown arch {self.arch!r}. Available: {', '.join(ARCHS)}.")
        if self.image_size % self.patch:
            raise ModelError(f"image_size must be a multiple of patch; got {self.image_size} and {self.patch}.")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


# ----------------------------------------------------------------------------------------------
# Tokenizer and processor


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (deterministic), special tokens first, BOS prepended."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={
            "image_token": "<image>",
            "image_boundary_token": "<fake_token_around_image>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        padding_side="right",
    )


def build_processor(spec: TinySpec, tokenizer: PreTrainedTokenizerFast):
    if spec.arch == "llava":
        ip = CLIPImageProcessorPil(
            size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
        )
        return LlavaProcessor(
            image_processor=ip, tokenizer=tokenizer, patch_size=spec.patch,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    ip = Idefics2ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": spec.image_size, "shortest_edge": spec.image_size}
    )
    return Idefics2Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=spec.n_patches,
                             chat_template=IDEFICS2_CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------
# Model configs


def tiny_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast):
    vocab = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=256, tie_word_embeddings=False, initializer_range=spec.initializer_range,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
    )
    vision = dict(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch, initializer_range=spec.initializer_range,
    )
    if spec.arch == "llava":
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(**vision, projection_dim=spec.hidden),
            text_config=LlamaConfig(**text),
            image_token_index=ids["<image>"], image_seq_length=spec.n_patches, projector_hidden_act="gelu",
            vision_feature_select_strategy="default", vision_feature_layer=spec.vision_feature_layer,
            tie_word_embeddings=False,
        )
    else:
        cfg = Idefics2Config(
            vision_config=dict(**vision, model_type="idefics2_vision"),
            perceiver_config=dict(
                hidden_size=spec.hidden, resampler_n_latents=spec.n_patches, resampler_depth=1,
                resampler_n_heads=4, resampler_head_dim=32, num_key_value_heads=2, model_type="idefics2_perceiver",
            ),
            text_config=MistralConfig(**text),
            image_token_id=ids["<image>"], tie_word_embeddings=False,
        )
    cfg.initializer_range = spec.initializer_range
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = ids["<pad>"], ids["<s>"], ids["</s>"]
    return cfg


def build_tiny_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if spec.arch == "llava" else Idefics2ForConditionalGeneration
    model = cls(tiny_config(spec, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    return model


# ----------------------------------------------------------------------------------------------
# Qwen2-VL
#
# The three builders above are generic over the spec's type (functools.singledispatch): a TinySpec
# builds LLaVA or Idefics2 with the functions as written, a Qwen2VLSpec the Qwen2-VL ones registered
# below. Registered after the definitions, so adding an architecture leaves the source of the
# existing builders, which a preset's key hashes (presets.Preset.key), and every trained model's key
# as they were.

build_processor = functools.singledispatch(build_processor)
tiny_config = functools.singledispatch(tiny_config)
build_tiny_model = functools.singledispatch(build_tiny_model)

# Qwen2-VL's own chat and vision tokens, added to the trained tokenizer in this order.
QWEN2_VL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL-Instruct's chat format ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>...<|im_end|>\n
# <|im_start|>assistant\n"), less the default system turn ("You are a helpful assistant.") the real
# template adds when there is none: a tiny model learns nothing from it and it would lengthen every sample.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Qwen2VLSpec:
    """Sizes of a tiny Qwen2-VL (tiny-models.md: vision depth 2, the text `mrope_section` summing to
    head_dim / 2). The vision tower cuts an image into patch x patch squares (two frames each:
    Qwen2-VL's temporal patch, an image repeated) and merges merge x merge of them into one image
    token: a 64 x 64 portrait is 8 x 8 = 64 patches, 16 image tokens."""

    arch: str = "qwen2_vl"
    hidden: int = 128
    intermediate: int = 512
    layers: int = 4
    heads: int = 4
    vision_hidden: int = 64  # the vision blocks' embed_dim
    vision_intermediate: int = 256  # embed_dim x mlp_ratio: the vision MLP's hidden units
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 64
    patch: int = 8
    merge: int = 2  # spatial_merge_size
    vocab_size: int = 4096  # BPE merges target; the model's vocab is len(tokenizer)
    mrope_section: tuple[int, int, int] = (4, 6, 6)  # temporal, height, width rotary halves of a head
    initializer_range: float = 0.1

    def __post_init__(self) -> None:
        if self.arch != "qwen2_vl":
            raise ModelError(f"Qwen2VLSpec.arch is 'qwen2_vl'; got {self.arch!r}. Use TinySpec for {', '.join(ARCHS)}.")
        if self.image_size % (self.patch * self.merge):
            raise ModelError(f"image_size must be a multiple of patch x merge ({self.patch * self.merge}); got "
                             f"{self.image_size}.")
        if self.vision_intermediate % self.vision_hidden:
            raise ModelError(f"vision_intermediate must be a multiple of vision_hidden (Qwen2-VL's mlp_ratio is an "
                             f"integer); got {self.vision_intermediate} and {self.vision_hidden}.")
        if 2 * sum(self.mrope_section) != self.hidden // self.heads:
            raise ModelError(f"mrope_section must sum to head_dim / 2 = {self.hidden // self.heads // 2}; got "
                             f"{list(self.mrope_section)}.")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def image_tokens(self) -> int:
        return self.n_patches // self.merge**2


def qwen2_vl_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The trained tokenizer as a Qwen2-VL one: QWEN2_VL_TOKENS appended after its vocabulary (the
    same ids every time), `<|image_pad|>` / `<|video_pad|>` as its image / video tokens (what
    Qwen2VLProcessor reads) and `<|im_end|>`, which closes a turn, as its EOS. A tokenizer that is
    one already comes back as it is."""
    if getattr(tokenizer, "image_token", None) == "<|image_pad|>" and tokenizer.eos_token == "<|im_end|>":
        return tokenizer
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.add_special_tokens(list(QWEN2_VL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=tokenizer.unk_token, pad_token=tokenizer.pad_token,
        bos_token=tokenizer.bos_token, eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        padding_side=tokenizer.padding_side,
    )


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for images and text only: the tokenizer and the PIL image processor
    (Qwen2VLImageProcessorPil: `pixel_values`, `image_grid_thw`), with no video processor.

    Why it exists: transformers' Qwen2VLProcessor cannot be built without torchvision (its video
    processor needs it), and PyPI's torchvision wheels are CUDA builds that do not import against a
    CPU torch. Everything else of it is inherited unchanged: each image placeholder (`<|image_pad|>`)
    becomes grid_t * grid_h * grid_w / merge_size^2 image tokens (`replace_image_token`), and
    `mm_token_type_ids`, which the model's M-RoPE needs, is returned as by the real processor
    (tests/core/test_qwen2vl.py checks its output against the real processor's). `load_model` uses it
    only when the real processor cannot be built; `save_pretrained` writes the folder a real
    Qwen2VLProcessor loads (processor_class Qwen2VLProcessor, and a preprocessor_config.json that its
    video processor reads), so a server with torchvision loads the real one from the same folder.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # as Qwen2VLProcessor.__init__, less the video processor
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "Qwen2VLImageOnlyProcessor":
        """The tokenizer, the PIL image processor and the chat template of a saved Qwen2-VL folder
        (a checkpoint's own, or one this class saved)."""
        processor_dict, _ = cls.get_processor_dict(path, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        return cls(image_processor, AutoTokenizer.from_pretrained(path, **kwargs),
                   chat_template=processor_dict.get("chat_template"))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "processor_class": "Qwen2VLProcessor"}

    def save_pretrained(self, save_directory, **kwargs):
        files = super().save_pretrained(save_directory, **kwargs)
        self.image_processor.save_pretrained(save_directory)  # preprocessor_config.json, as a checkpoint has
        self.tokenizer._set_processor_class("Qwen2VLProcessor")
        self.tokenizer.save_pretrained(save_directory)  # its tokenizer_config.json names the real processor too
        return files


@build_processor.register(Qwen2VLSpec)
def _qwen2_vl_processor(spec: Qwen2VLSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2VLImageOnlyProcessor:
    # Built from its parts on every machine (its output for images is the real processor's); the
    # saved folder is the real one's, so a machine with torchvision loads Qwen2VLProcessor from it.
    # Pixel bounds: from one image token to four times the tiny image's area (64 x 64 stays as it is).
    ip = Qwen2VLImageProcessorPil(
        patch_size=spec.patch, merge_size=spec.merge, temporal_patch_size=2,
        size={"shortest_edge": (spec.patch * spec.merge) ** 2, "longest_edge": (2 * spec.image_size) ** 2},
    )
    return Qwen2VLImageOnlyProcessor(ip, qwen2_vl_tokenizer(tokenizer), chat_template=QWEN2_VL_CHAT_TEMPLATE)


@tiny_config.register(Qwen2VLSpec)
def _qwen2_vl_config(spec: Qwen2VLSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig:
    tokenizer = qwen2_vl_tokenizer(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*SPECIAL_TOKENS, *QWEN2_VL_TOKENS)}
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
            max_position_embeddings=256, initializer_range=spec.initializer_range,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": list(spec.mrope_section)},
            pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=spec.vision_layers, embed_dim=spec.vision_hidden, hidden_size=spec.hidden,
            num_heads=spec.vision_heads, mlp_ratio=spec.vision_intermediate // spec.vision_hidden,
            patch_size=spec.patch, spatial_merge_size=spec.merge, temporal_patch_size=2,
            initializer_range=spec.initializer_range,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg.initializer_range = spec.initializer_range
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = ids["<pad>"], ids["<s>"], ids["<|im_end|>"]
    return cfg


@build_tiny_model.register(Qwen2VLSpec)
def _qwen2_vl_model(spec: Qwen2VLSpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    tokenizer = qwen2_vl_tokenizer(tokenizer)
    model = Qwen2VLForConditionalGeneration(tiny_config(spec, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    return model


# What builds a tiny model of each spec type beyond the generic builders' LLaVA/Idefics2 bodies (for
# presets.Preset.key: a change here retrains that architecture's presets only).
ARCH_BUILD_CODE = {Qwen2VLSpec: (Qwen2VLSpec, qwen2_vl_tokenizer, Qwen2VLImageOnlyProcessor, _qwen2_vl_processor,
                                 _qwen2_vl_config, _qwen2_vl_model, QWEN2_VL_CHAT_TEMPLATE)}


# ----------------------------------------------------------------------------------------------
# Loading


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from its name ('bfloat16'), a dtype, or None (keep what the weights have)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"dtype must be one of {', '.join(DTYPES)} (or unset: the checkpoint's own); got "
                             f"{dtype!r}.{did_you_mean(dtype, DTYPES)}")
        return getattr(torch, dtype)
    return dtype


DTYPES = ("float32", "bfloat16", "float16")  # what a run's dtype may name


def check_weights(path: str | Path) -> list[Path]:
    """Check, without loading a tensor, that `path` is a model folder whose weights can be read: a
    config.json and safetensors files whose headers cover the files exactly (a truncated or damaged
    copy fails here, named, instead of deep inside `from_pretrained`). Returns the weight files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model path is not a folder: {path}. Pass a folder with config.json and safetensors "
                         "weights (a local LLaVA-1.5/Idefics2 checkpoint). A preset name (see `manu presets`) is "
                         "resolved to its trained folder by presets.resolve_model(name, models=...) or `manu train "
                         "<preset>`.")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json; it is not a saved transformers model folder.")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.iterdir())[:12]
        raise ModelError(f"{path} has no *.safetensors weights (found: {found}). Convert the checkpoint to "
                         "safetensors (model.save_pretrained(folder, safe_serialization=True)); pickled .bin "
                         "weights are not loaded.")
    for f in files:
        try:
            if not os.access(f, os.R_OK):
                raise PermissionError("not readable by this user")
            with safe_open(f, "pt") as handle:
                handle.keys()
        except Exception as e:  # SafetensorError, OSError, PermissionError: one message, the file named
            raise ModelError(f"the weights file {f} cannot be read ({type(e).__name__}: {e}). It is truncated, "
                             "damaged or unreadable: copy it again from its source (compare its size and sha256) "
                             "or fix its permissions.") from None
    return files


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """(model, processor) from a local folder saved with `save_pretrained`: a real LLaVA-1.5 /
    Idefics2 / Qwen2-VL checkpoint, or any saved model of this tool (a preset's trained model: its folder from
    `presets.resolve_model`). Never downloads and never trains; `trust_remote_code` stays off.
    The processor is the folder's own (AutoProcessor); only a Qwen2-VL folder whose Qwen2VLProcessor
    cannot be built because torchvision does not import gets Qwen2VLImageOnlyProcessor instead.
    `dtype` None: the dtype the folder was saved in (a bfloat16 checkpoint stays bfloat16, so a model
    pruned or unlearned from it is saved in bfloat16 too)."""
    path = Path(path)
    dtype = as_dtype(dtype)
    check_weights(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or "auto", local_files_only=True, trust_remote_code=False
    )
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # a Qwen2-VL folder on a machine without a working torchvision: images only
        if model.config.model_type != "qwen2_vl" or _torchvision_imports():
            raise
        log.info("Qwen2VLProcessor cannot be built here (%s: %s; its video processor needs torchvision): "
                 "loading %s with the image-only processor", type(e).__name__, " ".join(str(e).split())[:160], path)
        processor = Qwen2VLImageOnlyProcessor.from_pretrained(path, local_files_only=True)
    model.to(device).eval()
    return model, processor


@functools.cache
def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or a wheel built against another torch (a CUDA build on a CPU torch)
        return False
    return True


def save_model(model, processor, path: str | Path) -> Path:
    """`save_pretrained` (safetensors) of model and processor into `path`, written atomically."""
    from manu_core.io import atomic_dir

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return Path(path)
