"""``--conditions auto`` and its settings, shared by the commands that run samplers."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from diffsplit.engine.sampling.condition_settings import ConditionSettings, ConditionSettingsError

if TYPE_CHECKING:
    from diffsplit.engine.sampling.condition_scales import ChainDecision


def _fraction(name: str, *, open_low: bool, open_high: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        low_ok = value > 0 if open_low else value >= 0
        high_ok = value < 1 if open_high else value <= 1
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(
                f"{name} must be in {'(' if open_low else '['}0, 1{')' if open_high else ']'}, not {text}")
        return value

    return parse


def add_condition_arguments(parser: argparse.ArgumentParser) -> None:
    """``--conditions``, ``--conditions-probe``, ``--conditions-tolerance``."""
    defaults = ConditionSettings()
    parser.add_argument(
        "--conditions", choices=("off", "auto"), default="off",
        help="auto: each sampler runs its first steps with every ControlNet condition, then drops the "
        "conditions its kept ones can stand in for (rescaled) and runs the rest with fewer ControlNet "
        "passes; the decisions are printed, in --stats and in the PNGs (default: off)")
    parser.add_argument(
        "--conditions-probe", type=_fraction("the probe", open_low=True, open_high=True),
        default=defaults.probe, metavar="FRACTION",
        help=f"fraction of a sampler's steps run with every condition before deciding "
        f"(default {defaults.probe})")
    parser.add_argument(
        "--conditions-tolerance", type=_fraction("the tolerance", open_low=False, open_high=False),
        default=defaults.tolerance, metavar="ERROR",
        help="conditions are dropped while the relative error of the kept ones' ControlNet residuals "
        f"against all of them, over the probe, stays below ERROR (0: none is; default {defaults.tolerance})")


def condition_settings(args: argparse.Namespace) -> ConditionSettings | None:
    """The estimator's settings where ``--conditions auto`` was given, else None."""
    if getattr(args, "conditions", "off") != "auto":
        return None
    try:
        return ConditionSettings(probe=args.conditions_probe, tolerance=args.conditions_tolerance)
    except ConditionSettingsError as exc:
        raise SystemExit(f"diffsplit: {exc}") from None


def decisions_json(decisions: Iterable[ChainDecision]) -> list[dict[str, Any]]:
    """The decisions of a run as plain data (``--stats``)."""
    return [decision.to_dict() for decision in decisions]
