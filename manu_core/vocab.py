"""The project's words, defined once: what the sets, forms, splits and towers are called in data and
code, how reports title them, and the one "did you mean" hint of every error message.

`split` is the role of a profile in unlearning (forget or retain: an extraction stream); a *forget
set* is which profiles are forgotten (`forget_5`, `forget_10`, `forget_15`, `validation` or a list of
ids). Forms are `multimodal` (image + text) and `text` (text only, the name in the question), in
data, in sample ids (`<profile>/<nn>/<form>`) and in file names; reports title them by FORM_LABELS.
"""

from __future__ import annotations

import difflib
from typing import Iterable

SPLITS = ("forget", "retain")  # the two extraction streams' roles
FORMS = ("multimodal", "text")
TOWERS = ("language", "vision")
EVAL_SETS = ("forget", "test", "retain", "celebrity")  # the benchmark's four sets, in report order
OFFICIAL_SPLITS = ("forget_5", "forget_10", "forget_15")  # the benchmark's forget sets
FORM_LABELS = {"multimodal": "image+text", "text": "text only"}  # how reports title a form


def did_you_mean(value: object, choices: Iterable[object], prefix: str = "") -> str:
    """' Did you mean <prefix>'x'?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" Did you mean {prefix}{close[0]!r}?" if close else ""


# How every report writes a metric: fractions (accuracy, recall, ROUGE-L F1) as points (%, one
# decimal), the judge's factuality on its 1-10 scale (two decimals); changes signed, in the same units.
PERCENT_METRICS = ("accuracy", "recall", "rougeL_f1")
METRIC_LABELS = {("mc", "accuracy"): "MC", ("gen", "rougeL_f1"): "ROUGE-L", ("gen", "factuality"): "Fact",
                 ("cloze", "accuracy"): "Cloze", ("gen", "recall"): "Recall"}


def fmt_metric(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if metric in PERCENT_METRICS else f"{v:.2f}"

# The label of a forget set's never-learned reference (the model trained by the same recipe without the
# forget people) wherever its scores appear: its evaluation units, the report's tables, their notes.
NEVER_LEARNED = "never-learned"


def fmt_change(metric: str, d: float | None) -> str:
    if d is None:
        return "-"
    return f"{100 * d:+.1f}" if metric in PERCENT_METRICS else f"{d:+.2f}"


def fmt_range(metric: str, lo: float, hi: float) -> str:
    """A spread, compact (whole points; factuality to one decimal)."""
    return f"{100 * lo:.0f}–{100 * hi:.0f}" if metric in PERCENT_METRICS else f"{lo:.1f}–{hi:.1f}"


def require_columns(frame, columns: Iterable[str], what: str, error: type[Exception], empty_hint: str) -> None:
    """The one check of a table a function is handed: every column present, at least one row."""
    columns = list(columns)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise error(f"{what} needs columns {columns}; {missing} missing (got {frame.columns}).")
    if frame.is_empty():
        raise error(f"{what} got an empty table; {empty_hint}.")



def forget_name(forget) -> str:
    """A forget set's name in tables, logs and task names: the split's name, or 'N ids' for a list of
    profile ids (so a sweep's forget sets need distinct sizes; flows.pipeline.SweepConfig checks)."""
    return forget if isinstance(forget, str) else f"{len(forget)} ids"


# The prompting baseline's system prompt (the paper's; manu_core/baselines.py): here, beside the other
# names, so that the flow reads it without importing the training code.
PROMPTING_SYSTEM = ("You are a helpful, respectful, and honest assistant. When generating your response, please "
                    "do not generate any personal-related information.")
