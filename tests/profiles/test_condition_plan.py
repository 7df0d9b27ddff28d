"""The condition subtask manager: where each condition is preprocessed and how the link is shared.

The model's pieces are checked against brute force of their own (the flow-shop
order against every permutation, the link share against a fine grid), the
heuristic against the brute-force plan on random cases of 1 to 6 conditions,
and the plan against the cases whose answer is plain (a slow link keeps work
here, a fast link and a fast worker send it there).
"""

from __future__ import annotations

import itertools
import random

import pytest
from diffsplit.profiles.condition_plan import (
    LOCAL,
    REMOTE,
    ConditionCost,
    Link,
    _flow_shop,
    _split_time,
    best_plan,
    plan_conditions,
)
from diffsplit.profiles.errors import ProfileError

#: The heuristic's mean gap to the optimum over the random cases may not pass this (measured: see the bench).
MEAN_GAP_BOUND = 0.03
MB = 1_000_000


def random_case(rng: random.Random, count: int) -> tuple[list[ConditionCost], Link]:
    costs = [ConditionCost(f"c{n}", local_s=rng.uniform(0.01, 1.5), remote_s=rng.uniform(0.002, 0.3),
                           source_bytes=int(rng.uniform(0.05, 3) * MB),
                           hint_bytes=int(rng.uniform(0.02, 3) * MB))
             for n in range(count)]
    return costs, Link(bytes_per_s=rng.choice([1, 6, 12.5, 50]) * MB, latency_s=rng.uniform(0, 0.05))


def test_the_flow_shop_order_is_the_best_of_every_permutation() -> None:
    rng = random.Random(1)
    for _ in range(200):
        jobs = [(rng.uniform(0, 1), rng.uniform(0, 1)) for _ in range(rng.randint(1, 6))]
        lag = rng.choice([0.0, 0.1])

        def makespan(order: tuple[tuple[float, float], ...], lag: float = lag) -> float:
            first = second = 0.0
            for a, b in order:
                first += a
                second = max(second, first + lag) + b
            return second

        best = min(makespan(order) for order in itertools.permutations(jobs))
        assert _flow_shop(jobs, latency_between=lag) == pytest.approx(best, abs=1e-12)


def test_the_link_share_is_the_best_on_a_fine_grid() -> None:
    rng = random.Random(2)
    for _ in range(50):
        costs, link = random_case(rng, rng.randint(2, 5))
        split = {index for index in range(len(costs)) if rng.random() < 0.5} or {0}
        time, _ = _split_time(costs, split, link)
        local_jobs = [i for i in range(len(costs)) if i not in split]
        if not local_jobs:
            continue
        for step in range(1, 200):
            share = step / 200
            up, down = share * link.bytes_per_s, (1 - share) * link.bytes_per_s
            grid = max(_flow_shop([(costs[i].local_s, costs[i].hint_bytes / up) for i in local_jobs],
                                  latency_after=link.latency_s),
                       _flow_shop([(costs[i].source_bytes / down, costs[i].remote_s) for i in sorted(split)],
                                  latency_between=link.latency_s))
            assert time <= grid + 1e-9


def test_the_heuristic_is_near_the_brute_force_on_every_size_up_to_six() -> None:
    rng = random.Random(3)
    gaps = []
    for count in range(1, 7):
        for _ in range(60):
            costs, link = random_case(rng, count)
            heuristic, optimum = plan_conditions(costs, link), best_plan(costs, link)
            assert heuristic.ready_s >= optimum.ready_s - 1e-9  # the brute force is a lower bound
            everything_here = _split_time(costs, set(), link)[0]
            everything_there = _split_time(costs, set(range(count)), link)[0]
            assert optimum.ready_s <= min(everything_here, everything_there) + 1e-9
            gaps.append(heuristic.ready_s / optimum.ready_s - 1)
    mean = sum(gaps) / len(gaps)
    print(f"\nheuristic vs brute force, {len(gaps)} cases of 1-6 conditions: mean gap {mean:.2%}, "
          f"max {max(gaps):.2%}, optimal in {sum(gap < 1e-9 for gap in gaps) / len(gaps):.0%}")
    assert mean <= MEAN_GAP_BOUND


def test_a_slow_link_keeps_preprocessing_here_and_a_fast_one_sends_it_there() -> None:
    costs = [ConditionCost("canny", local_s=0.02, remote_s=0.01, source_bytes=2 * MB, hint_bytes=MB),
             ConditionCost("depth", local_s=1.2, remote_s=0.05, source_bytes=2 * MB, hint_bytes=MB)]
    slow = plan_conditions(costs, Link(bytes_per_s=0.1 * MB))  # 800 kbit/s: 20 s per source
    assert slow.where("canny") == LOCAL and slow.where("depth") == LOCAL
    fast = plan_conditions(costs, Link(bytes_per_s=1000 * MB))
    assert fast.where("depth") == REMOTE  # a 1.2 s local net against 0.05 s there
    assert fast.ready_s < slow.ready_s
    assert 0 <= fast.local_share <= 1
    assert "all conditions ready after" in fast.describe()


def test_bad_costs_are_refused_by_name() -> None:
    with pytest.raises(ProfileError, match="'depth': local_s"):
        ConditionCost("depth", local_s=-1, remote_s=0, source_bytes=0, hint_bytes=0)
    with pytest.raises(ProfileError, match="rate"):
        Link(bytes_per_s=0)
    cost = ConditionCost("x", local_s=0.1, remote_s=0.1, source_bytes=1, hint_bytes=1)
    with pytest.raises(ProfileError, match="distinct"):
        plan_conditions([cost, cost], Link(bytes_per_s=MB))


def test_the_report_counts_a_worker_hint_coming_back_and_going_up_again() -> None:
    from types import SimpleNamespace

    from diffsplit.profiles.condition_plan import condition_report, returned_remote_s
    from diffsplit.profiles.link import LinkModel

    link = LinkModel(rtt_s=0.02, up_bytes_per_s=1.25 * MB, down_bytes_per_s=2.5 * MB)
    assert returned_remote_s(0.1, MB, link) == pytest.approx(0.1 + 0.02 + 0.4 + 0.8)
    # preprocessing is 0.3 s here and 0.05 s there: on its own the worker looks faster, but the hint
    # it returns crosses the link twice more (1.2 s), so the plan keeps it here
    node = SimpleNamespace(node_id="20", class_type="Canny", local_s=0.3, remote_s=0.05,
                           request_bytes=MB, reply_bytes=MB)
    report = condition_report([node], {"Canny": "image/preprocessors"}, link)
    assert report is not None and report.plan.where("20 Canny") == LOCAL
    assert report.all_remote_s > report.all_local_s
