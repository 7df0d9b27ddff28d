"""The worker's model cache: LRU under a byte budget, one build per digest."""

from __future__ import annotations

import threading

import torch
from diffsplit.remote.cache import ModelCache, module_bytes


def linear(n: int) -> torch.nn.Linear:
    return torch.nn.Linear(n, n, bias=False)  # n*n float32 = 4*n*n bytes


def test_module_bytes_counts_shared_tensors_once() -> None:
    layer = linear(8)
    assert module_bytes(layer) == 8 * 8 * 4
    assert module_bytes([layer, layer]) == 8 * 8 * 4
    assert module_bytes({"a": layer, "b": linear(4)}) == (64 + 16) * 4


def test_hit_after_build_and_lru_eviction_under_budget() -> None:
    cache = ModelCache(budget_bytes=2 * 64 * 4)
    builds: list[str] = []

    def builder(name: str):
        def build():
            builds.append(name)
            return linear(8)
        return build

    first, hit = cache.get_or_build("a", builder("a"))
    assert not hit
    again, hit = cache.get_or_build("a", builder("a"))
    assert hit and again is first
    cache.get_or_build("b", builder("b"))
    cache.get_or_build("a", builder("a"))  # a becomes most recent
    cache.get_or_build("c", builder("c"))  # evicts b, the least recently used
    assert cache.digests() == ["a", "c"]
    assert builds == ["a", "b", "c"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (2, 3, 1)
    assert stats.bytes <= stats.budget_bytes


def test_entry_larger_than_budget_is_returned_not_kept() -> None:
    cache = ModelCache(budget_bytes=10)
    value, hit = cache.get_or_build("big", lambda: linear(8))
    assert isinstance(value, torch.nn.Linear) and not hit
    assert not cache.peek("big")


def test_concurrent_requests_build_once() -> None:
    cache = ModelCache(budget_bytes=1 << 20)
    started = threading.Event()
    release = threading.Event()
    calls = []

    def slow_build():
        calls.append(1)
        started.set()
        assert release.wait(10)
        return linear(4)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_build("x", slow_build)))
               for _ in range(3)]
    threads[0].start()
    assert started.wait(10)
    for thread in threads[1:]:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1
    values = {id(value) for value, _ in results}
    assert len(values) == 1
    assert sorted(hit for _, hit in results) == [False, True, True]


def test_failed_build_is_not_cached_and_can_be_retried() -> None:
    cache = ModelCache(budget_bytes=1 << 20)

    def broken():
        raise RuntimeError("disk gone")

    try:
        cache.get_or_build("x", broken)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the build error must propagate")
    value, hit = cache.get_or_build("x", lambda: linear(2))
    assert not hit and isinstance(value, torch.nn.Linear)
