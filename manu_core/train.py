"""Training the embedded vanilla model, as the benchmark builds its own (evaluation.md, "Sets"):

  base      pretrained on the Real-Celebrity stand-ins (knowledge the model had before), then
  vanilla   fine-tuned on every fictitious profile in both forms (method.md: knowledge does not
            transfer between forms in tiny models, so both are trained).

Deterministic: seeded initialisation and batch order, a fixed thread count (tiny-models.md: a
different thread count changes the bits, not the accuracy). Answer tokens only carry the loss.

Precision. A checkpoint loaded in float16/bfloat16 (LLaVA-1.5-7B is float16 on disk) is never
trained in that dtype: an AdamW step of lr 2e-5 on a weight of 0.05 is below half a bfloat16 ulp
(1.2e-4 there) and rounds away, step after step. Instead
  LoRA           the frozen weights stay in their dtype; the adapters are float32 (`lora_model`), and
                 peft's LoRA layer runs them in float32 on the input cast up. `merge_lora` adds
                 scaling·B@A to the weight in float32 and casts once to the weight's dtype, so the
                 merged weight is the nearest representable value to W + ΔW (no double rounding).
  full           the whole model trains as a float32 copy (`float32_master_weights`: float32 master
                 weights), cast back once at the end; 2x the weights' memory during the stage, on
                 top of AdamW's states, so a 7B checkpoint should train LoRA (the default for real ones).
  float16        activations' gradients through the frozen float16 weights underflow below 6e-8, so
                 the loss is scaled dynamically (`loss_scaler`: torch's GradScaler; a step whose
                 gradients overflow is skipped and the scale halved). bfloat16 has float32's range
                 and needs none; a float32 model gets a disabled scaler, which changes no bit.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch
from manu_core.progress import progress as progress_bar
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
        torch.manual_seed(seed)
        peft = lora_model(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        # peft injects the adapters into `model`'s own modules: train it, only the adapters need grads
        curve = train_stage(model, processor, samples, replace(cfg, lora_r=0), seed=seed, name=name, device=device,
                            on_epoch_end=on_epoch_end, progress=progress, images=images)
        merged = merge_lora(peft)
        assert merged is model  # merged in place: the caller's model now carries the fine-tune
        return curve
    with float32_master_weights(model):
        return _train(model, processor, samples, cfg, seed=seed, name=name, device=device, on_epoch_end=on_epoch_end,
                      progress=progress, images=images)


def _train(model, processor, samples, cfg: StageConfig, *, seed, name, device, on_epoch_end, progress, images):
    rng = random.Random(f"{name}/{seed}")
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size) + 2  # +2: one partial batch per form
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = loss_scaler(model)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup * total), total)
    curve: list[dict] = []
    model.train()
    step = 0
    bar = progress_bar(total=total, desc=name, disable=not progress, unit="step")
    for epoch in range(1, cfg.epochs + 1):
        if cfg.max_steps and step >= cfg.max_steps:
            break
        t0, losses = time.perf_counter(), []
        for batch in form_batches(samples, cfg.batch_size, rng):
            if cfg.max_steps and step >= cfg.max_steps:
                break
            enc = encode_samples(processor, batch, images=images)
            loss = answer_loss(model, enc, device)
            optimizer_step(loss, opt, params, scaler)
            sched.step()
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


# ----------------------------------------------------------------------------------------------
# Precision (see the module docstring)

HALF = (torch.float16, torch.bfloat16)


def lora_model(model, r: int, alpha: int, dropout: float):
    """peft LoRA adapters (rank `r`) on the language model's linear layers, where the architecture
    adapter says they are (`ArchAdapter.lora_targets`); the rest frozen. The adapters are float32
    whatever the frozen weights' dtype (peft's autocast_adapter_dtype does so where it exists; the
    cast below makes it so whatever the peft version)."""
    from peft import LoraConfig, get_peft_model

    from manu_core.arch import get_adapter

    lc = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=get_adapter(model).lora_targets(model),
                    bias="none")
    peft = get_peft_model(model, lc, autocast_adapter_dtype=True)
    for p in peft.parameters():
        if p.requires_grad and p.dtype in HALF:
            p.data = p.data.float()
    return peft


def lora_delta(layer, adapter: str) -> torch.Tensor:
    """scaling · B @ A of one adapter of a peft LoRA linear layer, in float32, shaped like its weight."""
    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()  # (r, in), (out, r)
    delta = b @ a  # (out, in)
    return (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[adapter]


def merge_lora(peft_model):
    """The active adapters folded into the frozen weights, and the plain model (the same object peft
    wrapped) returned. Each weight becomes (W in float32 + Σ scaling·B@A in float32) cast once to W's
    dtype: the representable value nearest W + ΔW. peft's own merge adds ΔW cast to W's dtype first
    on some paths (safe_merge; half-precision adapters), which rounds twice and can lose an update of
    just over half an ulp (tests/baselines/test_precision.py). Plain LoRA only (no DoRA, no bias)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    for layer in peft_model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        names = [a for a in layer.active_adapters if a in layer.lora_A]
        if not isinstance(layer, LoraLinear) or any(getattr(layer, "lora_variant", {}).get(a) or
                                                    getattr(layer, "use_dora", {}).get(a) or
                                                    getattr(layer, "lora_bias", {}).get(a) for a in names):
            raise TypeError(f"merge_lora folds plain LoRA on linear layers only; got {type(layer).__name__} with "
                            f"adapters {names}. Use LoraConfig(bias='none', use_dora=False) on linear targets.")
        if layer.merged:
            raise ValueError(f"{type(layer).__name__} is already merged (peft merge()); unmerge it before merge_lora.")
        weight = layer.get_base_layer().weight
        total = weight.detach().float()
        for a in names:
            total = total + lora_delta(layer, a)
        weight.data = total.to(weight.dtype)
    return peft_model.unload()  # drop the adapter modules; the weights already carry them


@contextmanager
def float32_master_weights(model) -> Iterator[None]:
    """Inside the block a model with trainable float16/bfloat16 weights is float32 (its parameters and
    floating buffers, so no op sees mixed dtypes); after it (also on error) each is cast back once to
    the dtype it had. A model whose trainable weights are float32 (LoRA adapters) is left as it is."""
    if not any(p.requires_grad and p.dtype in HALF for p in model.parameters()):
        yield
        return
    params = [(p, p.dtype) for p in model.parameters() if p.dtype in HALF]
    buffers = [(m, k, b.dtype) for m in model.modules() for k, b in m.named_buffers(recurse=False) if b.dtype in HALF]
    for p, _ in params:
        p.data = p.data.float()  # the Parameter object stays: optimizers and gradient hooks keep pointing at it
    for m, k, _ in buffers:
        setattr(m, k, getattr(m, k).float())
    try:
        yield
    finally:
        for p, dtype in params:
            p.data = p.data.to(dtype)
        for m, k, dtype in buffers:
            setattr(m, k, getattr(m, k).to(dtype))


def loss_scaler(model) -> torch.amp.GradScaler:
    """Dynamic loss scaling when any weight of `model` is float16 (gradients through it underflow);
    disabled (a pass-through that changes no bit) otherwise."""
    p = next(model.parameters())
    return torch.amp.GradScaler(p.device.type, enabled=any(q.dtype == torch.float16 for q in model.parameters()))


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                   scaler: torch.amp.GradScaler, max_norm: float = 1.0) -> None:
    """backward, unscale, clip the gradient norm to `max_norm`, step (skipped by the scaler when a
    gradient overflowed), and clear the gradients."""
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` inside the block, restored after (also on error)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
