"""Gradient x activation attribution of MLP units: a diagnostic "upper bound" for MANU's scores.

MANU ranks units by activation statistics; this module measures each unit's effect on the answers
directly, to compare against. For unit u on a sample with answer loss L (mean cross-entropy over the
answer tokens, as `train.answer_loss` computes it):

    attribution_u = Σ_t |a_u(t) · ∂L/∂a_u(t)|

the first-order estimate of how much L moves when the unit is zeroed, taken per position so that
positions pushing the loss in opposite directions do not cancel. `unit_attribution` averages it over
samples; `attribution_table` turns forget/retain attributions into a score F/(R+ε) and a top-α
selection that `prune.prune_units` accepts like the importance table.

What is hooked, and why it is the same as extraction: a forward pre-hook on each site's down_proj /
fc2 (`arch.MlpSite.hook_path`) sees its input, the (B, T, d_mlp) hidden-unit activations that
`extract.ActivationRecorder` records, for the same sites (`arch.mlp_sites`: both towers, live layers
only). Positions: language, every non-padding position (image tokens included); vision, every
counted position of every image (CLS included for LLaVA; Idefics2's padding patches left out, as in
extraction). Positions after a sample's last answer token have zero gradient by causality.

How: batches are encoded with `prompts.encode_samples` (as training does), one form per batch. The
model runs in eval mode with grad enabled; no parameter gradient is computed: the hook keeps the
activation tensor (making it a leaf that requires grad when nothing upstream does, e.g. with frozen
parameters, so the graph below it is recorded), and one `torch.autograd.grad` of Σ_i L_i gives
∂L_i/∂a for every sample i of the batch at once (rows of a batch do not interact).

Vision units on text-only samples: the vision tower does not run, the sample's loss does not depend
on them, so their attribution on that sample is exactly 0 and it still counts in the mean over
samples (as method.md counts text-form vision activations as 0).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import polars as pl
import torch
from manu_core.progress import progress as progress_bar

from manu_core.arch import TOWERS, MlpSite, get_adapter, mlp_sites
from manu_core.data import Sample
from manu_core.prompts import encode_samples, model_inputs

SCOPES = ("tower", "global")
NEURON = ("tower", "layer", "unit")
TABLE_SCHEMA = {
    "tower": pl.String, "layer": pl.Int64, "unit": pl.Int64, "forget_attr": pl.Float64,
    "retain_attr": pl.Float64, "score": pl.Float64, "rank": pl.Int64, "selected": pl.Boolean,
}


class AttributionError(ValueError):
    """Bad attribution input: the message names the rule, the value and the fix."""


def _batch_attribution(model, sites: Sequence[MlpSite], enc: dict, device) -> dict[tuple[str, int], np.ndarray]:
    """Σ over the batch's samples and counted positions of |a·∂L_i/∂a|, per site: (width,) float64."""
    acts: dict[MlpSite, torch.Tensor] = {}

    def hook(site: MlpSite):
        def pre_hook(module, args):
            if site in acts:
                raise AttributionError(f"the hook of {site.name} fired twice in one forward (gradient checkpointing?); "
                                       "run the model without it.")
            x = args[0]
            if not x.requires_grad:  # nothing upstream needs grad (frozen params, first site): start the graph here
                x = x.detach().requires_grad_(True)
                acts[site] = x
                return (x, *args[1:])
            acts[site] = x

        return pre_hook

    handles = [model.get_submodule(s.hook_path).register_forward_pre_hook(hook(s)) for s in sites]
    try:
        backbone = model.get_submodule(get_adapter(model).backbone)
        hidden = backbone(**model_inputs(enc, device)).last_hidden_state  # (B, T, d)
    finally:
        for h in handles:
            h.remove()
    missing = [s.name for s in sites if s not in acts]
    if missing:
        raise AttributionError(f"site(s) {', '.join(missing)} did not run in the forward; the architecture "
                               "adapter's layer paths do not match this model (manu_core/arch.py).")

    # per-sample answer loss, as train.answer_loss: position t predicts token t+1
    labels = enc["labels"][:, 1:].to(hidden.device)
    keep = labels != -100
    n_tokens = keep.sum(1)
    if bool((n_tokens == 0).any()):
        rows = (n_tokens == 0).nonzero().flatten().tolist()
        raise AttributionError(f"batch row(s) {rows[:5]} have no answer token; the loss is undefined. "
                               "Give every sample a non-empty answer.")
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (n_answer_tokens, vocab)
    tok = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="none")
    per_sample = torch.zeros(labels.shape[0], dtype=tok.dtype, device=tok.device)
    per_sample = per_sample.index_add(0, keep.nonzero()[:, 0], tok) / n_tokens.to(tok.dtype)
    grads = torch.autograd.grad(per_sample.sum(), [acts[s] for s in sites], allow_unused=True)

    attn = enc["attention_mask"].bool()
    layout = None
    out = {}
    for site, g in zip(sites, grads):
        x = acts[site].detach()
        if g is None:  # the loss does not depend on this site
            out[(site.tower, site.layer)] = np.zeros(site.width)
            continue
        dtype = torch.promote_types(x.dtype, torch.float32)
        contrib = (x.to(dtype) * g.to(dtype)).abs()  # (B, T, d) / (N_images, S, d) / (P, d)
        if site.tower == "language":
            if tuple(x.shape[:2]) != tuple(attn.shape):
                raise AttributionError(f"language MLP input has shape {tuple(x.shape)} but the batch is "
                                       f"{tuple(attn.shape)} (B, T); run the model with an attention mask.")
            w = attn.to(x.device, dtype)
        else:
            if layout is None:
                layout = get_adapter(model).image_layout(model.config, enc)
            w = None if layout.positions is None or x.dim() != 3 else layout.positions.to(x.device, dtype)
        s = contrib.flatten(0, -2).sum(0) if w is None else (contrib * w.unsqueeze(-1)).flatten(0, -2).sum(0)
        out[(site.tower, site.layer)] = s.double().cpu().numpy()
    return out


def unit_attribution(model, processor, samples: Sequence[Sample], *, batch_size: int = 8,
                     device: str | torch.device = "cpu", progress: bool = True,
                     images=None) -> dict[tuple[str, int], np.ndarray]:
    """Mean over `samples` of Σ_t |a_u(t)·∂L/∂a_u(t)| per unit: (tower, layer) -> (width,) float64.

    Every live site of both towers is returned; vision units get 0 from text-only samples (the mean
    still counts them). `device`: where the inputs go (the model must be there already). The model is
    left as it was (eval during the run, training mode restored; no .grad is written)."""
    samples = list(samples)
    if not samples:
        raise AttributionError("samples is empty; the attribution is a mean over samples, pass at least one.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttributionError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
    here = model.get_input_embeddings().weight.device
    if torch.device(device).type != here.type:
        raise AttributionError(f"device={str(device)!r} but the model is on {here}; move the model there first "
                               f"(model.to({str(device)!r})) or pass device={str(here)!r}.")
    sites = mlp_sites(model)
    totals = {(s.tower, s.layer): np.zeros(s.width, dtype=np.float64) for s in sites}
    forms = [[s for s in samples if s.image is not None], [s for s in samples if s.image is None]]
    batches = [(g[i : i + batch_size], bool(g[0].image)) for g in forms if g for i in range(0, len(g), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for chunk, multimodal in progress_bar(batches, desc="attribution", disable=not progress, unit="batch"):
                run = sites if multimodal else [s for s in sites if s.tower == "language"]
                for key, v in _batch_attribution(model, run, encode_samples(processor, chunk, images=images), device).items():
                    totals[key] += v
    finally:
        model.train(was_training)
    return {k: v / len(samples) for k, v in totals.items()}


def _check_params(alpha: float, eps: float, scope: str) -> Fraction:
    for name, v in (("alpha", alpha), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise AttributionError(f"{name} must be a finite number; got {v!r}.")
    if not 0 < alpha < 1:
        raise AttributionError(f"alpha must be in (0, 1); got {alpha}. Give a fraction, e.g. 0.05 for 5%.")
    if eps < 0:
        raise AttributionError(f"eps must be >= 0; got {eps}. The default is 1e-5.")
    if scope not in SCOPES:
        raise AttributionError(f"Unknown scope {scope!r}. Available: {', '.join(SCOPES)}.")
    return Fraction(repr(float(alpha)))  # exact ⌊α·N⌋: 0.29·100 must give 29


def attribution_table(model, processor, forget_samples: Sequence[Sample], retain_samples: Sequence[Sample], *,
                      alpha: float, eps: float = 1e-5, scope: str = "tower", **kw) -> pl.DataFrame:
    """One row per unit: tower, layer, unit, forget_attr (F), retain_attr (R), score = F/(R+ε), rank
    and selected (the top ⌊α·N⌋ scores per tower, or over all units with scope="global"; ties by
    (tower, layer, unit)). `prune.prune_units` prunes the selected rows. `kw` go to `unit_attribution`."""
    _check_params(alpha, eps, scope)
    return select_attribution(attribution_frame(model, processor, forget_samples, retain_samples, **kw),
                              alpha=alpha, eps=eps, scope=scope)


def attribution_frame(model, processor, forget_samples: Sequence[Sample], retain_samples: Sequence[Sample],
                      **kw) -> pl.DataFrame:
    """tower, layer, unit, forget_attr, retain_attr: the model-dependent half of `attribution_table`
    (the pipeline computes it once and selects at every α from it)."""
    f = unit_attribution(model, processor, forget_samples, **kw)
    r = unit_attribution(model, processor, retain_samples, **kw)
    order = {t: i for i, t in enumerate(TOWERS)}
    keys = sorted(f, key=lambda k: (order[k[0]], k[1]))
    return pl.DataFrame({
        "tower": [k[0] for k in keys for _ in range(len(f[k]))],
        "layer": np.concatenate([np.full(len(f[k]), k[1], dtype=np.int64) for k in keys]),
        "unit": np.concatenate([np.arange(len(f[k]), dtype=np.int64) for k in keys]),
        "forget_attr": np.concatenate([f[k] for k in keys]),
        "retain_attr": np.concatenate([r[k] for k in keys]),
    })


def select_attribution(table: pl.DataFrame, *, alpha: float, eps: float = 1e-5, scope: str = "tower") -> pl.DataFrame:
    """Score F/(R+ε) and the top-α selection of an `attribution_frame`."""
    a = _check_params(alpha, eps, scope)
    order = {t: i for i, t in enumerate(TOWERS)}
    num, den = pl.col("forget_attr"), pl.col("retain_attr") + eps
    table = table.with_columns(score=pl.when((num == 0) & (den == 0)).then(0.0).otherwise(num / den))
    group = ["tower"] if scope == "tower" else []
    table = table.sort([*group, "score", *NEURON], descending=[False] * len(group) + [True, False, False, False])
    rank = pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
    table = table.with_columns(rank=rank.over(group) if group else rank,
                               n=pl.len().over(group) if group else pl.lit(table.height))
    ks = {n: math.floor(a * n) for n in table["n"].unique().to_list()}
    if not any(ks.values()):
        n = max(ks)
        step = Fraction(10) ** (math.floor(math.log10(1 / n)) - 2)  # 1/N rounded up at 3 digits
        raise AttributionError(f"alpha={alpha:g} selects no unit: ⌊α·N⌋ = 0 in every {scope} group (largest "
                               f"N = {n}). Use alpha >= {float(math.ceil(Fraction(1, n) / step) * step):g} (1/{n}).")
    table = table.with_columns(selected=pl.col("rank") <= pl.col("n").replace_strict(ks, return_dtype=pl.Int64))
    return table.drop("n").sort(pl.col("tower").replace_strict(order), "layer", "unit").select(list(TABLE_SCHEMA))
