"""argparse types for numbers: each refuses what is out of range with a message naming the value."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type[int] | type[float], what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    value = int(_number(text, int, "a whole number"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0."""
    value = int(_number(text, int, "a whole number"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0."""
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0."""
    value = _number(text, float, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, not {text}")
    return value


def positive_seconds(text: str) -> float:
    """A number of seconds above 0."""
    value = _number(text, float, "a number of seconds")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 s, not {text}")
    return value


def batch_size(text: str) -> int:
    """``--batch-max``: 1 (off) to 64 requests sampled together."""
    value = int(_number(text, int, "a whole number"))
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be in 1..64, not {value}")
    return value


def batch_wait(text: str) -> float:
    """``--batch-wait-ms``: 0 to 10000 milliseconds."""
    value = _number(text, float, "a number of milliseconds")
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be in 0..10000 ms, not {text}")
    return value
