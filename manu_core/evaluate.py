"""MLLMU-Bench evaluation: sets x forms x tasks, batched, resumable, every answer kept in Parquet.

evaluation.md is the contract. A *unit* of work is one (set, form): `evaluate_unit` answers its
items task by task (multiple choice, fill-in-the-blank, generation) in fixed chunks and writes each
chunk as a Parquet part the moment it is scored, so a run that dies resumes at the first missing
chunk with the same batches and therefore the same answers. When every chunk is there, the unit
writes `answers.parquet` (one row per question: question, form, prediction, ground truth, score)
and `summary.json`; a rerun then only reads them.

Scorers are named in every result (`Summary.scorer`): `letter` / `likelihood` for multiple choice,
`substring` for fill-in-the-blank, `rouge-score` for ROUGE-L and the judge's name for factuality.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import polars as pl
import torch
from PIL import Image
from manu_core.progress import progress as progress_bar

from manu_core.data import EvalItem
from manu_core.io import atomic_file, atomic_write_json
from manu_core.judge import Judge, make_judge
from manu_core.portraits import image_for
from manu_core.prompts import build_prompt, encode, end_of_answer, model_inputs
from manu_core.scoring import LETTERS, cloze_correct, cloze_prompt, extract_letter, gen_prompt, mc_prompt, rouge_l
from manu_core.vocab import EVAL_SETS, fmt_change, fmt_metric

log = logging.getLogger(__name__)
TASKS = ("mc", "cloze", "gen")  # the order a unit answers them in
MC_SCORERS = ("letter", "likelihood")
MAX_NEW_TOKENS = 50  # the benchmark's budget for a generated answer; also the ceiling of "auto"
AUTO = "auto"  # EvalConfig.max_new_tokens: the budget from the unit's answers (`answer_token_cap`)
ImageFn = Callable[[str], Image.Image]


class EvaluationError(ValueError):
    """Bad evaluation input or a unit folder that belongs to another run: names the rule and the fix."""


def _chunks(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


# ----------------------------------------------------------------------------------------------
# Model calls


@dataclass(frozen=True)
class Request:
    """One prompt to answer: chat-formatted text and the images its <image> tokens stand for."""

    prompt: str
    images: tuple[Image.Image, ...] = ()


@torch.no_grad()
def generate_texts(
    model,
    processor,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 50,
    device: str | torch.device = "cpu",
    sort_by_length: bool = True,
) -> list[str]:
    """Greedy answers, in the order of `requests`; batched with left padding and the KV cache. The
    requests must all have images or all have none (one form per call).

    With `sort_by_length` (the default) the requests are batched longest prompt first (a stable sort
    on the prompt's token count, `by_prompt_length`), so a batch pads little, and the answers are put
    back in the requests' order. Greedy answers do not depend on the batch a request lands in (left
    padding under the attention mask, positions from the mask; checked in float32 on the evaluation
    units of the `tiny` and `lite` presets, bench/bench_eval.py), so sorting changes the time, not the
    answers. In half precision a near tie can break differently under other padding, as it can
    between any two batch sizes.
    """
    tok = processor.tokenizer
    order = by_prompt_length(tok, requests) if sort_by_length else list(range(len(requests)))
    answers: dict[int, str] = {}
    for idx in _chunks(order, batch_size):
        chunk = [requests[i] for i in idx]
        enc = encode(processor, [r.prompt for r in chunk], [r.images or None for r in chunk], padding_side="left")
        ids = model.generate(**model_inputs(enc, device), max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=tok.pad_token_id)  # (B, T_prompt + T_new)
        new = ids[:, enc["input_ids"].shape[1] :]
        answers.update(zip(idx, (t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))))
    return [answers[i] for i in range(len(requests))]


def by_prompt_length(tokenizer, requests: Sequence[Request]) -> list[int]:
    """The requests' indices, longest prompt first (ties keep their order): the batching order of
    `generate_texts`. Lengths are text tokens; an image adds the same number of tokens to every
    request of a call (one form per call, the same few-shot examples), so it cannot change the order.
    Longest first, as lm-evaluation-harness does: the largest batch runs first, so one that does not
    fit in memory fails at once."""
    lengths = [len(ids) for ids in tokenizer([r.prompt for r in requests], add_special_tokens=False)["input_ids"]]
    return sorted(range(len(requests)), key=lambda i: -lengths[i])


def answer_token_cap(tokenizer, answers: Sequence[str], *, percentile: float = 99.0,
                     ceiling: int = MAX_NEW_TOKENS) -> int:
    """`max_new_tokens` from ground-truth answers (EvalConfig.max_new_tokens = "auto"; evaluation.md).

    A ground truth takes n tokens as the model would write it (" " + answer, the way training
    appends it to the prompt) plus one that ends the turn. With p the `percentile` of n over the
    answers (nearest rank: the smallest n with at least that share of answers at or below it), the
    cap is p + ceil(p / 2), never above `ceiling` (the benchmark's 50): an answer half again as long
    as nearly every true one is not cut, a model that rambles stops there instead of at 50.
    Greedy decoding is the same token by token up to the cap, so an answer shorter than the cap is
    exactly the one a fixed budget of 50 gives; only longer ones are cut. No answers: `ceiling`.
    """
    if not 0 < percentile <= 100:
        raise EvaluationError(f"percentile must be in (0, 100]; got {percentile}.")
    if ceiling < 1:
        raise EvaluationError(f"ceiling must be >= 1; got {ceiling}.")
    if not answers:
        return ceiling
    ids = tokenizer([" " + a for a in answers], add_special_tokens=False)["input_ids"]
    lengths = sorted(len(x) + 1 for x in ids)  # + the token that ends the turn
    p = lengths[max(0, math.ceil(percentile / 100 * len(lengths)) - 1)]
    return min(ceiling, p + math.ceil(p / 2))


def unit_max_new_tokens(config: "EvalConfig", processor, items: Sequence[EvalItem]) -> int:
    """The generation budget of one unit: `config.max_new_tokens`, or with "auto" the
    `answer_token_cap` of the unit's generation answers (`ceiling` when it has none, e.g. a unit
    evaluated on cloze alone). Fill-in-the-blank uses the same budget: its ground truth is a part of
    an answer sentence, and the embedded models answer it with the whole sentence."""
    if config.max_new_tokens != AUTO:
        return int(config.max_new_tokens)
    return answer_token_cap(processor.tokenizer, [it.answer for it in items if it.task == "gen"])


def _by_form(items: Sequence[EvalItem]) -> list[list[EvalItem]]:
    groups: dict[bool, list[EvalItem]] = defaultdict(list)
    for it in items:
        groups[it.image is not None].append(it)
    return [groups[k] for k in sorted(groups)]


def generate(model, processor, items: Sequence[EvalItem], *, batch_size: int = 32, max_new_tokens: int = 50,
             device: str | torch.device = "cpu", system: str | None = None, images: ImageFn = image_for,
             progress: bool = True) -> dict[str, str]:
    """Greedy answers {item_id: text} to the items' bare questions (the post-training recall check)."""
    out: dict[str, str] = {}
    bar = progress_bar(total=len(items), desc="generate", disable=not progress, unit="q")
    for group in _by_form(items):
        for chunk in _chunks(group, batch_size):
            reqs = [Request(build_prompt(processor, it.question, image=it.image is not None, system=system),
                            (images(it.image),) if it.image else ()) for it in chunk]
            texts = generate_texts(model, processor, reqs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   device=device)
            out.update({it.item_id: t for it, t in zip(chunk, texts)})
            bar.update(len(chunk))
    bar.close()
    return out


def contains_fact(prediction: str, fact: str) -> bool:
    """Answer recall for the post-training check: the lower-cased key fact is in the answer."""
    return cloze_correct(prediction, fact)


@torch.no_grad()
def option_logprobs(
    model,
    processor,
    items: Sequence[EvalItem],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    system: str | None = None,
    images: ImageFn = image_for,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Multiple choice by likelihood: {item_id: [score per option]}.

    Each option is scored inside the answer sentence it completes (`cloze_answer` with `__`
    replaced; the option alone when there is none, as in the real benchmark), and the score is the
    mean log-probability of the tokens from the first token where the completed answers differ to
    the end of the answer: the shared prefix, identical for all options, is left out so it neither
    dilutes nor favours any option.

    The question is read once per item, not once per option: one forward over the batch's prompts
    (image included, left-padded) keeps their KV cache, which is repeated for each item's options,
    and a second forward reads only the options' answer tokens after it (`_continuation_positions`).
    The scores are those of a forward over each whole prompt + answer, to float rounding
    (tests/eval/test_mc_prefix.py checks it on every architecture).
    """
    scores: dict[str, list[float]] = {}
    bar = progress_bar(total=len(items), desc="multiple choice", disable=not progress, unit="q")
    for group in _by_form(items):
        for chunk in _chunks(group, batch_size):
            prompts = [build_prompt(processor, it.question, image=it.image is not None, system=system) for it in chunk]
            ims = [images(it.image) if it.image else None for it in chunk]
            rows = [i for i, it in enumerate(chunk) for _ in it.options]  # item of each option row
            answers = [it.cloze_answer.replace("__", opt) if "__" in it.cloze_answer else opt
                       for it in chunk for opt in it.options]
            ids, mask = _answer_tokens(processor, prompts, rows, answers)
            tok_lp = _answer_logprobs(model, encode(processor, prompts, ims, padding_side="left"), rows, ids, mask,
                                      device)
            start = 0
            for it in chunk:
                span = slice(start, start + len(it.options))
                start += len(it.options)
                scores[it.item_id] = span_mean_logprobs(ids[span], mask[span], tok_lp[span])
            bar.update(len(chunk))
    bar.close()
    return scores


def _answer_tokens(processor, prompts: list[str], rows: list[int], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's answer tokens as `encode` tokenises them after its prompt (`prompts[rows[r]]`; end of
    turn included), right-padded: (ids, mask), both (rows, longest answer). The tokenizer alone, without
    the images: a prompt's image placeholders are special tokens before its question, so what follows
    them, and the answer, tokenises the same whether or not the processor expands them."""
    tok, end = processor.tokenizer, end_of_answer(processor)
    heads = tok(list(prompts))["input_ids"]
    texts = [f"{prompts[i]} {a}{end}" for i, a in zip(rows, answers)]  # as `encode` writes them
    spans = []
    for i, full in zip(rows, tok(texts)["input_ids"]):
        h = heads[i]
        assert full[: len(h)] == h, "prompt does not tokenise to a prefix of prompt + answer"
        spans.append(full[len(h):])
    width = max(len(s) for s in spans)
    ids = torch.zeros(len(spans), width, dtype=torch.long)
    mask = torch.zeros(len(spans), width, dtype=torch.bool)
    for r, s in enumerate(spans):
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), True
    return ids, mask


def _answer_logprobs(model, prompt_enc: dict, rows: list[int], ids: torch.Tensor, mask: torch.Tensor,
                     device) -> torch.Tensor:
    """log P(answer token | prompt, earlier answer tokens) for each option row: (rows, answer width).
    The prompts' forward is cached and its cache repeated per row (`rows`: the prompt of each row)."""
    inner = getattr(model, "model", None)
    if hasattr(inner, "rope_deltas"):  # M-RoPE: the offsets of this batch's prompts, none left from another
        inner.rope_deltas = None
    out = model(**model_inputs(prompt_enc, device), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # left padding: every prompt's last token
    cache = out.cache
    index = torch.tensor(rows, device=first.device)
    cache.reorder_cache(index)
    attention = torch.cat([prompt_enc["attention_mask"][rows].bool(), mask], 1).long()
    more = model(input_ids=ids.to(device), attention_mask=attention.to(device), cache=cache, use_cache=False,
                 position_ids=_continuation_positions(model, prompt_enc["attention_mask"].sum(1), ids.shape[1], index))
    later = torch.log_softmax(more.logits[:, :-1].float(), -1)  # answer token t + 1 from token t
    targets = ids.to(first.device)
    return torch.cat([first[index].gather(-1, targets[:, :1]), later.gather(-1, targets[:, 1:, None])[..., 0]], 1)


def _continuation_positions(model, prompt_lengths: torch.Tensor, n: int, rows: torch.Tensor) -> torch.Tensor | None:
    """Position ids of `n` tokens appended to a cached, left-padded batch of prompts (`prompt_lengths`
    real tokens each; `rows`: the prompt of each appended row). With 1-D rotary positions the model's
    default (the padded width onwards) is right: left padding shifts all of a row's positions alike,
    and rotary attention sees only their differences. M-RoPE (Qwen2-VL) keeps each prompt's offset
    from its image grid (`rope_deltas`, counted from the unpadded length, as generation uses them);
    text after the prompt has the same position on its three axes."""
    deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
    if deltas is None:
        return None
    rows = rows.to(deltas.device)
    pos = prompt_lengths.to(deltas.device)[rows, None] + deltas[rows] + torch.arange(n, device=deltas.device)[None, :]
    return pos[None].expand(3, -1, -1)


def mc_batch_size(config: "EvalConfig") -> int:
    """Questions per likelihood multiple-choice batch: a quarter of `batch_size` (four option rows each)."""
    return max(1, config.batch_size // 4)


def span_mean_logprobs(ids: torch.Tensor, mask: torch.Tensor, tok_lp: torch.Tensor) -> list[float]:
    """One item's options, one row each (all three (n_options, T), aligned): the mean token
    log-probability of each option's answer tokens (`mask`) from the first position where the
    options' token ids differ to the end, i.e. log P(option | question, shared prefix) / its length.
    When the options do not differ at all, every answer token counts."""
    differ = (ids != ids[:1]).any(0) & mask.any(0)
    start = int(differ.nonzero()[0]) if bool(differ.any()) else 0
    keep = mask.clone().bool()
    keep[:, :start] = False
    return ((tok_lp * keep).sum(1) / keep.sum(1).clamp(min=1)).tolist()


# ----------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class EvalConfig:
    """How a unit is evaluated. Every field is part of a unit folder's identity (resume checks it)."""

    mc_scorer: str = "letter"  # letter (the benchmark's) | likelihood (for models that cannot follow it)
    few_shot: bool = False  # letter only: one seeded profile's questions as earlier turns, not scored
    instructions: bool = True  # the benchmark's task instructions after the question (gen, cloze)
    max_new_tokens: int | str = MAX_NEW_TOKENS  # generation and fill-in-the-blank; "auto": unit_max_new_tokens
    letter_tokens: int = 8  # multiple choice (letter): enough for "Answer: B"
    batch_size: int = 32
    chunk_size: int = 64  # questions per Parquet part: the unit of resumption
    judge: str = "offline"  # see judge.make_judge
    system: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mc_scorer not in MC_SCORERS:
            raise EvaluationError(f"mc_scorer must be one of {MC_SCORERS}; got {self.mc_scorer!r}.")
        if self.few_shot and self.mc_scorer != "letter":
            raise EvaluationError("few_shot applies to the letter scorer only; use mc_scorer='letter' or few_shot=False.")
        budget = self.max_new_tokens
        if budget != AUTO and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise EvaluationError(f"max_new_tokens must be an integer >= 1, or {AUTO!r} for a budget from the unit's "
                                  f"answers (evaluation.md); got {budget!r}.")
        for name in ("letter_tokens", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"{name} must be >= 1; got {getattr(self, name)}.")

    @property
    def mc_scorer_name(self) -> str:
        return self.mc_scorer + ("+few-shot" if self.few_shot else "")


@dataclass(frozen=True)
class Summary:
    set: str
    form: str
    task: str  # mc | cloze | gen
    metric: str  # accuracy | rougeL_f1 | factuality | recall
    scorer: str  # letter | likelihood | substring | rouge-score | <judge name> | contains-key-fact
    value: float
    n: int


@dataclass(frozen=True)
class UnitResult:
    set: str
    form: str
    out_dir: Path
    summaries: list[Summary] = field(default_factory=list)
    resumed_chunks: int = 0  # parts found on disk and not recomputed


# ----------------------------------------------------------------------------------------------
# One unit: (set, form)


def _item_digest(items: Sequence[EvalItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.item_id, it.task, it.question, it.answer, list(it.options), it.correct,
                             it.cloze_answer, it.image], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    path = out_dir / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise EvaluationError(
                f"{out_dir} holds answers of another evaluation (differs in: {', '.join(diff)}; "
                f"was {', '.join(f'{k}={old.get(k)!r}' for k in diff)}). Delete the folder to start over, "
                "or evaluate into another folder."
            )
    else:
        atomic_write_json(path, manifest)


def _few_shot(mc_items: Sequence[EvalItem], seed: int) -> tuple[list[EvalItem], list[EvalItem]]:
    """(shots, scored): all multiple-choice questions of one seeded profile become the examples."""
    profiles = sorted({it.profile_id for it in mc_items})
    if len(profiles) < 2:
        raise EvaluationError(f"few-shot needs at least 2 profiles in the unit (one is used as examples); "
                              f"got {len(profiles)}. Use few_shot=False for this set.")
    pick = random.Random(f"few-shot/{seed}/{mc_items[0].set}/{mc_items[0].form}").choice(profiles)
    return ([it for it in mc_items if it.profile_id == pick], [it for it in mc_items if it.profile_id != pick])


def _row(it: EvalItem, prediction: str, ground_truth: str, score: float, scorer: str, *, choice: str | None = None,
         factuality: int | None = None, judge: str | None = None,
         option_logprobs: Sequence[float] | None = None) -> dict:
    return {"item_id": it.item_id, "set": it.set, "form": it.form, "task": it.task, "profile_id": it.profile_id,
            "question": it.question, "options": list(it.options),
            "correct": LETTERS[it.correct] if it.task == "mc" and it.correct >= 0 else None,
            "prediction": prediction, "ground_truth": ground_truth, "choice": choice, "score": float(score),
            "factuality": factuality, "scorer": scorer, "judge": judge, "source": it.source,
            "option_logprobs": None if option_logprobs is None else [float(x) for x in option_logprobs]}


# `option_logprobs` (one per option, in `options` order: `span_mean_logprobs`) is written by the
# likelihood multiple-choice scorer only and is null elsewhere (the letter scorer has no likelihoods);
# answers written before it existed lack the column, and `_conform` adds it as nulls when they are read.
ANSWER_SCHEMA = {
    "item_id": pl.String, "set": pl.String, "form": pl.String, "task": pl.String, "profile_id": pl.String,
    "question": pl.String, "options": pl.List(pl.String), "correct": pl.String, "prediction": pl.String,
    "ground_truth": pl.String, "choice": pl.String, "score": pl.Float64, "factuality": pl.Int64,
    "scorer": pl.String, "judge": pl.String, "source": pl.String, "option_logprobs": pl.List(pl.Float64),
}


def _conform(frame: pl.DataFrame) -> pl.DataFrame:
    """An answers frame in ANSWER_SCHEMA's columns: columns added since it was written become nulls."""
    missing = [pl.lit(None, dtype=d).alias(c) for c, d in ANSWER_SCHEMA.items() if c not in frame.columns]
    return frame.with_columns(missing).select(list(ANSWER_SCHEMA)) if missing else frame


class _Scorer:
    """Answers and scores one chunk of one task (the model calls of a unit)."""

    def __init__(self, model, processor, config: EvalConfig, judge: Judge, images: ImageFn, device,
                 shots: Sequence[EvalItem], max_new_tokens: int | None = None):
        self.model, self.processor, self.config, self.judge = model, processor, config, judge
        # generation and cloze: the unit's budget (evaluate_unit resolves "auto"), else the config's
        self.max_new_tokens = config.max_new_tokens if max_new_tokens is None else max_new_tokens
        assert self.max_new_tokens != AUTO, "evaluate_unit resolves max_new_tokens='auto' (unit_max_new_tokens)"
        self.images, self.device = images, device
        self.history = [(mc_prompt(s.question, s.options), s.image is not None, LETTERS[s.correct]) for s in shots]
        self.shot_images = tuple(images(s.image) for s in shots if s.image)

    def _request(self, it: EvalItem, text: str, history=()) -> Request:
        prompt = build_prompt(self.processor, text, image=it.image is not None, system=self.config.system,
                              history=history)
        own = (self.images(it.image),) if it.image else ()
        return Request(prompt, (self.shot_images if history else ()) + own)

    def _generate(self, reqs: list[Request], max_new_tokens: int) -> list[str]:
        return generate_texts(self.model, self.processor, reqs, batch_size=self.config.batch_size,
                              max_new_tokens=max_new_tokens, device=self.device)

    def __call__(self, task: str, chunk: Sequence[EvalItem]) -> list[dict]:
        cfg = self.config
        if task == "mc" and cfg.mc_scorer == "likelihood":
            scores = option_logprobs(self.model, self.processor, chunk, batch_size=mc_batch_size(cfg),
                                     device=self.device, system=cfg.system, images=self.images, progress=False)
            rows = []
            for it in chunk:
                s = scores[it.item_id]
                pick = max(range(len(s)), key=s.__getitem__)
                rows.append(_row(it, it.options[pick], it.options[it.correct], pick == it.correct, "likelihood",
                                 choice=LETTERS[pick], option_logprobs=s))
            return rows
        if task == "mc":
            reqs = [self._request(it, mc_prompt(it.question, it.options), self.history) for it in chunk]
            rows = []
            for it, pred in zip(chunk, self._generate(reqs, cfg.letter_tokens)):
                letter = extract_letter(pred, len(it.options))
                rows.append(_row(it, pred, LETTERS[it.correct], letter == LETTERS[it.correct], cfg.mc_scorer_name,
                                 choice=letter))
            return rows
        if task == "cloze":
            texts = [cloze_prompt(it.question) if cfg.instructions else it.question for it in chunk]
            preds = self._generate([self._request(it, t) for it, t in zip(chunk, texts)], self.max_new_tokens)
            return [_row(it, p, it.answer, cloze_correct(p, it.answer), "substring") for it, p in zip(chunk, preds)]
        if task == "gen":
            texts = [gen_prompt(it.question) if cfg.instructions else it.question for it in chunk]
            preds = self._generate([self._request(it, t) for it, t in zip(chunk, texts)], self.max_new_tokens)
            facts = self.judge.score([it.question for it in chunk], [it.answer for it in chunk], preds,
                                     [it.key_fact for it in chunk])
            return [_row(it, p, it.answer, rouge_l(p, it.answer), "rouge-score", factuality=f, judge=self.judge.name)
                    for it, p, f in zip(chunk, preds, facts)]
        raise EvaluationError(f"unknown task {task!r}; tasks are {TASKS}")


def summarize(answers: pl.DataFrame) -> list[Summary]:
    """Per (set, form, task): the mean score (and mean factuality for generation)."""
    out = []
    for (set_, form, task, scorer), g in sorted(answers.group_by(["set", "form", "task", "scorer"]),
                                                key=lambda kv: (kv[0][0], kv[0][1], TASKS.index(kv[0][2]))):
        metric = "rougeL_f1" if task == "gen" else "accuracy"
        out.append(Summary(set_, form, task, metric, scorer, float(g["score"].mean()), g.height))
        if task == "gen":
            out.append(Summary(set_, form, task, "factuality", g["judge"][0], float(g["factuality"].mean()), g.height))
    return out


def evaluate_unit(
    model,
    processor,
    items: Sequence[EvalItem],
    out_dir: str | Path,
    config: EvalConfig = EvalConfig(),
    *,
    images: ImageFn = image_for,
    device: str | torch.device = "cpu",
    judge: Judge | None = None,
    model_id: str = "",
    progress: bool = True,
) -> UnitResult:
    """Evaluate one (set, form) into `out_dir`, resuming from the parts already there.

    `model_id` (a path or name) is recorded in the folder's manifest so that answers of another
    model are never mixed in; `images` resolves the items' image keys.
    """
    if not items:
        raise EvaluationError("no items to evaluate; check the set/form filters and the sample caps.")
    units = {(it.set, it.form) for it in items}
    if len(units) != 1:
        raise EvaluationError(f"a unit is one (set, form); got {sorted(units)}. Use `evaluate` for several.")
    (set_, form), = units
    out_dir = Path(out_dir)
    judge = judge or make_judge(config.judge)
    manifest = {"set": set_, "form": form, "config": asdict(config), "items": _item_digest(items),
                "n_items": len(items), "model": str(model_id), "judge": judge.name}
    max_new_tokens = unit_max_new_tokens(config, processor, items)
    if config.max_new_tokens == AUTO:  # recorded only then: folders of a fixed budget keep their manifest
        manifest["max_new_tokens"] = max_new_tokens
        log.info("%s/%s: max_new_tokens %d, from its generation answers (auto)", set_, form, max_new_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(out_dir, manifest)
    if (out_dir / "summary.json").exists() and (out_dir / "answers.parquet").exists():
        summaries = [Summary(**s) for s in json.loads((out_dir / "summary.json").read_text())]
        return UnitResult(set_, form, out_dir, summaries, resumed_chunks=-1)

    by_task = {t: sorted((it for it in items if it.task == t), key=lambda it: it.item_id) for t in TASKS}
    unknown = {it.task for it in items} - set(TASKS)
    if unknown:
        raise EvaluationError(f"unknown task(s) {sorted(unknown)}; tasks are {TASKS}")
    shots: list[EvalItem] = []
    if config.few_shot and by_task["mc"]:
        shots, by_task["mc"] = _few_shot(by_task["mc"], config.seed)
    score = _Scorer(model, processor, config, judge, images, device, shots, max_new_tokens)
    parts_dir = out_dir / "parts"
    parts_dir.mkdir(exist_ok=True)
    total = sum(len(v) for v in by_task.values())
    bar = progress_bar(total=total, desc=f"{set_}/{form}", disable=not progress, unit="q")
    resumed, parts = 0, []
    model.eval()
    for task in TASKS:
        for k, chunk in enumerate(_chunks(by_task[task], config.chunk_size)):
            part = parts_dir / f"{task}-{k:05d}.parquet"
            parts.append(part)
            if part.exists():
                resumed += 1
            else:
                frame = pl.DataFrame(score(task, chunk), schema=ANSWER_SCHEMA)
                with atomic_file(part) as tmp:
                    frame.write_parquet(tmp)
            bar.update(len(chunk))
    bar.close()
    answers = (pl.concat([_conform(pl.read_parquet(p)) for p in parts]) if parts
               else pl.DataFrame(schema=ANSWER_SCHEMA))
    summaries = summarize(answers)
    with atomic_file(out_dir / "answers.parquet") as tmp:
        answers.write_parquet(tmp)
    atomic_write_json(out_dir / "summary.json", [asdict(s) for s in summaries])
    if resumed:
        log.info("%s/%s: resumed, %d of %d parts were already on disk", set_, form, resumed, len(parts))
    return UnitResult(set_, form, out_dir, summaries, resumed_chunks=resumed)


# ----------------------------------------------------------------------------------------------
# Several units


def cap_profiles(items: Sequence[EvalItem], max_profiles: int | None, seed: int = 0) -> list[EvalItem]:
    """At most `max_profiles` seeded profiles per set (the same profiles in both forms)."""
    if not max_profiles:
        return list(items)
    if max_profiles < 0:
        raise EvaluationError(f"max_profiles must be positive (or 0/None for all); got {max_profiles}.")
    keep: dict[str, set[str]] = {}
    for set_ in sorted({it.set for it in items}):
        pids = sorted({it.profile_id for it in items if it.set == set_})
        keep[set_] = set(random.Random(f"cap/{seed}/{set_}").sample(pids, min(max_profiles, len(pids))))
    return [it for it in items if it.profile_id in keep[it.set]]


def units_of(items: Sequence[EvalItem]) -> dict[tuple[str, str], list[EvalItem]]:
    out: dict[tuple[str, str], list[EvalItem]] = defaultdict(list)
    for it in items:
        out[(it.set, it.form)].append(it)
    return dict(out)


def unit_dir(root: str | Path, set_: str, form: str) -> Path:
    return Path(root) / f"{set_}-{form}"


def evaluate(model, processor, items: Sequence[EvalItem], out_dir: str | Path, config: EvalConfig = EvalConfig(),
             **kwargs) -> list[Summary]:
    """Every (set, form) unit of `items`, one after another, into `out_dir/<set>-<form>/`."""
    judge = kwargs.pop("judge", None) or make_judge(config.judge)
    summaries: list[Summary] = []
    for (set_, form), unit_items in sorted(units_of(items).items()):
        res = evaluate_unit(model, processor, unit_items, unit_dir(out_dir, set_, form), config, judge=judge,
                            **kwargs)
        summaries += res.summaries
    return summaries


def read_answers(out_dir: str | Path) -> pl.DataFrame:
    """Every answer of an evaluation folder (complete units and the parts of unfinished ones)."""
    files = sorted(Path(out_dir).glob("*/answers.parquet"))
    done = {f.parent for f in files}
    files += [p for p in sorted(Path(out_dir).glob("*/parts/*.parquet")) if p.parent.parent not in done]
    if not files:
        raise EvaluationError(f"no answers under {out_dir}; expected <set>-<form>/answers.parquet folders.")
    return pl.concat([_conform(pl.read_parquet(f)) for f in files])


# ----------------------------------------------------------------------------------------------
# Reports



def summary_table(summaries: Sequence[Summary]) -> dict[tuple[str, str, str, str], dict[str, Summary]]:
    """{(set, task, metric, scorer): {form: Summary}} in report order (sets, then tasks)."""
    table: dict[tuple[str, str, str, str], dict[str, Summary]] = defaultdict(dict)
    for s in summaries:
        table[(s.set, s.task, s.metric, s.scorer)][s.form] = s
    order = {k: i for i, k in enumerate(EVAL_SETS)}
    tasks = {t: i for i, t in enumerate(TASKS)}
    return dict(sorted(table.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][0], tasks.get(kv[0][1], 9),
                                                      kv[0][2])))


def _report_rows(summaries: Sequence[Summary]) -> Iterable[tuple[tuple[str, str, str, str], list[str]]]:
    """Per row key: image+text, text only, average, gap (image+text minus text) and n, formatted."""
    for key, forms in summary_table(summaries).items():
        metric = key[2]
        mm, tx = forms.get("multimodal"), forms.get("text")
        cells = [fmt_metric(metric, x.value) if x else "-" for x in (mm, tx)]
        cells.append(fmt_metric(metric, (mm.value + tx.value) / 2) if mm and tx else "-")
        cells.append(fmt_change(metric, mm.value - tx.value) if mm and tx else "-")
        cells.append("/".join(str(x.n) for x in (mm, tx) if x))
        yield key, cells


def format_report(summaries: Sequence[Summary], name: str = "model") -> str:
    """Markdown: a row per set, a column per metric, each cell image+text / text only (the project's
    one results-table builder, `report.model_table`), then the questions and scorers behind them."""
    from manu_core.report import counts_note, model_table, summaries_frame

    frame = summaries_frame({name: list(summaries)})
    return model_table(frame, name).markdown() + "\n\n" + counts_note(frame)


def format_summaries(summaries: Sequence[Summary]) -> str:
    """A plain-text table for logs: rows (set, metric), columns image+text / text / average / gap."""
    lines = [f"{'set':<10} {'metric':<12} {'scorer':<18} {'image+text':>10} {'text only':>10} {'average':>8} {'gap':>7}  n"]
    for (set_, _, metric, scorer), (mm, tx, avg, gap, n) in _report_rows(summaries):
        lines.append(f"{set_:<10} {metric:<12} {scorer:<18} {mm:>10} {tx:>10} {avg:>8} {gap:>7}  {n}")
    return "\n".join(lines)


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
    """The quick post-training check written beside a trained model: answer recall (the greedy
    answer to the bare question contains the key fact), its ROUGE-L against the answer, and
    likelihood multiple-choice accuracy."""
    gen_items = [it for it in items if it.task == "gen"]
    mc_items = [it for it in items if it.task == "mc"]
    preds = generate(model, processor, gen_items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     device=device, progress=progress)
    opt_scores = option_logprobs(model, processor, mc_items, batch_size=max(1, batch_size // 4), device=device,
                                 progress=progress)
    acc: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    details = {"generation": {}, "mc": {}}
    for it in gen_items:
        ok = contains_fact(preds[it.item_id], it.key_fact)
        acc[(it.set, it.form, "gen", "recall")].append(float(ok))
        acc[(it.set, it.form, "gen", "rouge_l")].append(rouge_l(preds[it.item_id], it.answer))
        details["generation"][it.item_id] = {"prediction": preds[it.item_id], "key_fact": it.key_fact, "correct": ok}
    for it in mc_items:
        s = opt_scores[it.item_id]
        pick = max(range(len(s)), key=s.__getitem__)
        acc[(it.set, it.form, "mc", "accuracy")].append(float(pick == it.correct))
        details["mc"][it.item_id] = {"scores": s, "pick": pick, "correct": it.correct}
    scorer = {"recall": "contains-key-fact", "rouge_l": "rouge-l", "accuracy": "likelihood"}
    summaries = [Summary(s, f, t, m, scorer[m], sum(v) / len(v), len(v)) for (s, f, t, m), v in sorted(acc.items())]
    return summaries, details
