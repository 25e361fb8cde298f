"""Training the embedded vanilla model, as the benchmark builds its own (evaluation.md, "Sets"):

  base      pretrained on the Real-Celebrity stand-ins (knowledge the model had before), then
  vanilla   fine-tuned on every fictitious profile in both forms (method.md: knowledge does not
            transfer between forms in tiny models, so both are trained).

Deterministic: seeded initialisation and batch order, a fixed thread count (tiny-models.md: a
different thread count changes the bits, not the accuracy). Answer tokens only carry the loss.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from manu_core.data import Sample
from manu_core.prompts import encode_samples, model_inputs


@dataclass(frozen=True)
class StageConfig:
    epochs: int
    lr: float = 1e-3
    batch_size: int = 32
    warmup: float = 0.05  # share of steps
    weight_decay: float = 0.0
    lora_r: int = 0  # > 0: train LoRA adapters of this rank on the language model only, then merge
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_steps: int = 0  # > 0: stop after this many optimizer steps (a brief fine-tune, e.g. a relearning attack)


def form_batches(samples: Sequence[Sample], batch_size: int, rng: random.Random) -> list[list[Sample]]:
    """Shuffled batches that each hold one form (image batches and text batches are encoded
    differently), in a shuffled order."""
    batches = []
    for form in sorted({s.form for s in samples}):
        group = [s for s in samples if s.form == form]
        rng.shuffle(group)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def answer_loss(model, enc: dict, device: str | torch.device = "cpu") -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens.

    Same value as `model(..., labels=...).loss`, but the LM head runs only at the positions that
    predict an answer token (about a fifth of a multimodal sequence): on the tiny models the
    (tokens x vocab) head and its softmax were half of a training step.
    """
    hidden = model.model(**model_inputs(enc, device)).last_hidden_state  # (B, T, d)
    labels = enc["labels"][:, 1:].to(device)  # position t predicts token t+1
    keep = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (n_answer_tokens, vocab)
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def train_stage(
    model,
    processor,
    samples: Sequence[Sample],
    cfg: StageConfig,
    *,
    seed: int,
    name: str = "train",
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[int], dict] | None = None,
    progress: bool = True,
    images: Callable | None = None,
) -> list[dict]:
    """Train `model` in place on `samples` (loss on answer tokens). Returns the loss curve:
    one record per step ({stage, epoch, step, loss, lr}) plus per-epoch records from `on_epoch_end`.
    With `cfg.lora_r` the language model gets LoRA adapters (the rest frozen), merged back at the end.
    `images` resolves image keys (None: the embedded portraits)."""
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        from manu_core.arch import get_adapter

        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                target_modules=get_adapter(model).lora_targets(model), bias="none"))
        # peft injects the adapters into `model`'s own modules: train it, only the adapters need grads
        curve = train_stage(model, processor, samples, replace(cfg, lora_r=0), seed=seed, name=name, device=device,
                            on_epoch_end=on_epoch_end, progress=progress, images=images)
        merged = peft.merge_and_unload()
        assert merged is model  # merged in place: the caller's model now carries the fine-tune
        return curve
    rng = random.Random(f"{name}/{seed}")
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size) + 2  # +2: one partial batch per form
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup * total), total)
    curve: list[dict] = []
    model.train()
    step = 0
    bar = tqdm(total=total, desc=name, disable=not progress, unit="step")
    for epoch in range(1, cfg.epochs + 1):
        if cfg.max_steps and step >= cfg.max_steps:
            break
        t0, losses = time.perf_counter(), []
        for batch in form_batches(samples, cfg.batch_size, rng):
            if cfg.max_steps and step >= cfg.max_steps:
                break
            enc = encode_samples(processor, batch, images=images)
            loss = answer_loss(model, enc, device)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            curve.append({"stage": name, "epoch": epoch, "step": step, "loss": round(losses[-1], 6),
                          "lr": sched.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
        record = {"stage": name, "epoch": epoch, "mean_loss": sum(losses) / len(losses),
                  "seconds": round(time.perf_counter() - t0, 2)}
        if on_epoch_end is not None:
            model.eval()
            record.update(on_epoch_end(epoch))
            model.train()
        curve.append(record)
    bar.close()
    model.eval()
    return curve


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` inside the block, restored after (also on error)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
