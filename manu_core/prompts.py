"""Prompts in each model's own chat format, and batches of them as model inputs.

One place turns (question, image?, answer?) into tensors, for training, activation extraction and
evaluation alike, through the processor's chat template (tiny and real checkpoints the same way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from PIL import Image

from manu_core.portraits import image_for

if TYPE_CHECKING:
    from manu_core.data import Sample

LLAVA_FALLBACK = "USER: {image}{question}\nASSISTANT:"


def build_prompt(
    processor,
    question: str,
    *,
    image: bool,
    system: str | None = None,
    history: Sequence[tuple[str, bool, str]] = (),
) -> str:
    """The generation prompt for one question, ending where the assistant's answer starts.

    `history` holds earlier turns (question, with an image?, answer), e.g. few-shot examples; each
    turn with an image takes one image of the sample, in order, before the question's own.
    """
    messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else [])
    for q, with_image, a in (*history, (question, image, None)):
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # A processor without a chat template: LLaVA-1.5's documented format.
    turns = [LLAVA_FALLBACK.format(image="<image>\n" if im else "", question=q) + (f" {a}</s>" if a is not None else "")
             for q, im, a in (*history, (question, image, None))]
    prompt = "\n".join(turns)
    return f"{system}\n{prompt}" if system else prompt


def end_of_answer(processor) -> str:
    """What closes an assistant turn in this chat format (appended to training targets)."""
    tok = processor.tokenizer
    eou = getattr(tok, "end_of_utterance_token", None)
    return eou if eou and "<end_of_utterance>" in (getattr(processor, "chat_template", "") or "") else tok.eos_token


def encode(
    processor,
    prompts: Sequence[str],
    images: Sequence[Image.Image | Sequence[Image.Image] | None],
    answers: Sequence[str] | None = None,
    *,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Tokenise a batch (all with images or all without; a sample may have several, e.g. few-shot).

    With `answers`, each text is prompt + " " + answer + end-of-turn, and `labels` hold the answer
    tokens (-100 elsewhere) while `answer_mask` marks them; the prompt must tokenise to a prefix of
    the full text (checked).
    """
    per_sample = [[] if im is None else [im] if isinstance(im, Image.Image) else list(im) for im in images]
    has_image = [bool(ims) for ims in per_sample]
    if any(has_image) and not all(has_image):
        raise ValueError("a batch mixes samples with and without images; batch each form separately")
    texts = list(prompts) if answers is None else [f"{p} {a}{end_of_answer(processor)}" for p, a in zip(prompts, answers)]
    kwargs = {}
    if all(has_image) and per_sample:
        kwargs["images"] = per_sample if _nested_images(processor) else [im for ims in per_sample for im in ims]
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = padding_side
    try:
        batch = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        if answers is not None:
            prompt_batch = processor(text=list(prompts), padding=True, return_tensors="pt", **kwargs)
    finally:
        tok.padding_side = old_side
    batch = dict(batch)
    if answers is not None:
        if padding_side != "right":
            raise ValueError("training batches (with answers) use right padding")
        plen = prompt_batch["attention_mask"].sum(1)
        ids = batch["input_ids"]
        pos = torch.arange(ids.shape[1])[None, :]
        answer_mask = (pos >= plen[:, None]) & batch["attention_mask"].bool()
        width = min(ids.shape[1], prompt_batch["input_ids"].shape[1])
        same = (ids[:, :width] == prompt_batch["input_ids"][:, :width]) | (pos[:, :width] >= plen[:, None])
        assert bool(same.all()), "prompt does not tokenise to a prefix of prompt + answer"
        batch["labels"] = torch.where(answer_mask, ids, torch.full_like(ids, -100))
        batch["answer_mask"] = answer_mask
    return batch


def _nested_images(processor) -> bool:
    # Idefics2 takes a list of images per sample; LLaVA a flat list.
    return type(processor).__name__.startswith("Idefics")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict:
    """The keys a model's forward takes (drops labels/answer_mask), moved to `device`."""
    keep = {k: v for k, v in batch.items() if k not in ("labels", "answer_mask")}
    return {k: v.to(device) if device is not None and hasattr(v, "to") else v for k, v in keep.items()}


def encode_samples(
    processor,
    batch: Sequence["Sample"],
    *,
    with_answers: bool = True,
    padding_side: str = "right",
    system: str | None = None,
    images: Callable[[str], Image.Image] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of a batch of samples (all of one form), for training and activation extraction.
    `images` resolves a sample's image key (default: the embedded portraits, `portraits.image_for`;
    a local MLLMU-Bench's `Benchmark.image` for its own images).

    With answers, the text is the QA pair as trained (prompt + answer + end of turn) and `labels` /
    `answer_mask` mark the answer; left padding is then made by moving each row's padding."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
    prompts = [build_prompt(processor, s.question, image=s.image is not None, system=system) for s in batch]
    resolve = images or image_for
    pixels = [resolve(s.image) if s.image else None for s in batch]
    if not with_answers:
        return encode(processor, prompts, pixels, padding_side=padding_side)
    enc = encode(processor, prompts, pixels, [s.answer for s in batch], padding_side="right")
    return _to_left_padding(enc) if padding_side == "left" else enc


def _to_left_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each row's padding to the left (`encode` pads answers on the right only)."""
    attn = batch["attention_mask"]
    t = attn.shape[1]
    shift = t - attn.sum(1)  # (B,) pads per row
    idx = (torch.arange(t)[None, :] - shift[:, None]) % t  # (B, T) source column of each new column
    out = dict(batch)
    for k in ("input_ids", "attention_mask", "answer_mask", "labels"):
        if k in batch:
            out[k] = torch.gather(batch[k], 1, idx)
    return out
