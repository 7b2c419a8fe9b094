"""The loader's argument checks, shared by :mod:`sparsestore.loader` and its mixins."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidInputError


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise InvalidInputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
