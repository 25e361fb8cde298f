"""Logit lens: how much of the ground-truth answer each language layer's residual stream carries.

For a question-answer pair fed teacher-forced (prompt + answer, as trained), the hidden state that
leaves language layer l at the position before answer token t is decoded as if it were the last
layer's: p_l(t) = softmax(lm_head(final_norm(h_l)))[t]. A sample's value at layer l is the mean of
p_l over its answer tokens (the turn's closing token excluded); a stream's value is the mean over its
samples. At the last layer this is exactly the model's own probability of the answer (tested).
This is the quantity behind the paper's knowledge-retention heatmap (Fig. 2).

    table = lens_table(model, processor, streams)   # split, form, layer, prob, samples
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
import torch
from manu_core.progress import progress as progress_bar

from manu_core.arch import ArchError, _resolve, get_adapter
from manu_core.data import Sample
from manu_core.prompts import encode_samples, end_of_answer, model_inputs

LENS_SCHEMA = {"split": pl.String, "form": pl.String, "layer": pl.Int64, "prob": pl.Float64, "samples": pl.Int64}


def language_readout(model) -> tuple[torch.nn.ModuleList, torch.nn.Module, torch.nn.Module]:
    """(decoder blocks, final norm, LM head) of the language model: the final norm sits beside the
    blocks (`<...>.layers` -> `<...>.norm`), the head is the model's output embedding."""
    adapter = get_adapter(model)
    found = _resolve(model, adapter.language.layers)
    if found is None:
        raise ArchError(f"{adapter.model_type}: no language layers at {' or '.join(adapter.language.layers)}.")
    path, blocks = found
    norm_path = path.rsplit(".", 1)[0] + ".norm"
    try:
        norm = model.get_submodule(norm_path)
    except AttributeError:
        raise ArchError(f"{adapter.model_type}: no final norm at {norm_path}; the logit lens needs the norm "
                        "that the last layer's output passes through before the LM head.") from None
    head = model.get_output_embeddings()
    if head is None:
        raise ArchError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None).")
    return blocks, norm, head


def _answer_targets(batch: Mapping[str, torch.Tensor], n_end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, token) of every answer token but the last `n_end` (the turn's closing
    token(s)); `position` is where the token is predicted from (one before it)."""
    mask = batch["answer_mask"].clone()
    if n_end:
        # drop each row's last n_end answer positions
        rank_from_end = mask.flip(1).cumsum(1).flip(1)  # n answer tokens at or after each position
        mask &= rank_from_end > n_end
    rows, pos = mask.nonzero(as_tuple=True)
    return rows, pos - 1, batch["input_ids"][rows, pos]


@torch.no_grad()
def logit_lens(
    model,
    processor,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    system: str | None = None,
    progress: bool = False,
    images=None,
) -> np.ndarray:
    """(n_layers,) float64: the mean over `samples` of each sample's mean answer-token probability
    decoded from language layer l's output (layer index 0 = first block). Samples with and without
    an image may be mixed; they are batched apart."""
    if not samples:
        raise ValueError("logit_lens needs at least one sample; got none.")
    blocks, norm, head = language_readout(model)
    n_end = len(processor.tokenizer(end_of_answer(processor), add_special_tokens=False)["input_ids"])
    captured: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(i):
        def fn(module, args, output):
            captured[i] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    totals = np.zeros(len(blocks))
    try:
        bar = progress_bar(total=len(samples), desc="logit lens", unit="sample", disable=not progress)
        groups = [[s for s in samples if s.image is not None], [s for s in samples if s.image is None]]
        for chunk in (g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)):
            batch = encode_samples(processor, chunk, with_answers=True, system=system, images=images)
            rows, pos, tokens = _answer_targets(batch, n_end)
            model(**model_inputs(batch, device))
            per_row = torch.bincount(rows, minlength=len(chunk)).clamp(min=1).double()
            for i, h in enumerate(captured):
                hs = h[rows.to(h.device), pos.to(h.device)]  # (n answer tokens, d)
                logits = head(norm(hs)).double()
                p = torch.softmax(logits, -1).gather(-1, tokens.to(h.device)[:, None])[:, 0].cpu()
                totals[i] += float((torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, p) / per_row).sum())
            bar.update(len(chunk))
        bar.close()
    finally:
        for h in handles:
            h.remove()
    return totals / len(samples)


def lens_table(
    model,
    processor,
    streams: Mapping[tuple[str, str], Sequence[Sample]],
    *,
    max_samples: int = 32,
    seed: int = 0,
    **kwargs,
) -> pl.DataFrame:
    """`logit_lens` of each (split, form) stream on at most `max_samples` seeded samples of it
    (0 = all): one row per (split, form, layer)."""
    rows = []
    for (split, form), samples in sorted(streams.items()):
        samples = list(samples)
        if max_samples and len(samples) > max_samples:
            samples = random.Random(f"{seed}-{split}-{form}").sample(samples, max_samples)
        probs = logit_lens(model, processor, samples, **kwargs)
        rows += [{"split": split, "form": form, "layer": i, "prob": float(p), "samples": len(samples)}
                 for i, p in enumerate(probs)]
    return pl.DataFrame(rows, schema=LENS_SCHEMA)
