"""The paper's baselines (method.md, "Baselines the paper compares against").

Gradient methods share one training loop (`unlearn_gradient`); each is only its loss, registered by
name in `LOSSES`:
  ga         gradient ascent on the forget answers' language-modelling loss
  grad_diff  ascent on forget, descent on retain
  kl         ascent on forget + KL(vanilla || current) on the retain answers (a frozen vanilla copy)
  npo        (2/β) E_forget[log(1 + (π_θ/π_ref)^β)], π_ref fine-tuned on the retain set only
Prompting (`manu_core.vocab.PROMPTING_SYSTEM`) changes no weight: the evaluation passes the paper's system prompt,
placed by the model's chat template.

Real checkpoints train LoRA adapters (peft; r=16, α=16, dropout 0.05 on the language model's linear
layers) that are merged afterwards; the tiny models may train fully. Deterministic with a seed.
Precision as in manu_core/train.py: float32 adapters over the frozen float16/bfloat16 weights, merged
in float32 and cast once; full training of half-precision weights on a float32 copy; loss scaling
when any weight is float16.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from manu_core.progress import progress as progress_bar

from manu_core.data import Sample
from manu_core.prompts import encode_samples, model_inputs
from manu_core.rng import GLOBAL_RNG
from manu_core.train import float32_master_weights, form_batches, lora_model, loss_scaler, optimizer_step
from manu_core.train import merge_lora as _merge_lora


class BaselineError(ValueError):
    """Bad baseline input: names the rule, the value and the fix."""


@dataclass(frozen=True)
class BaselineConfig:
    method: str  # a key of LOSSES
    lr: float = 2e-5  # the benchmark's defaults: AdamW, lr 2e-5, 1 epoch, batch 4
    epochs: int = 1
    batch_size: int = 4
    forms: tuple[str, ...] = ("multimodal",)  # the benchmark trains its baselines on image + text only
    beta: float = 0.4  # NPO (benchmark code 0.4; paper text 0.9)
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in LOSSES:
            raise BaselineError(f"unknown gradient baseline {self.method!r}; choose one of {sorted(LOSSES)} "
                                "(prompting changes no weight: evaluate with system=PROMPTING_SYSTEM).")
        bad = [f for f in self.forms if f not in ("multimodal", "text")]
        if bad or not self.forms:
            raise BaselineError(f"forms must be a non-empty subset of ('multimodal', 'text'); got {self.forms}.")
        if self.beta <= 0:
            raise BaselineError(f"beta must be > 0; got {self.beta} (benchmark code: 0.4, paper: 0.9).")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise BaselineError(f"epochs, batch_size must be >= 1 and lr > 0; got {self.epochs}, "
                                f"{self.batch_size}, {self.lr}.")


# ----------------------------------------------------------------------------------------------
# Log-likelihoods of the answers


def answer_token_logprobs(model, enc: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every next token, mask of answer positions), both (B, T-1)."""
    logits = model(**model_inputs(enc, device)).logits[:, :-1].float()
    labels = enc["labels"][:, 1:].to(device)
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logp * mask, mask


def sequence_logprob(model, enc: dict, device) -> torch.Tensor:
    """log π(answer | prompt) per sample, (B,)."""
    lp, _ = answer_token_logprobs(model, enc, device)
    return lp.sum(1)


def nll(model, enc: dict, device) -> torch.Tensor:
    """Mean negative log-likelihood over the batch's answer tokens (the language-modelling loss)."""
    lp, mask = answer_token_logprobs(model, enc, device)
    return -lp.sum() / mask.sum().clamp(min=1)


def retain_kl(model, vanilla, enc: dict, device) -> torch.Tensor:
    """KL(vanilla || current) over the retain answers' next-token distributions, mean per token."""
    logits = model(**model_inputs(enc, device)).logits[:, :-1].float()
    with torch.no_grad():
        ref = vanilla(**model_inputs(enc, device)).logits[:, :-1].float()
    mask = (enc["labels"][:, 1:] != -100).to(device)
    p_ref = torch.log_softmax(ref[mask], -1)
    p_cur = torch.log_softmax(logits[mask], -1)
    return F.kl_div(p_cur, p_ref, log_target=True, reduction="batchmean")


# ----------------------------------------------------------------------------------------------
# Losses: (model, forget batch, retain batch, frozen model, config, device) -> scalar to minimise


@dataclass(frozen=True)
class Loss:
    fn: Callable
    uses_retain: bool = False
    frozen: str | None = None  # "vanilla" (kl) or "reference" (npo)


def _ga(model, forget, retain, frozen, cfg, device):
    return -nll(model, forget, device)


def _grad_diff(model, forget, retain, frozen, cfg, device):
    return -nll(model, forget, device) + nll(model, retain, device)


def _kl(model, forget, retain, frozen, cfg, device):
    return -nll(model, forget, device) + retain_kl(model, frozen, retain, device)


def npo_loss(logp_model: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """(2/β) mean log(1 + (π_θ/π_ref)^β) = (2/β) mean softplus(β (log π_θ − log π_ref))."""
    return (2.0 / beta) * F.softplus(beta * (logp_model - logp_ref)).mean()


def _npo(model, forget, retain, frozen, cfg, device):
    with torch.no_grad():
        ref = sequence_logprob(frozen, forget, device)
    return npo_loss(sequence_logprob(model, forget, device), ref, cfg.beta)


LOSSES: dict[str, Loss] = {
    "ga": Loss(_ga),
    "grad_diff": Loss(_grad_diff, uses_retain=True),
    "kl": Loss(_kl, uses_retain=True, frozen="vanilla"),
    "npo": Loss(_npo, frozen="reference"),
}


# ----------------------------------------------------------------------------------------------
# LoRA


def add_lora(model, cfg: BaselineConfig):
    """peft LoRA adapters on the language model's linear layers (the rest frozen), in float32 over
    weights of any dtype; where they are is the architecture adapter's knowledge (`ArchAdapter.lora_targets`)."""
    return lora_model(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)


def merge_lora(peft_model):
    """The adapters folded into the weights (in float32, cast once to each weight's dtype): a plain
    model again (`train.merge_lora`)."""
    return _merge_lora(peft_model)


# ----------------------------------------------------------------------------------------------
# The shared loop


def _batches(samples: Sequence[Sample], size: int, rng: random.Random) -> list[list[Sample]]:
    return form_batches(samples, size, rng)


def unlearn_gradient(
    model,
    processor,
    forget: Sequence[Sample],
    retain: Sequence[Sample],
    cfg: BaselineConfig,
    *,
    frozen=None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    images=None,
):
    """Run the method's loss over the forget samples (of `cfg.forms`), pairing each forget batch with
    a retain batch of the same form when the loss uses one. Returns (model, loss curve); with LoRA the
    returned model has the adapters merged. `images` resolves image keys (None: embedded portraits)."""
    loss = LOSSES[cfg.method]
    if loss.frozen and frozen is None:
        raise BaselineError(f"{cfg.method} needs the frozen {loss.frozen} model (pass frozen=...).")
    forget = [s for s in forget if s.form in cfg.forms]
    retain = [s for s in retain if s.form in cfg.forms]
    if not forget:
        raise BaselineError(f"no forget samples in forms {cfg.forms}.")
    if loss.uses_retain and not retain:
        raise BaselineError(f"{cfg.method} needs retain samples in forms {cfg.forms}; got none.")
    rng = random.Random(f"baseline/{cfg.method}/{cfg.seed}")
    if frozen is not None:
        frozen.eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
    with GLOBAL_RNG:  # torch's generator is the process's: the seed and every draw after it are this run's
        torch.manual_seed(cfg.seed)
        trained = add_lora(model, cfg) if cfg.lora else model
        with float32_master_weights(trained):  # full training of half-precision weights: a float32 copy, cast back once
            curve = _loop(trained, processor, forget, retain, cfg, loss, frozen, rng, device, progress, images)
    trained.eval()
    return (merge_lora(trained) if cfg.lora else trained), curve


def _loop(trained, processor, forget, retain, cfg: BaselineConfig, loss: Loss, frozen, rng, device, progress,
          images) -> list[dict]:
    """`unlearn_gradient`'s steps over the forget batches; returns the loss curve."""
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    scaler = loss_scaler(trained)
    retain_by_form = {f: [s for s in retain if s.form == f] for f in cfg.forms}
    curve: list[dict] = []
    total = cfg.epochs * math.ceil(len(forget) / cfg.batch_size + len(cfg.forms))
    bar = progress_bar(total=total, desc=cfg.method, disable=not progress, unit="step")
    trained.train()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        for batch in _batches(forget, cfg.batch_size, rng):
            f_enc = encode_samples(processor, batch, images=images)
            r_enc = None
            if loss.uses_retain:
                pool = retain_by_form[batch[0].form]
                r_enc = encode_samples(processor, rng.sample(pool, min(len(pool), cfg.batch_size)), images=images)
            value = loss.fn(trained, f_enc, r_enc, frozen, cfg, device)
            optimizer_step(value, opt, params, scaler)
            step += 1
            curve.append({"method": cfg.method, "epoch": epoch, "step": step, "loss": round(value.item(), 6)})
            bar.update(1)
            bar.set_postfix(loss=f"{value.item():.3f}")
    bar.close()
    return curve
