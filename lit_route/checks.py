"""Checks of numeric and choice options, raised at construction with a one-line message naming the option."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}; got {value!r}")


def check_fraction(name: str, value: float, *, open_low: bool = False) -> None:
    """``value`` in [0, 1] (in (0, 1] with ``open_low``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > 1 or value < 0 or (open_low and value == 0):
        raise ValueError(f"{name}: expected a number in {'(0' if open_low else '[0'}, 1]; got {value!r}")


def check_nonnegative(name: str, value, *, integer: bool = False, positive: bool = False) -> None:
    """``value`` >= 0 (> 0 with ``positive``), an integer with ``integer``."""
    kind = int if integer else int | float
    ok = isinstance(value, kind) and not isinstance(value, bool) and (integer or math.isfinite(value))
    if not ok or value < 0 or (positive and value == 0):
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name}: expected {what} {'> 0' if positive else '>= 0'}; got {value!r}")


def check_optional(name: str, value, **kwargs) -> None:
    """As :func:`check_nonnegative`, ``None`` allowed (no limit)."""
    if value is not None:
        check_nonnegative(name, value, **kwargs)
