"""Activation extraction: per-sample MLP hidden-unit activations z(d), written to the activation store.

method.md, "Per-sample activation": z(d) for a neuron on sample d is the mean of the unit's
activation over the sample's positions; language model: every non-padding position of its input
(image tokens included in the multimodal form); vision tower: every position of the sample's
image(s). Runs over the four streams (forget, retain) x (multimodal, text) of stage 1.

How: a forward pre-hook on each site's down_proj / fc2 (its input: the hidden units' activations,
(B, T, d_mlp)) reduces on the device in one batched matmul of a 0/1 position mask with the
activations, into one (B, units) buffer that `collect` copies to the host once per batch: no
per-token tensor leaves the device and no Python loop runs over samples. The hooks are removed by a
context manager, also on error. Overhead vs a plain forward: `bench/bench_extract.py` (README).

Choices this module makes (and why):

- What a sample's forward contains (`with_answers=True`, the default): the QA pair as trained,
  prompt + " " + answer + end-of-turn, encoded with `prompts.encode(..., answers=...)`; method.md's
  "Data forms" shows each sample as the full exchange (`USER: <image>\\n... ASSISTANT: This person
  was born in Riga, Latvia.`). `with_answers=False` runs the generation prompt only.
- Aggregation (`AGGREGATIONS`), language tower: "mean" (default, method.md) over every non-padding
  position; "answer" over the answer tokens only (needs `with_answers=True`); "last" at the last
  non-padding position (the end-of-turn token after the answer; with `with_answers=False`, the last
  prompt token). Padding never counts, with either padding side.
- Vision tower: always the mean over every position of the sample's image(s), whatever the language
  aggregation ("answer" and "last" have no meaning for patches). For LLaVA that includes CLIP's CLS
  position: the tower computes it at every layer and every live layer's MLP runs on it, and the
  authors' released code also averages over every position; LLaVA's "default" feature strategy only
  drops CLS from the features read *after* the tower. Idefics2 has no CLS; its padding patches
  (pixel_attention_mask) are left out and images that are all zeros (which the model drops) are not
  counted. The adapter (`arch.ImageLayout`) maps images to samples: one image per multimodal sample
  for both architectures here, several images per sample are averaged together.
- Text-only streams: the vision tower does not run, so no vision partition is written (method.md,
  "Vision neurons on text-only input": their text-form activations are 0).
- Retain subsampling (`build_streams`): per form, the retain stream gets as many samples as the
  forget stream of that form (method.md: "D_r is subsampled (seeded) to as many samples as D_f"),
  drawn from one seeded order of the retain QA pairs shared by both forms, so the two retain
  streams ask about the same facts as far as the sizes allow.
- Linear outputs (`linear_outputs=True`, the released code's hook sites): a forward hook on each
  MLP Linear (gate_proj, up_proj, down_proj; fc1, fc2) reduces its output with the same masks and
  statistics as the hidden units (`arch.output_sites`); a layer's outputs are stored side by side in
  the sub-store `linear_outputs/` (store.py, "Linear outputs"). The hidden-unit store is unchanged.
  Every Linear, also where the released code hooks fewer (Idefics2's vision tower: fc1 only): the
  scoring leaves the others out per architecture (`arch.ReleasedTower`, released option `sites`), and a
  Linear's statistics do not depend on which others are hooked, so one extraction serves both settings.
- The forward runs the model's backbone (`ArchAdapter.backbone`), not the LM head: logits are not
  needed, and on a 32k vocabulary the head is a sizeable part of a forward.

Crash safety and determinism: `extract_activations` writes the whole extraction into a temporary
sibling folder (`.<name>.<random>.tmp`, ignored by every reader) and renames it onto `root` only
when every stream is written (`io.atomic_dir`); each part file is itself written atomically
(`store.write_partition`). A crash leaves `root` absent (or the previous complete extraction), never
a partial one. The same model, inputs and parameters (batch size included: padding changes the
float rounding) give the same bytes on the same machine and thread count.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from manu_core.progress import progress as progress_bar

from manu_core.arch import TOWERS, ArchError, MlpSite, get_adapter, mlp_sites, output_sites
from manu_core.data import Dataset, Sample, samples as profile_samples
from manu_core.io import atomic_dir
from manu_core.models import as_dtype
from manu_core.prompts import encode_samples, model_inputs
from manu_core.store import (FORMS, OUTPUTS_DIR, POOLED_LAYER, SPLITS, TOKEN_STATS, TOKEN_TAU, write_layout,
                              write_partition, write_positions)
from manu_core.vocab import did_you_mean

log = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "answer", "last")
PART_BYTES = 256 * 2**20  # about this much host memory per written chunk of samples (all sites together)


class ExtractionError(ValueError):
    """Bad extraction input: the message names the rule, the value and the fix."""


def _check_aggregation(aggregation: str, with_answers: bool = True) -> None:
    if aggregation not in AGGREGATIONS:
        hint = did_you_mean(aggregation, AGGREGATIONS)
        raise ExtractionError(f"Unknown aggregation {aggregation!r}.{hint} Available: {', '.join(AGGREGATIONS)}.")
    if aggregation == "answer" and not with_answers:
        raise ExtractionError(
            "aggregation='answer' averages over the answer tokens, so the forward must include the answers; "
            "got with_answers=False. Use with_answers=True or another aggregation."
        )


# ----------------------------------------------------------------------------------------------
# Position masks (host side, once per batch)


def position_mask(batch: Mapping[str, torch.Tensor], aggregation: str = "mean") -> torch.Tensor:
    """(B, T) bool: the language positions that count for each sample under `aggregation`."""
    _check_aggregation(aggregation)
    attn = batch["attention_mask"].bool()  # (B, T)
    if aggregation == "mean":
        mask = attn
    elif aggregation == "answer":
        if "answer_mask" not in batch:
            raise ExtractionError(
                "aggregation='answer' needs the batch's answer_mask; encode with answers "
                "(`prompts.encode(..., answers=...)`, i.e. with_answers=True)."
            )
        mask = batch["answer_mask"].bool() & attn
    else:  # last non-padding position, for left or right padding
        t = attn.shape[1]
        last = t - 1 - attn.flip(1).int().argmax(1)  # (B,)
        mask = torch.zeros_like(attn)
        mask[torch.arange(attn.shape[0]), last] = True
        mask &= attn
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ExtractionError(
            f"aggregation={aggregation!r} leaves no position for batch row(s) {empty[:5]} "
            "(an empty answer or an all-padding row); check those samples' text."
        )
    return mask


# ----------------------------------------------------------------------------------------------
# Hooks


def _site_order(s: MlpSite) -> tuple:
    """Sites in (tower, layer) order, a layer's hidden units before its Linear outputs (in forward order)."""
    return TOWERS.index(s.tower), s.layer, -1 if s.module is None else s.kind.linears.index(s.module)


def _matmul_f32(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w @ x (batched or not) with the result in float32. w holds 0/1 values, exact in any dtype;
    half-precision inputs accumulate in float32 (out_dtype on CUDA; elsewhere the one rounding is
    of the sum, before it is cast)."""
    if x.dtype == torch.float32:
        return torch.matmul(w, x)
    key = (x.device.type, x.dtype)
    if x.is_cuda and _OUT_DTYPE_OK.get(key, True):
        try:
            return (torch.bmm if x.dim() == 3 else torch.mm)(w, x, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_OK[key] = False  # this build/device lacks it: fall back from now on
    return torch.matmul(w, x).float()


_OUT_DTYPE_OK: dict = {}


def position_moments(x: torch.Tensor) -> tuple:
    """(rows, T, d) -> per position and unit over the rows, float64: (rows, mean, M2 = Σ(a − mean)²,
    Σ|a|, #(|a| > TOKEN_TAU), Σa²), each (T, d) but the count. Two-pass, as torch's std."""
    x = x.double()
    mean = x.mean(0)
    a = x.abs()
    return (x.shape[0], mean, ((x - mean) ** 2).sum(0), a.sum(0), (a > TOKEN_TAU).sum(0).double(), (x * x).sum(0))


def combine_moments(p: tuple, q: tuple) -> tuple:
    """The moments of two sets of rows together (Chan, Golub & LeVeque's pairwise update: the mean
    and M2 of the union without the rows themselves)."""
    n = p[0] + q[0]
    delta = q[1] - p[1]
    return (n, p[1] + delta * (q[0] / n), p[2] + q[2] + delta**2 * (p[0] * q[0] / n),
            p[3] + q[3], p[4] + q[4], p[5] + q[5])


def position_sums(m: tuple) -> tuple[int, int, torch.Tensor]:
    """Moments -> (positions T, rows, (4, d) float64 on their device): per unit, the sum over the T
    positions of the position's mean |a|, share of |a| > TOKEN_TAU, std (rows − 1 denominator; NaN for
    one row, as torch) and rms (store.POSITION_STATS order)."""
    n, _, m2, s_abs, s_active, s_sq = m
    std = (m2 / (n - 1)).sqrt() if n > 1 else torch.full_like(m2, float("nan"))
    return int(m2.shape[0]), int(n), torch.stack([s_abs / n, s_active / n, std, (s_sq / n).sqrt()]).sum(1)


def _on_host(sums: tuple[int, int, torch.Tensor]) -> tuple[int, int, np.ndarray]:
    return sums[0], sums[1], sums[2].cpu().numpy()


class ActivationRecorder:
    """Per-batch state of the hooks: position masks in, per-sample activations out.

    Use: `rec.set_batch(batch)` (the encoded host batch), run the forward, `rec.collect()`.
    Sites are ordered language first, then vision; the device buffer holds their sums side by side.
    """

    def __init__(self, model, sites: Sequence[MlpSite], aggregation: str, token_stats: bool = False,
                 position_stats: bool = False):
        _check_aggregation(aggregation)
        if position_stats and not token_stats:
            raise ExtractionError("position_stats needs token_stats (the store keeps them beside the token totals); "
                                  "pass token_stats=True too.")
        self.token_stats = token_stats
        self.position_stats = position_stats
        self.sites = tuple(sorted(sites, key=_site_order))
        if len({_site_order(s) for s in self.sites}) != len(self.sites):
            raise ExtractionError("the same site is listed twice; pass each (tower, layer, module) once.")
        self.aggregation = aggregation
        self.config = model.config
        self.adapter = get_adapter(model)
        offsets = np.cumsum([0] + [s.width for s in self.sites])
        self.offsets = {s: (int(a), int(b)) for s, a, b in zip(self.sites, offsets[:-1], offsets[1:])}
        self.width = int(offsets[-1])
        self.n_language = sum(s.width for s in self.sites if s.tower == "language")
        self._batch_size: int | None = None

    # -- per batch ------------------------------------------------------------------------------

    def set_batch(self, batch: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> None:
        """Prepare masks for the next forward from its (host) batch; `device`: where its inputs go
        (masks move there now, once, so the hooks never wait on a host copy)."""
        self._batch_size = b = int(batch["input_ids"].shape[0])
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._cache: dict = {}
        self._out: torch.Tensor | None = None  # (B, units) float32 sums, on the first hook's device
        self._tok: torch.Tensor | None = None  # (B, 4, units) float32 token statistics (store.TOKEN_STATS)
        self._max: dict[MlpSite, torch.Tensor] = {}  # largest counted |a_t| per site in this batch (device scalars)
        self._fired = [False] * len(self.sites)
        self._positions: dict[MlpSite, tuple] = {}  # each site's position sums (position_stats), on its device
        self._pooled: dict[tuple, tuple | None] = {}  # (tower, module) -> the moments of its layers together
        self._lang = self._vis = None
        if self.n_language:
            mask = position_mask(batch, self.aggregation)  # (B, T) bool
            self._lang = (mask.to(dev, non_blocking=True), mask.sum(1, keepdim=True).float().to(dev))
        if self.n_language == self.width:
            return
        if "pixel_values" not in batch:
            raise ExtractionError(
                "vision sites were given for a batch without images (the vision tower does not run on "
                "text-only input); pass language sites only for text-only batches."
            )
        layout = self.adapter.image_layout(self.config, batch)
        seen = torch.bincount(layout.image_sample, minlength=b)  # (B,) images per sample
        if bool((seen == 0).any()):
            rows = (seen == 0).nonzero().flatten().tolist()
            raise ExtractionError(
                f"batch row(s) {rows[:5]} have no image reaching the vision tower (an all-zero image is "
                "dropped as padding by Idefics2); check those samples' images or drop them."
            )
        assign = torch.nn.functional.one_hot(layout.image_sample, b).T.float()  # (B, N_images)
        if layout.positions is None:  # every position counts: count = images x positions, known in the hook
            counts = seen.float().unsqueeze(1)
        else:
            counts = (assign @ layout.positions.flatten(1).sum(1).float()).unsqueeze(1)
        pos = None if layout.positions is None else layout.positions.to(dev, non_blocking=True)
        self._vis = (layout.image_sample.numel(), pos, assign.to(dev, non_blocking=True), counts.to(dev),
                     layout.positions is None)

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self._out is None:
            self._out = torch.empty(self._batch_size, self.width, dtype=torch.float32, device=device)
            if self.token_stats:
                self._tok = torch.empty(self._batch_size, len(TOKEN_STATS), self.width, dtype=torch.float32,
                                        device=device)
        return self._out

    def _stats(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., 5d): the activation followed by the token statistics' summands
        (|a|, a², a > 0, |a| > TOKEN_TAU), in float32, so one matmul with the position weights sums all five."""
        if not self.token_stats:
            return x
        x = x.float()
        a = x.abs()
        return torch.cat([x, a, x * x, (x > 0).float(), (a > TOKEN_TAU).float()], dim=-1)

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _language(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d_mlp) -> (B, d_mlp) float32 sums over the counted positions
        mask, _ = self._lang
        if x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            raise ExtractionError(
                f"language MLP input has shape {tuple(x.shape)} but the batch is {tuple(mask.shape)} (B, T); "
                "padding-free / packed batches are not supported: run the model with an attention mask."
            )
        y = self._stats(x)
        w = self._cached(("lang", y.device, y.dtype), lambda: mask.to(y.device, y.dtype).unsqueeze(1))  # (B, 1, T)
        if self.token_stats:
            self._last_max = (x.abs() * w.transpose(1, 2)).amax().float()  # counted positions only
        return _matmul_f32(w, y).squeeze(1)  # (B, 1, T) @ (B, T, d) -> (B, d) (with token stats: 5d)

    def _vision(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N_images, S, d) or (P, d) -> (B, d) float32 sums over each sample's image positions
        n, pos, assign, counts, all_positions = self._vis
        if pos is None and x.dim() != 3:
            raise ArchError(f"{self.adapter.model_type}: a 2-d vision MLP input needs ImageLayout.positions.")
        expect = (n, x.shape[1] if pos is None else pos.shape[1]) if x.dim() == 3 else tuple(pos.shape[1:])
        if tuple(x.shape[:-1]) != tuple(expect):
            raise ExtractionError(
                f"vision MLP input has shape {tuple(x.shape)} but the image layout expects {tuple(expect)} positions "
                f"(arch {self.adapter.model_type}); the adapter's image_layout does not match this model."
            )
        if all_positions and not self._cache.get("vis_counts_scaled"):
            counts.mul_(x.shape[1])  # images per sample x positions per image (device op, no sync)
            self._cache["vis_counts_scaled"] = True

        def weights():
            if pos is None:
                return torch.ones(n, 1, x.shape[1], dtype=y.dtype, device=x.device)  # (N, 1, S)
            w = pos.to(x.device, y.dtype)
            return w.unsqueeze(1) if x.dim() == 3 else w  # (N, 1, S) or (N, P)

        y = self._stats(x)
        w = self._cached(("vis", y.device, y.dtype), weights)
        a = self._cached(("assign", x.device), lambda: assign.to(x.device))  # (B, N)
        if self.token_stats:
            self._last_max = (x.abs() * (w.transpose(-1, -2) if x.dim() == 3 else w.T.sum(1, keepdim=True).clamp(max=1))
                              ).amax().float()
        per_image = _matmul_f32(w, y).reshape(n, -1)  # (N, d) (with token stats: 5d)
        return a @ per_image  # (B, d)

    def _record_positions(self, site: MlpSite, x: torch.Tensor) -> None:
        """The released code's per-position statistics (store.py, "Position statistics"): moments over
        the rows of the hooked tensor at each position, padding included; also combined across the
        tower's layers (its pool_layers quirk)."""
        if x.dim() != 3:
            raise ExtractionError(
                f"position statistics need the MLP input as (rows, positions, units); {site.name} of "
                f"{self.adapter.model_type} gives {tuple(x.shape)}. Extract without position_stats for this model."
            )
        own = position_moments(x)
        self._positions[site] = position_sums(own)  # reduced now: only the pooled moments stay (T, d)
        key = (site.tower, site.module)  # the layers of a tower pool per hooked module
        if key not in self._pooled:
            self._pooled[key] = own
        elif (pooled := self._pooled[key]) is not None:
            if pooled[1].shape != own[1].shape:  # layers of unlike widths or lengths: no pool
                self._pooled[key] = None
            else:  # a model split over devices: the pool stays where its first layer ran
                own = tuple(t.to(pooled[1].device) if torch.is_tensor(t) else t for t in own)
                self._pooled[key] = combine_moments(pooled, own)

    def hook(self, i: int):
        site = self.sites[i]
        a, b = self.offsets[site]
        reduce = self._language if site.tower == "language" else self._vision

        def record(module, args, output=None):  # a forward pre-hook, or (Linear outputs) a forward hook
            x = args[0] if site.module is None else output  # hidden units in, or the Linear's output
            if self._batch_size is None:
                raise ExtractionError(
                    f"activation hook {site.name} fired before `set_batch`; call recorder.set_batch(batch) "
                    "before each forward inside `activation_hooks`."
                )
            if self._fired[i]:
                raise ExtractionError(
                    f"activation hook {site.name} fired twice for one batch (generate? gradient "
                    "checkpointing?); run one plain forward per set_batch."
                )
            self._fired[i] = True
            out = self._buffer(x.device)
            r = reduce(x).to(out.device, non_blocking=True)
            if not self.token_stats:
                out[:, a:b] = r
                return
            out[:, a:b] = r[:, : b - a]
            self._tok[:, :, a:b] = r[:, b - a :].reshape(r.shape[0], len(TOKEN_STATS), b - a)
            self._max[site] = self._last_max.to(out.device)
            if self.position_stats:
                self._record_positions(site, x)

        return record

    def collect(self) -> dict[MlpSite, np.ndarray]:
        """Per-sample activations of the last forward: site -> (B, width) float32 (host, one copy)."""
        missing = [s.name for s, f in zip(self.sites, self._fired) if not f]
        if missing:
            raise ExtractionError(
                f"site(s) {', '.join(missing)} did not run in this forward (vision sites on a text-only "
                "batch, or a forward that skipped them); pass only the sites the forward runs."
            )
        out = self._out
        nl = self.n_language
        if nl:
            out[:, :nl] /= self._lang[1].to(out.device)
        if nl < self.width:
            out[:, nl:] /= self._vis[3].to(out.device)
        if self.token_stats:  # token counts per tower before `out` is divided into means
            self.last_tokens = {"language": None if self._lang is None else self._lang[1].flatten().cpu().numpy(),
                                "vision": None if self._vis is None else self._vis[3].flatten().cpu().numpy()}
            tok = self._tok.cpu().numpy()
            self.last_token_stats = {s: {k: tok[:, j, a:b] for j, k in enumerate(TOKEN_STATS)}
                                     for s, (a, b) in self.offsets.items()}
            maxima = torch.stack([self._max[s] for s in self.sites]).cpu().tolist()
            self.last_max_abs = dict(zip(self.sites, maxima))
        if self.position_stats:
            self.last_positions = {s: _on_host(v) for s, v in self._positions.items()}
            self.last_pooled = {k: _on_host(position_sums(m)) for k, m in self._pooled.items() if m is not None}
        host = out.cpu().numpy()  # the one device -> host copy per batch: (B, units)
        self._batch_size = None
        return {s: host[:, a:b] for s, (a, b) in self.offsets.items()}


@contextmanager
def activation_hooks(model, sites: Sequence[MlpSite], aggregation: str = "mean",
                     token_stats: bool = False, position_stats: bool = False) -> Iterator[ActivationRecorder]:
    """Forward pre-hooks on every hidden-unit site's down_proj / fc2 and forward hooks on every
    Linear-output site's Linear (`arch.output_sites`), removed on exit (also after an error)."""
    recorder = ActivationRecorder(model, sites, aggregation, token_stats, position_stats)
    handles = []
    try:
        for i, site in enumerate(recorder.sites):
            target = model.get_submodule(site.hook_path)
            register = target.register_forward_pre_hook if site.module is None else target.register_forward_hook
            handles.append(register(recorder.hook(i)))
        yield recorder
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Streams


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _encoded(processor, batches: list[list[Sample]], prefetch: bool, **kw) -> Iterator[tuple[list[Sample], dict]]:
    """(samples, encoded batch) in order; with `prefetch`, batch i+1 is tokenised and its images
    processed in a worker thread while batch i runs on the accelerator."""
    if not prefetch or len(batches) < 2:
        for chunk in batches:
            yield chunk, encode_samples(processor, chunk, **kw)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="manu-encode") as pool:
        nxt = pool.submit(encode_samples, processor, batches[0], **kw)
        for i, chunk in enumerate(batches):
            enc = nxt.result()
            if i + 1 < len(batches):
                nxt = pool.submit(encode_samples, processor, batches[i + 1], **kw)
            yield chunk, enc


def iter_stream(
    model,
    processor,
    samples: Sequence[Sample],
    *,
    sites: Sequence[MlpSite] | None = None,
    aggregation: str = "mean",
    batch_size: int = 32,
    with_answers: bool = True,
    padding_side: str = "right",
    progress: bool = True,
    desc: str = "extract",
    prefetch: bool | None = None,
    token_stats: bool = False,
    position_stats: bool = False,
    images=None,
) -> Iterator[tuple]:
    """Per batch: (its samples, site -> (B, width) activations). Vision sites are dropped for a
    text-only stream. The model runs where it is, in its dtype, in eval mode. `prefetch` encodes the
    next batch in a thread during the forward (default: on when the model is on an accelerator,
    where the GPU would otherwise wait for tokenising and image processing; off on CPU, where both
    compete for the same cores). With `token_stats`, each batch also yields its `BatchTokens` (the
    store's token statistics: position counts, per-unit token sums, largest |a_t| per site; with
    `position_stats` also the per-position statistics of each site and tower, store.py).
    `images` resolves the samples' image keys (None: the embedded portraits; see prompts.encode_samples)."""
    _check_aggregation(aggregation, with_answers)
    if batch_size < 1:
        raise ExtractionError(f"batch_size must be >= 1; got {batch_size}.")
    samples = list(samples)
    if not samples:
        return
    has_image = {s.image is not None for s in samples}
    if len(has_image) > 1:
        raise ExtractionError("a stream mixes multimodal and text-only samples; extract each form separately.")
    sites = list(mlp_sites(model) if sites is None else sites)
    if True not in has_image:
        sites = [s for s in sites if s.tower == "language"]
    if not sites:
        return
    backbone = model.get_submodule(get_adapter(model).backbone)
    device = _input_device(model)
    was_training = model.training
    model.eval()
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    prefetch = device.type != "cpu" if prefetch is None else prefetch
    encoded = _encoded(processor, batches, prefetch, with_answers=with_answers, padding_side=padding_side,
                       images=images)
    try:
        with activation_hooks(model, sites, aggregation, token_stats, position_stats) as rec, torch.inference_mode():
            for chunk, enc in progress_bar(encoded, total=len(batches), desc=desc, disable=not progress,
                                           unit="batch"):
                rec.set_batch(enc, device)
                backbone(**model_inputs(enc, device), use_cache=False)
                acts = rec.collect()
                if not token_stats:
                    yield chunk, acts
                    continue
                yield chunk, acts, BatchTokens(rec.last_tokens, rec.last_token_stats, rec.last_max_abs,
                                               rec.last_positions if position_stats else None,
                                               rec.last_pooled if position_stats else None)
    finally:
        encoded.close()
        model.train(was_training)


@dataclass(frozen=True)
class BatchTokens:
    """One batch's token statistics (store.py): positions counted per sample for each tower, the per-unit
    token sums of each site ({abs, sq, pos, active} -> (B, width)), the largest counted |a_t| per site."""

    tokens: dict[str, np.ndarray | None]  # tower -> (B,) positions per sample
    stats: dict[MlpSite, dict[str, np.ndarray]]
    max_abs: dict[MlpSite, float]
    positions: dict[MlpSite, tuple[int, int, np.ndarray]] | None = None  # (T, rows, (4, width)): position_sums
    pooled: dict[tuple, tuple[int, int, np.ndarray]] | None = None  # the same per (tower, module), its layers together


def extract_stream(model, processor, samples: Sequence[Sample], **kwargs) -> dict[MlpSite, np.ndarray]:
    """All of one stream in memory: site -> (n_samples, width) float32, rows in `samples` order.
    Keyword arguments as `iter_stream`."""
    parts: dict[MlpSite, list[np.ndarray]] = {}
    for _, acts in iter_stream(model, processor, samples, **kwargs):
        for site, a in acts.items():
            parts.setdefault(site, []).append(a)
    return {s: np.concatenate(v) for s, v in parts.items()}


def build_streams(
    dataset: Dataset, *, retain_size: int | str | None = "match", seed: int = 0
) -> dict[tuple[str, str], list[Sample]]:
    """The four streams (split, form) -> samples, in dataset order.

    retain_size: "match" (default) = as many retain samples per form as forget samples of that form
    (all of them if retain has fewer); an int = that many per form; None = every retain sample.
    The subsample comes from one seeded order of the retain QA pairs, shared by both forms.
    """
    streams: dict[tuple[str, str], list[Sample]] = {}
    for split, ids in (("forget", dataset.split.forget_ids), ("retain", dataset.split.retain_ids)):
        every = [s for pid in ids for s in profile_samples(dataset.profile(pid))]
        for form in FORMS:
            streams[(split, form)] = [s for s in every if s.form == form]
    return match_retain(streams, retain_size, seed)


def match_retain(streams: dict[tuple[str, str], list[Sample]], retain_size: int | str | None = "match",
                 seed: int = 0) -> dict[tuple[str, str], list[Sample]]:
    """The retain streams subsampled (see `build_streams`): one seeded order of the retain QA pairs
    (sample ids without their form), shared by both forms."""
    if not (retain_size is None or retain_size == "match" or (isinstance(retain_size, int) and retain_size >= 1)):
        raise ExtractionError(f"retain_size must be 'match', an integer >= 1 or None (all); got {retain_size!r}.")
    if retain_size is None:
        return streams
    pairs = sorted({s.sample_id.rsplit("/", 1)[0] for f in FORMS for s in streams[("retain", f)]})
    random.Random(f"retain-subsample/{seed}").shuffle(pairs)
    rank = {p: i for i, p in enumerate(pairs)}
    for form in FORMS:
        pool = streams[("retain", form)]
        want = len(streams[("forget", form)]) if retain_size == "match" else retain_size
        if want > len(pool):
            if retain_size != "match":
                raise ExtractionError(
                    f"retain_size={retain_size} but the retain set has only {len(pool)} {form} samples; "
                    "use a smaller retain_size, None (all) or 'match'."
                )
            log.warning("retain has %d %s samples, fewer than the forget set's %d: using all", len(pool), form, want)
            continue
        keep = set(sorted(pool, key=lambda s: rank[s.sample_id.rsplit("/", 1)[0]])[:want])
        streams[("retain", form)] = [s for s in pool if s in keep]
    return streams


def _part_rows(width: int, batch_size: int) -> int:
    return max(batch_size, (PART_BYTES // max(4 * width, 1)) // batch_size * batch_size)


def extract_activations(
    model,
    processor,
    data: Dataset | Mapping[tuple[str, str], Sequence[Sample]],
    root: str | Path,
    *,
    aggregation: str = "mean",
    batch_size: int = 32,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
    retain_size: int | str | None = "match",
    seed: int = 0,
    with_answers: bool = True,
    towers: tuple[str, ...] = TOWERS,
    part_rows: int | None = None,
    progress: bool = True,
    prefetch: bool | None = None,
    token_stats: bool = True,
    position_stats: bool = False,
    linear_outputs: bool = False,
    images=None,
) -> Path:
    """Extract every live site over the four streams into the activation store at `root`.

    `data`: a Dataset (streams from `build_streams(data, retain_size=..., seed=...)`) or a mapping
    (split, form) -> samples, used as given. `device`/`dtype`: where and in what the model runs (the
    model is moved in place, as `nn.Module.to` does; None leaves it where it is; a model dispatched
    with a device map is never moved). Activations are stored as float32 whatever the dtype. Parts hold `part_rows` samples
    (default: about 256 MiB of activations per chunk, so host memory stays bounded on a 7B model).
    `root` appears only once complete (see the module docstring); an existing `root` is replaced.
    `token_stats` (default on) also stores each sample's token statistics (store.py), which the
    `released` and `selective` scoring modes read; off, the store holds the per-sample means only.
    `position_stats` (default off) also stores, per batch, the released code's per-position statistics
    (store.py, "Position statistics"; the `released` mode's `per_position` option reads them): they
    depend on how samples are batched, so `batch_size` is then part of what is measured.
    `linear_outputs` (default off) also hooks the output of every Linear of each MLP block (gate_proj,
    up_proj, down_proj; fc1, fc2), the authors' released code's hook sites, into the store's OUTPUTS_DIR
    sub-store (store.py, "Linear outputs"; the `released` mode's `linear_outputs` option reads it),
    with the same statistics as the hidden units; there every layer is hooked, dead vision layers
    included (LLaVA's last), as the released code does. Where that code hooks fewer Linears (Idefics2's
    vision fc2 outputs), the scoring leaves them out (module docstring).
    `images` resolves image keys (None: the embedded portraits; a local MLLMU-Bench's `Benchmark.image`).
    """
    _check_aggregation(aggregation, with_answers)
    dtype = as_dtype(dtype)
    if getattr(model, "hf_device_map", None) is None and (device is not None or dtype is not None):
        model.to(device=device, dtype=dtype)
    if isinstance(data, Dataset):
        streams = build_streams(data, retain_size=retain_size, seed=seed)
    else:
        streams = {tuple(k): list(v) for k, v in data.items()}
        bad = [k for k in streams if k not in {(s, f) for s in SPLITS for f in FORMS}]
        if bad:
            raise ExtractionError(f"stream keys must be (split, form) with split in {SPLITS} and form in {FORMS}; got {bad}.")
    for (split, form), ss in streams.items():
        wrong = [s.sample_id for s in ss if s.form != form]
        if wrong:
            raise ExtractionError(f"stream {split}/{form} holds samples of another form: {wrong[:3]}.")
        if not ss:
            raise ExtractionError(f"stream {split}/{form} is empty; every stream needs at least one sample.")
    sites = mlp_sites(model, towers=tuple(towers))
    if linear_outputs:
        if not token_stats:
            raise ExtractionError("linear_outputs are read by the released mode, which needs token statistics; "
                                  "pass token_stats=True (the default) with linear_outputs=True.")
        # every layer's Linears, the dead vision layer's too: the released code hooks them all
        sites += output_sites(model, mlp_sites(model, towers=tuple(towers), live_only=False))
    total_width = sum(s.width for s in sites)
    rows_per_part = part_rows or _part_rows(total_width, batch_size)
    if rows_per_part % batch_size:
        raise ExtractionError(f"part_rows must be a multiple of batch_size ({batch_size}); got {rows_per_part}.")
    root = Path(root)
    with atomic_dir(root) as tmp:
        for (split, form), ss in sorted(streams.items()):
            part, rows = 0, []
            it = iter_stream(
                model, processor, ss, sites=sites, aggregation=aggregation, batch_size=batch_size,
                with_answers=with_answers, progress=progress, desc=f"extract {split}/{form}", prefetch=prefetch,
                token_stats=token_stats, position_stats=position_stats, images=images,
            )
            first = 0  # the stream's index of the part's first batch
            for i, batch in enumerate(it, 1):
                rows.append(batch)
                if i * batch_size % rows_per_part == 0 or i * batch_size >= len(ss):
                    _write_part(tmp, split, form, rows, part, first)
                    part, rows, first = part + 1, [], i
        if linear_outputs:
            write_layout(tmp / OUTPUTS_DIR, {tower: [(s.module, s.width) for s in group]
                                             for (folder, tower, _layer), group in _store_groups(sites).items()
                                             if folder})
    log.info("wrote activations of %d sites x %s streams to %s", len(sites), len(streams), root)
    return root


def _store_groups(sites) -> dict[tuple[str, str, int], list[MlpSite]]:
    """(store folder, tower, layer) -> the sites stored there, side by side: a hidden-unit site alone
    at the root; a layer's Linear-output sites, in forward order, under OUTPUTS_DIR."""
    groups: dict[tuple[str, str, int], list[MlpSite]] = {}
    for site in sorted(sites, key=_site_order):
        groups.setdefault(("" if site.module is None else OUTPUTS_DIR, site.tower, site.layer), []).append(site)
    return groups


def _side_by_side(values: list[tuple[int, int, np.ndarray]]) -> tuple[int, int, np.ndarray]:
    """Position sums of the modules of one layer (or pool), joined along the units."""
    if len({v[:2] for v in values}) != 1:
        raise ExtractionError(f"the Linear outputs of one layer saw different (positions, rows): "
                              f"{sorted({v[:2] for v in values})}; report this as a bug.")
    return values[0][0], values[0][1], np.concatenate([v[2] for v in values], axis=1)


def _write_part(root: Path, split: str, form: str, rows: list, part: int, first_batch: int = 0) -> None:
    """rows: (samples, site -> (B, width)[, BatchTokens]) per batch; `first_batch`: the stream's index
    of rows[0] (position statistics are kept per batch). Linear-output sites go to root/OUTPUTS_DIR,
    a layer's modules side by side (store.py, "Linear outputs")."""
    samples = [s for r in rows for s in r[0]]
    sids, pids = [s.sample_id for s in samples], [s.profile_id for s in samples]
    groups = _store_groups(rows[0][1])
    tokens = len(rows[0]) == 3
    for (folder, tower, layer), sites in groups.items():
        acts = np.concatenate([np.concatenate([r[1][site] for site in sites], axis=1) for r in rows])  # (n, width)
        tok = {}
        if tokens:
            tok = dict(tokens=np.concatenate([r[2].tokens[tower] for r in rows]).round().astype(np.int64),
                       token_stats={k: np.concatenate([np.concatenate([r[2].stats[site][k] for site in sites], axis=1)
                                                       for r in rows]) for k in TOKEN_STATS},
                       max_abs=max(r[2].max_abs[site] for r in rows for site in sites))
        write_partition(root / folder, split=split, form=form, tower=tower, layer=layer,
                        sample_ids=sids, profile_ids=pids, activations=acts, part=part, **tok)
    if not tokens or rows[0][2].positions is None:
        return
    for folder, tower in sorted({(f, t) for f, t, _ in groups}):
        layers = {layer: sites for (f, t, layer), sites in groups.items() if (f, t) == (folder, tower)}
        modules = [site.module for site in next(iter(layers.values()))]
        records = []
        for b, r in enumerate(rows, first_batch):
            records += [(b, layer, *_side_by_side([r[2].positions[site] for site in sites]))
                        for layer, sites in sorted(layers.items())]
            pooled = [r[2].pooled.get((tower, m)) for m in modules]
            if all(p is not None for p in pooled):
                records.append((b, POOLED_LAYER, *_side_by_side(pooled)))
        write_positions(root / folder, split=split, form=form, tower=tower, part=part, records=records)
