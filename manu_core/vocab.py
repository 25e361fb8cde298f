"""The project's words, defined once: what the sets, forms, splits and towers are called in data and
code, how reports title them, and the one "did you mean" hint of every error message.

`split` is the role of a profile in unlearning (forget or retain: an extraction stream); a *forget
set* is which profiles are forgotten (`forget_5`, `forget_10`, `forget_15`, `validation` or a list of
ids). Forms are `multimodal` (image + text) and `text` (text only, the name in the question).
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
