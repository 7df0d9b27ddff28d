"""The conditioning scale estimator's arithmetic: least-squares refits from a Gram matrix, backward
elimination against brute force, and its settings as a peer or the CLI gives them."""

from __future__ import annotations

import argparse
import itertools
import math

import pytest
import torch
from diffsplit.engine.sampling.condition_scales import (
    ChainDecision,
    ConditionDecision,
    Fit,
    fit,
    prune,
    prune_groups,
)
from diffsplit.engine.sampling.condition_settings import ConditionSettings, ConditionSettingsError

from diffsplit.condition_args import add_condition_arguments, condition_settings


def gram_of(*vectors: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack([v.double() for v in vectors])
    return stacked @ stacked.T


def direction(seed: int, size: int = 256) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_keeping_everything_is_exact_with_unit_scales() -> None:
    gram = gram_of(direction(1), direction(2), direction(3))
    result = fit(gram, [0, 1, 2])
    assert result.error == pytest.approx(0.0, abs=1e-6)
    assert result.scales == pytest.approx((1.0, 1.0, 1.0))


def test_a_duplicate_condition_is_dropped_and_the_other_doubled() -> None:
    shared = direction(1)
    gram = gram_of(shared, shared * 0.5, direction(2))
    result = prune(gram, tolerance=0.05, max_scale=2.0)
    # the strong one stands for both at 1.5x (the weak one would need 3x, over the limit)
    assert result.kept == (0, 2)
    assert result.scales == pytest.approx((1.5, 1.0), rel=1e-6)
    assert result.error == pytest.approx(0.0, abs=1e-6)


def test_scales_above_the_limit_are_not_taken() -> None:
    shared = direction(1)
    gram = gram_of(shared, shared * 0.5)
    # dropping the strong one needs scale 3 on the weak one; dropping the weak one needs 1.5
    assert prune(gram, tolerance=0.01, max_scale=2.0).kept == (0,)
    assert prune(gram, tolerance=0.01, max_scale=1.2).kept == (0, 1)


def test_independent_conditions_of_equal_strength_are_all_kept() -> None:
    gram = gram_of(direction(1), direction(2), direction(3))
    result = prune(gram, tolerance=0.3, max_scale=2.0)
    assert result.kept == (0, 1, 2)
    # dropping one of three orthogonal equal ones would leave sqrt(1/3) of the total out
    assert fit(gram, [0, 1]).error == pytest.approx(math.sqrt(1 / 3), rel=0.1)


def test_a_weak_independent_condition_is_dropped_within_the_tolerance() -> None:
    gram = gram_of(direction(1), direction(2), direction(3) * 0.05)
    result = prune(gram, tolerance=0.1, max_scale=2.0)
    assert result.kept == (0, 1)
    assert 0 < result.error < 0.1


def test_groups_are_pruned_apart_and_what_is_left_out_is_neither_target_nor_term() -> None:
    # 0 and 1 are the same condition in two windows: neither may stand in for the other
    gram = gram_of(direction(1), direction(1), direction(2) * 0.05)
    assert len(prune(gram, tolerance=0.1, max_scale=2.0).kept) == 1  # one window: one stands in for both
    apart = prune_groups(gram, [[0], [1, 2]], tolerance=0.1, max_scale=2.0)
    assert apart.kept == (0, 1) and apart.scales == pytest.approx((1.0, 1.0), abs=0.01)
    assert 0 < apart.error < 0.1  # only the weak 2 is dropped, and the error says what that costs
    # 1 is left out (no longer active): 0 is fitted to itself alone, at scale 1, not to cover 1
    alone = prune_groups(gram, [[0, 2]], tolerance=0.1, max_scale=2.0)
    assert alone.kept == (0,) and alone.scales == pytest.approx((1.0,), abs=0.01)
    assert prune_groups(gram, [], tolerance=0.1, max_scale=2.0) == Fit((), (), 0.0)


def test_at_least_one_condition_stays() -> None:
    gram = gram_of(direction(1) * 1e-3, direction(2) * 1e-3)
    assert len(prune(gram, tolerance=1.0, max_scale=10.0).kept) == 1


def test_greedy_elimination_against_brute_force() -> None:
    """On random chains of 2 to 6 conditions (mixtures of three shared directions), the greedy kept set
    is valid, mostly as small as the smallest valid set, and never more than two conditions larger."""
    worse_by = []
    for case in range(120):
        generator = torch.Generator().manual_seed(case)
        count = 2 + case % 5
        bases = torch.randn(3, 64, generator=generator, dtype=torch.float64)
        mixes = torch.rand(count, 3, generator=generator, dtype=torch.float64) ** 3
        strengths = torch.rand(count, 1, generator=generator, dtype=torch.float64) + 0.05
        gram = gram_of(*(strengths * (mixes @ bases)))
        greedy = prune(gram, tolerance=0.15, max_scale=2.0)
        assert greedy.error <= 0.15 + 1e-9 and all(0 <= s <= 2.0 + 1e-9 for s in greedy.scales)
        smallest = count
        for size in range(1, count + 1):
            for kept in itertools.combinations(range(count), size):
                trial = fit(gram, kept)
                if trial.error <= 0.15 and all(-1e-9 <= s <= 2.0 for s in trial.scales):
                    smallest = min(smallest, size)
            if smallest <= size:
                break
        worse_by.append(len(greedy.kept) - smallest)
    assert max(worse_by) <= 2, worse_by  # measured: 115 of 120 optimal, 3 one over, 2 two over
    assert sum(1 for w in worse_by if w == 0) >= 0.9 * len(worse_by), worse_by


@pytest.mark.parametrize(("data", "wrong"), [
    ({"mode": "manual"}, "'conditions' must be"),
    ([1, 2], "'conditions' must be"),
    ({"mode": "auto", "probe": 0}, "probe must be a number in (0.0, 1.0)"),
    ({"mode": "auto", "probe": 1.0}, "probe must be a number in (0.0, 1.0)"),
    ({"mode": "auto", "probe": True}, "probe must be a number"),
    ({"mode": "auto", "tolerance": float("nan")}, "tolerance must be a number in [0.0, 1.0]"),
    ({"mode": "auto", "max_scale": 100}, "max_scale must be a number in [1.0, 10.0]"),
    ({"mode": "auto", "steps": 3}, "unknown fields: steps"),
])
def test_settings_from_a_peer_are_checked(data: object, wrong: str) -> None:
    with pytest.raises(ConditionSettingsError, match=wrong.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        ConditionSettings.from_wire(data)


def test_settings_round_trip_and_probe_steps() -> None:
    settings = ConditionSettings(probe=0.3, tolerance=0.05, max_scale=1.5)
    assert ConditionSettings.from_wire(settings.to_wire()) == settings
    assert settings.probe_steps(10) == 3
    assert settings.probe_steps(1) == 1


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_condition_arguments(parser)
    return parser.parse_args(argv)


def test_the_cli_flags() -> None:
    assert condition_settings(parse()) is None
    assert condition_settings(parse("--conditions", "auto", "--conditions-probe", "0.5",
                                    "--conditions-tolerance", "0")) == ConditionSettings(probe=0.5,
                                                                                         tolerance=0.0)


@pytest.mark.parametrize("argv", [
    ("--conditions", "maybe"), ("--conditions-probe", "1"), ("--conditions-probe", "x"),
    ("--conditions-tolerance", "-0.1"),
])
def test_bad_cli_flags_are_refused(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert argv[0] in capsys.readouterr().err


def test_decisions_from_a_peer_are_read_bounded_and_malformed_ones_refused() -> None:
    decision = ChainDecision("6", 2, 8, 0.01, (
        ConditionDecision("node 11 " + "x" * 500, 0.8, 2.0, 0.9, True, 1.5, "covers dropped ones"),
        ConditionDecision("node 22", 0.7, 1.0, 0.9, False, 1.0, "overlaps a kept condition"),
    ))
    back = ChainDecision.from_dict(decision.to_dict())
    assert back.dropped == 1 and len(back.conditions[0].label) <= 120
    assert back.conditions[1] == decision.conditions[1]
    for broken in ({"conditions": [1]}, {"conditions": [{"label": "a"}]}, {"x": 1}, "text"):
        with pytest.raises((KeyError, TypeError, ValueError)):
            ChainDecision.from_dict(broken)
    good = decision.to_dict()
    entry = good["conditions"][1]
    for broken, reason in (
        ({**good, "conditions": [entry] * 65}, "65 conditions, over the limit of 64"),
        ({**good, "conditions": [{**entry, "strength": float("nan")}]}, "'strength' is not a finite number"),
        ({**good, "conditions": [{**entry, "scale": "1"}]}, "'scale' is not a number"),
        ({**good, "probe_steps": 10**9}, "'probe_steps' is not a step count"),
        ({**good, "total_steps": True}, "'total_steps' is not a step count"),
    ):
        with pytest.raises(ValueError, match=reason):
            ChainDecision.from_dict(broken)
    # a probe whose residuals overflowed reports them as they are
    overflowed = ChainDecision.from_dict({**good, "error": float("nan"), "conditions": [
        {**entry, "activation": float("inf")}]})
    assert math.isnan(overflowed.error) and overflowed.conditions[0].activation == math.inf


def test_a_gram_matrix_that_is_not_finite_drops_nothing() -> None:
    gram = torch.tensor([[float("inf"), 1.0], [1.0, 2.0]], dtype=torch.float64)
    assert prune(gram, tolerance=0.5, max_scale=2.0).kept == (0, 1)


def test_a_malformed_decision_from_a_worker_is_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from diffsplit.engine.offload import _note_conditions
    from diffsplit.engine.sampling.condition_scales import ConditionLog
    from diffsplit.transport.worker_ops import NodeResult

    decisions = ConditionLog(ConditionSettings())
    call = SimpleNamespace(context=SimpleNamespace(conditions=decisions), node=SimpleNamespace(id="6"))
    good = ChainDecision("6", 2, 8, 0.0, ()).to_dict()
    result = NodeResult(outputs=(), conditions=({"conditions": "no"}, {**good, "probe_steps": float("inf")},
                                                good))
    _note_conditions(call, result, "tcp://w:1")  # type: ignore[arg-type]
    assert decisions.snapshot() == [ChainDecision.from_dict(good)]
    assert sum("malformed condition decision" in r.getMessage() for r in caplog.records) == 2
