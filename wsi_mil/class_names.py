"""Which class of a run is the negative one, read from the class names (normal, benign,
non-tumor, no_X, ...): heatmaps map the other class, PSMIL's attention starts toward it."""

from __future__ import annotations

import re

NEGATIVE_NAMES = {"normal", "negative", "benign", "healthy", "control", "0", "false", "no", "neg", "none"}
NEGATION = re.compile(r"^(non|not|no|without)[\s_\-]+\S")


def is_negative_name(name: str, other: str = "") -> bool:
    """A class named like the absence of something: normal, benign, non-tumor, no_X, ..."""
    n = name.strip().lower()
    return (
        n in NEGATIVE_NAMES or bool(NEGATION.match(n)) or (bool(other) and n == "non" + other.strip().lower())
    )


def positive_class(classes: list[str]) -> int | None:
    """Of two classes exactly one of which is named like a negative, the other's index; else None
    (LUAD vs LUSC, normal vs benign, more than two classes)."""
    if len(classes) != 2:
        return None
    negative = [i for i, c in enumerate(classes) if is_negative_name(c, classes[1 - i])]
    return 1 - negative[0] if len(negative) == 1 else None
