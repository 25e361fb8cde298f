"""Evaluation primitives: batched greedy generation and option-likelihood multiple choice.

What the foundation needs to judge the vanilla model (answer recall, multiple-choice accuracy per
set and form). Scorers are named in every result (`scorer` field) as evaluation.md asks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from manu_core.data import EvalItem
from manu_core.portraits import image_for
from manu_core.prompts import build_prompt, encode, model_inputs


def _chunks(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _by_form(items: Sequence[EvalItem]) -> list[list[EvalItem]]:
    groups: dict[bool, list[EvalItem]] = defaultdict(list)
    for it in items:
        groups[it.image is not None].append(it)
    return [groups[k] for k in sorted(groups)]


@torch.no_grad()
def generate(
    model,
    processor,
    items: Sequence[EvalItem],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 50,
    device: str | torch.device = "cpu",
    system: str | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Greedy answers {item_id: text}; batched with left padding and the KV cache."""
    out: dict[str, str] = {}
    tok = processor.tokenizer
    bar = tqdm(total=len(items), desc="generate", disable=not progress, unit="q")
    for group in _by_form(items):
        for chunk in _chunks(group, batch_size):
            prompts = [build_prompt(processor, it.question, image=it.image is not None, system=system) for it in chunk]
            images = [image_for(it.image) if it.image else None for it in chunk]
            enc = encode(processor, prompts, images, padding_side="left")
            ids = model.generate(**model_inputs(enc, device), max_new_tokens=max_new_tokens, do_sample=False)
            new = ids[:, enc["input_ids"].shape[1] :]
            for it, text in zip(chunk, tok.batch_decode(new, skip_special_tokens=True)):
                out[it.item_id] = text.strip()
            bar.update(len(chunk))
    bar.close()
    return out


def contains_fact(prediction: str, fact: str) -> bool:
    """The benchmark's fill-in-the-blank rule, used for answer recall too: the lower-cased ground
    truth is a substring of the lower-cased answer."""
    return fact.lower().strip() in prediction.lower()


@torch.no_grad()
def option_logprobs(
    model,
    processor,
    items: Sequence[EvalItem],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    system: str | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Multiple choice by likelihood: {item_id: [score per option]}.

    Each option is scored inside the answer sentence it completes (`cloze_answer` with `__`
    replaced), and the score is the mean log-probability of the tokens from the first token where
    the four completed answers differ to the end of the answer: the shared prefix, identical for all
    options, is left out so it neither dilutes nor favours any option.
    """
    scores: dict[str, list[float]] = {}
    bar = tqdm(total=len(items), desc="multiple choice", disable=not progress, unit="q")
    for group in _by_form(items):
        for chunk in _chunks(group, batch_size):
            prompts, images, answers = [], [], []
            for it in chunk:
                p = build_prompt(processor, it.question, image=it.image is not None,
                                 system=system)
                im = image_for(it.image) if it.image else None
                for opt in it.options:
                    prompts.append(p)
                    images.append(im)
                    answers.append(it.cloze_answer.replace("__", opt) if "__" in it.cloze_answer else opt)
            enc = encode(processor, prompts, images, answers)
            logits = model(**model_inputs(enc, device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            target = enc["input_ids"][:, 1:].to(device)
            tok_lp = logp.gather(-1, target[..., None])[..., 0]  # (B*4, T-1)
            mask = enc["answer_mask"][:, 1:].to(device)
            start_row = 0
            for it in chunk:
                rows = slice(start_row, start_row + len(it.options))
                start_row += len(it.options)
                ids, m, lp = target[rows], mask[rows], tok_lp[rows]
                differ = (ids != ids[:1]).any(0) & m.any(0)
                start = int(differ.nonzero()[0]) if bool(differ.any()) else 0
                keep = m.clone()
                keep[:, :start] = False
                scores[it.item_id] = ((lp * keep).sum(1) / keep.sum(1).clamp(min=1)).tolist()
            bar.update(len(chunk))
    bar.close()
    return scores


@dataclass(frozen=True)
class Summary:
    set: str
    form: str
    metric: str  # "mc_accuracy" | "recall"
    scorer: str  # "likelihood" | "contains-key-fact"
    value: float
    n: int


def evaluate_basic(
    model,
    processor,
    items: Sequence[EvalItem],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> tuple[list[Summary], dict]:
    """Answer recall (greedy generation contains the key fact) and likelihood multiple-choice
    accuracy per (set, form). Returns the summaries and the per-item details."""
    gen_items = [it for it in items if it.task == "gen"]
    mc_items = [it for it in items if it.task == "mc"]
    preds = generate(model, processor, gen_items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     device=device, progress=progress)
    opt_scores = option_logprobs(model, processor, mc_items, batch_size=max(1, batch_size // 4), device=device,
                                 progress=progress)
    acc: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    details = {"generation": {}, "mc": {}}
    for it in gen_items:
        ok = contains_fact(preds[it.item_id], it.key_fact)
        acc[(it.set, it.form, "recall")].append(float(ok))
        details["generation"][it.item_id] = {"prediction": preds[it.item_id], "key_fact": it.key_fact, "correct": ok}
    for it in mc_items:
        s = opt_scores[it.item_id]
        pick = max(range(len(s)), key=s.__getitem__)
        acc[(it.set, it.form, "mc_accuracy")].append(float(pick == it.correct))
        details["mc"][it.item_id] = {"scores": s, "pick": pick, "correct": it.correct}
    scorer = {"recall": "contains-key-fact", "mc_accuracy": "likelihood"}
    summaries = [Summary(s, f, m, scorer[m], sum(v) / len(v), len(v)) for (s, f, m), v in sorted(acc.items())]
    return summaries, details


def format_summaries(summaries: Sequence[Summary]) -> str:
    """A table: rows (set, metric), columns multimodal / text / average / gap."""
    table: dict[tuple[str, str], dict[str, Summary]] = defaultdict(dict)
    for s in summaries:
        table[(s.set, s.metric)][s.form] = s
    lines = [f"{'set':<10} {'metric':<12} {'image+text':>10} {'text only':>10} {'average':>8} {'gap':>7}  n"]
    for (set_, metric), forms in table.items():
        mm, tx = forms.get("multimodal"), forms.get("text")
        vals = [f"{x.value:10.1%}" if x else f"{'-':>10}" for x in (mm, tx)]
        avg = f"{(mm.value + tx.value) / 2:8.1%}" if mm and tx else f"{'-':>8}"
        gap = f"{mm.value - tx.value:+7.1%}" if mm and tx else f"{'-':>7}"
        n = "/".join(str(x.n) for x in (mm, tx) if x)
        lines.append(f"{set_:<10} {metric:<12} {vals[0]} {vals[1]} {avg} {gap}  {n}")
    return "\n".join(lines)
