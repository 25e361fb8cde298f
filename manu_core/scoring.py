"""MLLMU-Bench prompts and scorers, as the benchmark's released evaluator defines them.

Pure functions of strings (no model): the prompt text each task appends to a question, and how an
answer is scored. evaluation.md, "Tasks and metrics".
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

LETTERS = "ABCD"
MC_INSTRUCTION = "Just give ONE letter representing the answer directly."
GEN_INSTRUCTION = "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH."
CLOZE_INSTRUCTION = "Please **ONLY** provide the correct answer that should replace the [Blank]."


def mc_prompt(question: str, options: Sequence[str]) -> str:
    """`{question}\\nA: ..\\nB: ..\\nC: ..\\nD: ..\\nJust give ONE letter ...`"""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"multiple choice needs 2-{len(LETTERS)} options; got {len(options)}: {list(options)!r}")
    block = "\n".join(f"{LETTERS[i]}: {opt}" for i, opt in enumerate(options))
    return f"{question}\n{block}\n{MC_INSTRUCTION}"


def gen_prompt(question: str) -> str:
    return f"{question}\n{GEN_INSTRUCTION}"


def cloze_prompt(masked: str) -> str:
    """The sentence with its blank: `__` becomes `[Blank]`, then the benchmark's instruction."""
    if "__" not in masked:
        raise ValueError(f"a fill-in-the-blank question needs a `__` blank; got {masked!r}")
    return f"{masked.replace('__', '[Blank]')}\n{CLOZE_INSTRUCTION}"


# An answer may restate the instruction's frame before the letter: "Answer: B", "Correct Answer: b)".
_ANSWER_LEAD = re.compile(r"^\s*(?:the\s+)?(?:correct\s+)?(?:answer|option)\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)


def extract_letter(answer: str, n_options: int = 4) -> str | None:
    """The chosen letter, or None when the answer does not start with one.

    The benchmark's rule is "the first character of the answer, upper-cased, if it is an option
    letter"; leading white space and an "Answer:" lead-in are skipped first (greedy decoding of
    instruction-tuned models often echoes it). "Bob" is read as B, exactly as the benchmark does.
    """
    text = _ANSWER_LEAD.sub("", answer.strip(), count=1).lstrip("(*[ ")
    if not text:
        return None
    first = text[0].upper()
    return first if first in LETTERS[:n_options] else None


def cloze_correct(prediction: str, ground_truth: str) -> bool:
    """Correct when the lower-cased ground truth is a substring of the lower-cased answer."""
    truth = ground_truth.strip().lower()
    return bool(truth) and truth in prediction.lower()


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 with stemming (rouge-score's `rougeL`), as the benchmark reports it."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)
