"""Argument checks shared by every component: each error names the parameter and its range."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from torch import Tensor


def check_positive_int(name: str, value: int) -> int:
    """Raise ``ValueError`` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return value


def check_int_range(name: str, value: int, low: int, high: int) -> int:
    """Raise ``ValueError`` unless ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"`{name}` must be an integer in [{low}, {high}], got {value!r}.")
    return value


def check_non_negative(name: str, value: float) -> float:
    """Raise ``ValueError`` unless ``value`` is a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
    return float(value)


def check_positive_float(name: str, value: float) -> float:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


def check_non_negative_int(name: str, value: int) -> int:
    """Raise ``ValueError`` unless ``value`` is an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
    return value


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (listed in the message as given)."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def check_bool(name: str, value: bool) -> bool:
    """Raise ``ValueError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}.")
    return value


def check_prefix(name: str, value: str) -> str:
    """Raise ``ValueError`` unless ``value`` is a non-empty string without leading or trailing ``/`` (a
    name prefix of logged metrics)."""
    if not isinstance(value, str) or not value or value.strip("/") != value:
        raise ValueError(f"`{name}` must be a non-empty string without leading or trailing '/', got {value!r}.")
    return value


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` >= 1, ascending: the valid values that error messages list."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_token_ids(token_ids: Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` if any id is outside ``[0, vocab_size)`` (routers that index a table by id)."""
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size):
        raise ValueError(f"Token ids must be in [0, vocab_size={vocab_size}); got ids in [{int(token_ids.min())}, "
                         f"{int(token_ids.max())}]. Set `vocab_size` to the tokenizer's vocabulary size.")


class UsageError(ValueError):
    """A bad parameter, file or flag found once the run has started (data too small, a binary text
    file, an incomplete checkpoint): the ``lightning-moe`` command prints the message alone and exits
    with status 2, like a command-line usage error, instead of a traceback."""
