"""Surface cues: judges that look at one feature of the two texts and nothing else.

A cue baseline beside a trained judge shows a shortcut: if "prefer the longer answer" scores as well as the
judge on a subset, that subset cannot tell a comparison from a length detector. Each cue maps a text to a
number and prefers the text with the larger one; a tie is a coin flip (counts 0.5), so a cue that cannot see
a difference scores 50 %.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

_SYMBOL = re.compile(r"[^\w\s]")


def _depth(text: str) -> int:
    """Deepest bracket nesting ({[( ... )]}) in ``text``."""
    depth = best = 0
    for char in text:
        if char in "{[(":
            depth += 1
            best = max(best, depth)
        elif char in "}])":
            depth = max(0, depth - 1)
    return best


def _extends(text: str, other: str) -> int:
    """1 when ``text`` strictly extends ``other`` (``other`` is a prefix of it), else 0."""
    a, b = text.strip(), other.strip()
    return int(len(a) > len(b) and a.startswith(b))


# name -> feature(text, other text). "prefer X" picks the text with the larger feature.
CUES: dict[str, Callable[[str, str], float]] = {
    "prefer longer": lambda t, o: len(t),
    "prefer shorter": lambda t, o: -len(t),
    "prefer more capitals": lambda t, o: sum(c.isupper() for c in t),
    "prefer fewer capitals": lambda t, o: -sum(c.isupper() for c in t),
    "prefer more digits": lambda t, o: sum(c.isdigit() for c in t),
    "prefer fewer digits": lambda t, o: -sum(c.isdigit() for c in t),
    "prefer more symbols": lambda t, o: len(_SYMBOL.findall(t)),
    "prefer fewer symbols": lambda t, o: -len(_SYMBOL.findall(t)),
    "prefer deeper nesting": lambda t, o: _depth(t),
    "prefer shallower nesting": lambda t, o: -_depth(t),
    "prefer the extension": lambda t, o: _extends(t, o),
    "prefer the prefix": lambda t, o: _extends(o, t),
}
# The rows a report prints beside the judges (issue 13); the family check uses every cue.
REPORTED_CUES: tuple[str, ...] = ("prefer longer", "prefer shorter", "prefer more capitals")


def cue_credit(cue: str, chosen: str, rejected: str) -> float:
    """1 if ``cue`` prefers ``chosen``, 0 if it prefers ``rejected``, 0.5 on a tie."""
    feature = CUES[cue]
    a, b = feature(chosen, rejected), feature(rejected, chosen)
    return 1.0 if a > b else 0.0 if a < b else 0.5


def cue_credits(cue: str, chosen: Sequence[str], rejected: Sequence[str]) -> np.ndarray:
    """Per-pair credit of ``cue`` (see ``cue_credit``)."""
    return np.array([cue_credit(cue, c, r) for c, r in zip(chosen, rejected, strict=True)], dtype=float)


def strongest_cue(chosen: Sequence[str], rejected: Sequence[str]) -> tuple[str, float]:
    """The cue that picks the chosen text most often, and how often (tie credit 0.5)."""
    rates = {cue: float(cue_credits(cue, chosen, rejected).mean()) for cue in CUES}
    best = max(rates, key=lambda c: rates[c])
    return best, rates[best]
