"""The environment switches of the kernels' A/B and of the backends, read as the C++ side reads them.

A mistyped switch must not measure the default under another name: every reader here raises
ValueError naming the switch for a value it does not know (`csrc/env_switch.h` is the C++ side).
"""

from __future__ import annotations

import os
from typing import Optional


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The environment switch `name`, one of `choices` (case and spaces ignored; unset or empty: the first
    one). Any other value raises ValueError naming the switch: a mistyped switch must not measure the
    default under another name."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def env_exact(name: str, choices: tuple[str, ...]) -> Optional[str]:
    """The switch `name` as the C++ side reads it, exactly (no case folding, no spaces): unset, or one of
    `choices`. Any other value raises ValueError naming the switch (C++ would run the default for it)."""
    value = os.environ.get(name)
    if value is None or value in choices:
        return value
    raise ValueError(f"{name} must be unset or exactly one of {choices}, got {value!r}")


def env_int(name: str, default: int, valid, requirement: str) -> int:
    """The whole-number environment switch `name` (unset or empty: `default`). A value that is not a whole
    number, or that `valid(value)` refuses, raises ValueError naming the switch and `requirement`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"{name} must be {requirement}, got {text!r}")
    return value
