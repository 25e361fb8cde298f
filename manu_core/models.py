"""Model building and loading: tiny LLaVA / Idefics2 built offline, and real checkpoints by path.

The tiny models are ordinary `transformers` models (LlavaForConditionalGeneration,
Idefics2ForConditionalGeneration) with a tokenizer trained on the profile text and a real
processor, so every other module runs the same code on them as on LLaVA-1.5-7B. The config values
that matter are in docs/embedded.md (notably initializer_range=0.1, without which the loss plateaus).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
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
)

from manu_core.vocab import did_you_mean

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
    Idefics2 checkpoint, or any saved model of this tool (a preset's trained model: its folder from
    `presets.resolve_model`). Never downloads and never trains; `trust_remote_code` stays off.
    `dtype` None: the dtype the folder was saved in (a bfloat16 checkpoint stays bfloat16, so a model
    pruned or unlearned from it is saved in bfloat16 too)."""
    path = Path(path)
    dtype = as_dtype(dtype)
    check_weights(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or "auto", local_files_only=True, trust_remote_code=False
    )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model.to(device).eval()
    return model, processor


def save_model(model, processor, path: str | Path) -> Path:
    """`save_pretrained` (safetensors) of model and processor into `path`, written atomically."""
    from manu_core.io import atomic_dir

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return Path(path)
