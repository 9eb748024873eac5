"""Argument checks shared by the Panda modules: each names the argument and what it expected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_number(value: Any) -> bool:
    """A real scalar (Python or NumPy), not a bool."""
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def nonneg(name: str, value: Any) -> float:
    """``value`` as a float, or a ``ValueError`` unless it is a finite number ``>= 0``."""
    if not is_finite_number(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def positive(name: str, value: Any, *, integer: bool = False) -> Any:
    """``value`` as a float (an int with ``integer``), or a ``ValueError`` unless it is a
    finite number (an int) ``> 0``."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        return int(value)
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)
