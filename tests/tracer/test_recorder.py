"""The call recorder: code-object filter, outermost calls only, results, threads, and clean restore."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from diffsplit.tracer.known_loaders import KnownFunction, ResolvedFunction, describe_function
from diffsplit.tracer.recorder import CallRecorder


def load_thing(path: str, scale: float = 1.0) -> dict[str, Any]:
    return {"path": path, "scale": scale, "inner": load_part(path)}


def load_part(path: str) -> str:
    return path.upper()


def load_nothing(path: str) -> None:
    return None


def load_broken(path: str) -> str:
    raise ValueError(f"cannot load {path}")


def step(value: int) -> int:
    return load_part(str(value)).count("1")


@dataclass
class Listener:
    """Collects (name, arguments, result, raised) of every reported call."""

    calls: list[tuple[str, dict[str, Any], Any, bool]] = field(default_factory=list)
    fail_on: str | None = None

    def call_started(self, function: ResolvedFunction, arguments: dict[str, Any]) -> object:
        if function.qualname == self.fail_on:
            raise RuntimeError("listener failure")
        return (function.qualname, arguments)

    def call_finished(self, token: object, result: Any, raised: bool) -> None:
        name, arguments = token  # type: ignore[misc]
        self.calls.append((name, arguments, result, raised))


def watched(*functions: Any, nodes: tuple[Any, ...] = ()) -> dict[Any, ResolvedFunction]:
    table = {}
    for function in functions:
        spec = KnownFunction(f"tests:{function.__name__}", "test.load", "loader")
        table[function.__code__] = describe_function(function, spec, function.__name__)
    for function in nodes:
        spec = KnownFunction(f"tests:{function.__name__}", "node", "loader")
        table[function.__code__] = describe_function(function, spec, function.__name__, "node")
    return table


def sentinel_profile(frame: Any, event: str, arg: Any) -> None:
    """A stand-in for another profiler that must be back after recording."""


@pytest.fixture
def sentinel() -> Any:
    previous_sys, previous_threads = sys.getprofile(), threading.getprofile()
    sys.setprofile(sentinel_profile)
    threading.setprofile(sentinel_profile)
    yield sentinel_profile
    sys.setprofile(previous_sys)
    threading.setprofile(previous_threads)


def test_records_arguments_and_results_of_watched_calls_only() -> None:
    listener = Listener()
    with CallRecorder(watched(load_thing, load_part), listener):
        result = load_thing("a.safetensors", scale=0.5)
        load_part("b")
        len("not watched")
    assert [call[0] for call in listener.calls] == ["load_thing", "load_part"]
    _, arguments, returned, raised = listener.calls[0]
    assert arguments == {"path": "a.safetensors", "scale": 0.5}
    assert returned is result and not raised


def test_only_the_outermost_watched_call_is_reported() -> None:
    listener = Listener()
    with CallRecorder(watched(load_thing, load_part), listener):
        load_thing("x")
    assert [call[0] for call in listener.calls] == ["load_thing"]


def test_node_calls_do_not_hide_loader_calls_inside_them() -> None:
    listener = Listener()
    with CallRecorder(watched(load_part, nodes=(step,)), listener):
        step(11)
    assert [call[0] for call in listener.calls] == ["load_part", "step"]


def test_a_raising_call_is_reported_as_raised_and_none_results_are_not() -> None:
    listener = Listener()
    with CallRecorder(watched(load_broken, load_nothing), listener):
        with pytest.raises(ValueError):
            load_broken("bad")
        load_nothing("ok")
    assert [(call[0], call[3]) for call in listener.calls] == [("load_broken", True), ("load_nothing", False)]


def test_previous_profilers_are_restored_when_the_traced_code_raises(sentinel: Any) -> None:
    recorder = CallRecorder(watched(load_broken), Listener())
    with pytest.raises(ValueError), recorder:
        assert sys.getprofile() is not sentinel
        load_broken("bad")
    assert sys.getprofile() is sentinel
    assert threading.getprofile() is sentinel
    assert not recorder.active


def test_listener_failures_never_reach_the_traced_code() -> None:
    listener = Listener(fail_on="load_part")
    recorder = CallRecorder(watched(load_part, load_nothing), listener)
    with recorder:
        assert load_part("a") == "A"
        load_nothing("b")
    assert [call[0] for call in listener.calls] == ["load_nothing"]
    assert len(recorder.errors) == 1 and "listener failure" in recorder.errors[0]


def test_calls_in_threads_started_while_recording_are_reported() -> None:
    listener = Listener()
    with CallRecorder(watched(load_part), listener):
        worker = threading.Thread(target=load_part, args=("threaded",))
        worker.start()
        worker.join()
    assert [(call[0], call[2]) for call in listener.calls] == [("load_part", "THREADED")]


class CallsLoaderInForward(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        load_part("inside forward")
        return x * 2


class RaisesInForward(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("forward failed")


def test_recording_pauses_inside_module_forwards_and_resumes_after() -> None:
    listener = Listener()
    recorder = CallRecorder(watched(load_part), listener)
    with recorder:
        CallsLoaderInForward()(torch.ones(1))
        with pytest.raises(RuntimeError):
            RaisesInForward()(torch.ones(1))
        profile_after_forward = sys.getprofile()
        load_part("after")
    assert [call[2] for call in listener.calls] == ["AFTER"]
    assert profile_after_forward is not None


def test_without_pausing_calls_inside_forwards_are_reported() -> None:
    listener = Listener()
    with CallRecorder(watched(load_part), listener, pause_in_module_calls=False):
        CallsLoaderInForward()(torch.ones(1))
    assert [call[2] for call in listener.calls] == ["INSIDE FORWARD"]


def test_a_recorder_cannot_be_entered_twice() -> None:
    recorder = CallRecorder(watched(load_part), Listener())
    with recorder, pytest.raises(RuntimeError), recorder:
        pass


def test_nested_recorders_both_see_the_calls_they_watch() -> None:
    outer, inner = Listener(), Listener()
    with CallRecorder(watched(load_part), outer):
        load_part("before")
        with CallRecorder(watched(load_part, load_thing), inner):
            load_thing("both")
        load_part("after")
    assert [call[2] for call in outer.calls] == ["BEFORE", "BOTH", "AFTER"]
    assert [call[0] for call in inner.calls] == ["load_thing"]
    assert sys.getprofile() is None


def test_leaving_the_outer_block_first_keeps_the_inner_recorder_recording() -> None:
    outer, inner = Listener(), Listener()
    first = CallRecorder(watched(load_part), outer)
    second = CallRecorder(watched(load_part), inner)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    load_part("inner only")
    second.__exit__(None, None, None)
    load_part("nobody")
    assert outer.calls == [] and [call[2] for call in inner.calls] == ["INNER ONLY"]
    assert sys.getprofile() is None


def test_a_python_profiler_already_installed_keeps_seeing_every_event() -> None:
    events: list[tuple[str, str]] = []

    def other_profiler(frame: Any, event: str, arg: Any) -> None:
        if event in ("call", "return"):
            events.append((frame.f_code.co_name, event))

    listener = Listener()
    sys.setprofile(other_profiler)
    try:
        with CallRecorder(watched(load_thing), listener):
            load_thing("x")
            CallsLoaderInForward()(torch.ones(1))
        restored = sys.getprofile()
    finally:
        sys.setprofile(None)
    assert restored is other_profiler
    assert [call[0] for call in listener.calls] == ["load_thing"]
    names = [name for name, event in events if event == "call"]
    assert "load_part" in names and "forward" in names  # inside a loader and inside a module forward
    assert names.count("load_part") == 2


def test_a_profiler_that_cannot_be_chained_makes_recording_refuse() -> None:
    import cProfile

    from diffsplit.tracer.recorder import ProfilerConflict

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        with pytest.raises(ProfilerConflict, match="Profile"), CallRecorder(watched(load_part), Listener()):
            pass
        still_profiling = sys.getprofile()
    finally:
        profiler.disable()
    assert still_profiling is profiler


def test_a_line_tracer_such_as_a_debugger_keeps_working_while_recording() -> None:
    lines: list[int] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is load_part.__code__ and event == "line":
            lines.append(frame.f_lineno)
        return tracer

    listener = Listener()
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        with CallRecorder(watched(load_part), listener):
            load_part("traced")
    finally:
        sys.settrace(previous)
    assert lines and [call[2] for call in listener.calls] == ["TRACED"]
