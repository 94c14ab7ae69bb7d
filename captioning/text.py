"""Text rules shared by the dialogue loop and the template backend (no model, no backend imports)."""

from __future__ import annotations

import re

__all__ = ["is_uninformative"]

_UNSURE = re.compile(
    r"^(not sure|unsure|i am not sure|i'm not sure|i do not know|i don't know|unknown|no answer|n/?a|"
    r"cannot tell|can't tell|it is not clear|unclear|hard to tell|none)\b",
    re.I,
)


def is_uninformative(answer: str) -> bool:
    """Empty or "not sure"-style answers, which the summary must ignore."""
    text = answer.strip().strip(".!").strip()
    return not text or bool(_UNSURE.match(text))
