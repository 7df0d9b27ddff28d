"""``diffsplit.profile(fn, *args, **kwargs)``: measure the steps of decorated Python code.

Every call of a ``@diffsplit.node`` step or a ``@diffsplit.loader`` function
goes through ``diffsplit.tracer.marks``; the tracer's call recorder watches
those entry points (``sys.setprofile`` with a code filter, switched off inside
torch module forwards, restored afterwards). For each call this module
measures wall time, CPU time (whole process), peak memory, the bytes of its
arguments by category, and the parameter bytes of its model arguments (what a
naive design would ship). Calls of the same step add up. A function that calls
no marked step is measured as one step, the whole call, and the profile says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffsplit.profiles.memory import MemoryMark, MemoryProbe
from diffsplit.profiles.model import CATEGORIES
from diffsplit.profiles.report import format_bytes, render_table
from diffsplit.profiles.sizes import category_of, tensor_bytes
from diffsplit.tracer.known_loaders import ResolvedFunction, resolve_known_functions
from diffsplit.tracer.recorder import CallRecorder

StepKind = Literal["node", "loader", "call"]


@dataclass(frozen=True)
class StepMeasure:
    """One step (all calls of one marked function): totals over its calls."""

    name: str
    kind: StepKind
    calls: int
    wall_s: float
    cpu_s: float
    peak_bytes: int
    memory_kind: str
    input_bytes: Mapping[str, int]
    naive_weight_bytes: int


@dataclass(frozen=True)
class CallProfile:
    """The profile of one call of ``function``: its steps in order of first call, and the total."""

    function: str
    total_s: float
    steps: tuple[StepMeasure, ...]
    hooked: bool
    result: Any = field(default=None, compare=False, repr=False)

    def report(self) -> str:
        """A terminal table of the steps."""
        rows = [(s.name, s.kind, str(s.calls), f"{s.wall_s:.3f}", f"{s.cpu_s:.3f}",
                 format_bytes(s.peak_bytes), format_bytes(s.input_bytes.get("intermediate", 0)),
                 format_bytes(s.naive_weight_bytes))
                for s in self.steps]
        header = ("step", "kind", "calls", "wall s", "cpu s", "peak mem", "tensors in", "model weights")
        lead = f"{self.function}: {self.total_s:.3f} s"
        if not self.hooked:
            lead += " (no @diffsplit.node steps were called: the whole call is one step)"
        return lead + "\n" + render_table(rows, header) + "\n"


class _StepListener:
    """Receives marked calls from the recorder and measures each one."""

    def __init__(self, probe: MemoryProbe) -> None:
        self.probe = probe
        self._lock = threading.Lock()
        self.steps: dict[str, dict[str, Any]] = {}

    def call_started(self, function: ResolvedFunction, arguments: dict[str, Any]) -> object | None:
        marked = arguments.get("marked")
        wrapped = getattr(marked, "__wrapped__", None)
        name = getattr(wrapped, "__qualname__", function.qualname)
        kind: StepKind = "node" if function.role == "node" else "loader"
        values = [*arguments.get("args", ()), *dict(arguments.get("kwargs") or {}).values()]
        mark = self.probe.begin()
        return (name, kind, values, mark, time.perf_counter(), time.process_time())

    def call_finished(self, token: object, result: Any, raised: bool) -> None:
        name, kind, values, mark, started, cpu_started = token  # type: ignore[misc]
        wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        memory = self.probe.end(mark)
        by_category = dict.fromkeys(CATEGORIES, 0)
        for value in values:
            category = category_of(value, type(value).__name__)
            if category == "intermediate":
                by_category["intermediate"] += tensor_bytes(value)
        with self._lock:
            step = self.steps.setdefault(name, {
                "kind": kind, "calls": 0, "wall_s": 0.0, "cpu_s": 0.0, "peak": 0, "memory_kind": memory.kind,
                "bytes": dict.fromkeys(CATEGORIES, 0), "weights": _parameter_bytes(values)})
            step["calls"] += 1
            step["wall_s"] += wall_s
            step["cpu_s"] += cpu_s
            step["peak"] = max(step["peak"], memory.peak_bytes)
            for category, n in by_category.items():
                step["bytes"][category] += n


def profile(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CallProfile:
    """Call ``fn(*args, **kwargs)`` once and measure its ``@node``/``@loader`` steps."""
    device = _device_in_use()
    watched = resolve_known_functions(specs=())
    name = getattr(fn, "__qualname__", repr(fn))
    with MemoryProbe(device=device) as probe:
        listener = _StepListener(probe)
        whole: MemoryMark = probe.begin()
        cpu_started, started = time.process_time(), time.perf_counter()
        with CallRecorder(watched, listener):
            result = fn(*args, **kwargs)
        total_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        whole_memory = probe.end(whole)
    steps = tuple(
        StepMeasure(step_name, s["kind"], s["calls"], s["wall_s"], s["cpu_s"], s["peak"], s["memory_kind"],
                    s["bytes"], s["weights"])
        for step_name, s in listener.steps.items()
    )
    hooked = bool(steps)
    if not hooked:
        steps = (StepMeasure(name, "call", 1, total_s, cpu_s, whole_memory.peak_bytes, whole_memory.kind,
                             dict.fromkeys(CATEGORIES, 0), 0),)
    return CallProfile(name, total_s, steps, hooked, result)


def _device_in_use() -> str:
    """``cuda`` where this process already computes on CUDA (its context is up), else ``cpu``.

    A CUDA device merely being present says nothing about where ``fn`` computes: on a GPU machine
    CPU code would read the idle allocator (zero) and be labelled ``cuda``. Code that starts CUDA
    inside the profiled call is measured by RSS, and its steps say ``rss``.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _parameter_bytes(values: list[Any]) -> int:
    """Bytes of the parameters and buffers of the torch modules among ``values`` (each tensor once)."""
    seen: dict[int, int] = {}
    for value in values:
        modules = [value] if isinstance(value, torch.nn.Module) else [
            c for c in (getattr(value, "components", None) or {}).values() if isinstance(c, torch.nn.Module)]
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
