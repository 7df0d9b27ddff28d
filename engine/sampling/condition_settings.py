"""The settings of ``--conditions auto`` (the conditioning scale estimator), free of torch for the CLI."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ConditionSettingsError(ValueError):
    """Settings for the conditioning scale estimator that are out of range or malformed."""


@dataclass(frozen=True)
class ConditionSettings:
    """How ``--conditions auto`` probes and prunes.

    ``probe``: the fraction of a sampler run's steps (at least one) run with every
    condition to measure them; ``tolerance``: the relative error of the kept conditions'
    refitted residual against the full one stays below it (0: nothing is dropped);
    ``max_scale``: the largest scale a kept condition may get.
    """

    probe: float = 0.25
    tolerance: float = 0.15
    max_scale: float = 2.0

    def __post_init__(self) -> None:
        _check_number("probe", self.probe, 0.0, 1.0, low_open=True, high_open=True)
        _check_number("tolerance", self.tolerance, 0.0, 1.0)
        _check_number("max_scale", self.max_scale, 1.0, 10.0)

    def to_wire(self) -> dict[str, Any]:
        """As a request carries them."""
        return {"mode": "auto", "probe": self.probe, "tolerance": self.tolerance, "max_scale": self.max_scale}

    @classmethod
    def from_wire(cls, data: Any) -> ConditionSettings:
        """Settings a peer sent (ConditionSettingsError names what is wrong)."""
        if not isinstance(data, Mapping) or data.get("mode") != "auto":
            raise ConditionSettingsError(
                "'conditions' must be {'mode': 'auto', 'probe': ..., 'tolerance': ...}")
        unknown = set(data) - {"mode", "probe", "tolerance", "max_scale"}
        if unknown:
            names = ", ".join(sorted(map(str, unknown)))
            raise ConditionSettingsError(f"'conditions' has unknown fields: {names}")
        defaults = cls()
        return cls(
            probe=data.get("probe", defaults.probe),
            tolerance=data.get("tolerance", defaults.tolerance),
            max_scale=data.get("max_scale", defaults.max_scale),
        )

    def probe_steps(self, total_steps: int) -> int:
        """Steps run with every condition before deciding (at least one)."""
        return max(1, round(self.probe * total_steps))


def _check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ConditionSettingsError(f"conditions {name} must be a number in {left}{low}, {high}{right}, "
                                     f"not {value!r}")
