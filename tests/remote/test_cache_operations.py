"""The cache's operational side: entry names, in-use marks of running jobs, free and idle unload."""

from __future__ import annotations

import threading

import pytest
import torch
from diffsplit.remote.cache import ModelCache
from diffsplit.remote.idle_unload import IdleUnloader


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def linear(n: int) -> torch.nn.Linear:
    return torch.nn.Linear(n, n, bias=False)


def test_models_lists_names_sizes_and_idle_time() -> None:
    clock = FakeClock()
    cache = ModelCache(1 << 20, clock=clock)
    cache.get_or_build("a", lambda: linear(8), name="Loader(a.safetensors)")
    clock.now += 3.0
    cache.get_or_build("b", lambda: linear(4))  # no name: a digest-based label
    models = {m.digest: m for m in cache.models()}
    assert models["a"].name == "Loader(a.safetensors)" and models["a"].bytes == 8 * 8 * 4
    assert models["a"].idle_s == pytest.approx(3.0) and models["b"].idle_s == 0.0
    assert models["b"].name.startswith("recipe b")
    assert not any(m.in_use for m in models.values())


def test_free_unused_keeps_what_a_running_job_uses() -> None:
    cache = ModelCache(1 << 20)
    cache.get_or_build("idle", lambda: linear(8), name="idle model")
    inside = threading.Event()
    release = threading.Event()

    def job() -> None:
        with cache.job_scope():
            cache.get_or_build("busy", lambda: linear(4), name="busy model")
            inside.set()
            assert release.wait(30)

    thread = threading.Thread(target=job)
    thread.start()
    try:
        assert inside.wait(30)
        result = cache.free_unused()
        assert [m.name for m in result.freed] == ["idle model"]
        assert [m.name for m in result.kept] == ["busy model"] and result.kept[0].in_use
        assert result.freed_bytes == 8 * 8 * 4
        assert cache.digests() == ["busy"]
    finally:
        release.set()
        thread.join(30)
    # the job ended: nothing is in use any more, so the next free takes it
    assert [m.name for m in cache.free_unused().freed] == ["busy model"]
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.unloaded) == (0, 0, 2)


def test_a_hit_inside_a_job_marks_the_entry_in_use_and_nested_scopes_count_once() -> None:
    cache = ModelCache(1 << 20)
    cache.get_or_build("m", lambda: linear(4))
    with cache.job_scope():
        cache.get_or_build("m", lambda: linear(4))
        with cache.job_scope():
            cache.get_or_build("m", lambda: linear(4))
        assert cache.models()[0].in_use  # the inner scope's end does not release the outer job's mark
        assert cache.free_unused().freed == ()
    assert not cache.models()[0].in_use


def test_drop_idle_takes_only_entries_idle_past_the_limit_and_not_in_use() -> None:
    clock = FakeClock()
    cache = ModelCache(1 << 20, clock=clock)
    cache.get_or_build("old", lambda: linear(4), name="old")
    cache.get_or_build("held", lambda: linear(4), name="held")
    clock.now += 10.0
    cache.get_or_build("fresh", lambda: linear(4), name="fresh")
    with cache.job_scope():
        cache.get_or_build("held", lambda: linear(4))  # a hit: used now, and in use
        clock.now += 10.0
        dropped = cache.drop_idle(5.0)
        assert sorted(m.name for m in dropped) == ["fresh", "old"]
        assert cache.digests() == ["held"]
    clock.now += 10.0
    assert [m.name for m in cache.drop_idle(5.0)] == ["held"]


def test_idle_unloader_check_reports_what_it_dropped_and_stops_cleanly() -> None:
    clock = FakeClock()
    cache = ModelCache(1 << 20, clock=clock)
    heard: list[list[str]] = []
    unloader = IdleUnloader(cache, 2.0, on_unload=lambda models: heard.append([m.name for m in models]))
    cache.get_or_build("x", lambda: linear(4), name="x")
    assert unloader.check() == []
    clock.now += 2.5
    assert [m.name for m in unloader.check()] == ["x"]
    assert heard == [["x"]]
    unloader.start()
    unloader.stop()
    assert not any(t.name == "diffsplit-idle-unload" for t in threading.enumerate())


def test_idle_unloader_refuses_a_non_positive_idle_time() -> None:
    with pytest.raises(ValueError, match="> 0"):
        IdleUnloader(ModelCache(1), 0)


def test_build_names_show_loaders_and_files_and_stay_one_line() -> None:
    from diffsplit.remote.builder import build_name
    from diffsplit.tracer.recipe import FileRef, Recipe, Step

    base = Recipe(steps=(Step(op="comfy.node", cls="CheckpointLoaderSimple",
                              kwargs={"ckpt_name": FileRef("sd15.safetensors", "a" * 64, 10)}),), select="0")
    lora = Recipe(steps=(Step(op="comfy.node", cls="LoraLoader",
                              kwargs={"model": base, "lora_name": FileRef("style.safetensors", "b" * 64, 5),
                                      "strength_model": 0.8}),))
    assert build_name(lora) == "LoraLoader(style.safetensors) on [CheckpointLoaderSimple(sd15.safetensors)]"
    forged = Recipe(steps=(Step(op="comfy.node", cls="CheckpointLoaderSimple",
                                kwargs={"ckpt_name": FileRef("x\nINFO op=free.safetensors", "c" * 64, 1)}),))
    assert "\n" not in build_name(forged) and "x\\nINFO" in build_name(forged)
