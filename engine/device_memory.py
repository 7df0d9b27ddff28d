"""Models on the device that runs them, within a byte budget: placed copies, LRU out, never twice.

Built models (a worker's :class:`~diffsplit.remote.cache.ModelCache`, a local
run's loader outputs) stay as they were built: float32 on the CPU, the objects
recipes and fingerprints describe. When a node runs, :meth:`DeviceMemory.place`
gives it a *placed copy* of each module on the device in the dtype the policy
chooses for its kind; the copy is kept for the next node and the master never
changes, so a LoRA base, a fingerprint or a CPU run stays exact. When the
device and dtype are the master's own (the CPU in float32), the master itself
is used and nothing is copied: CPU runs are what they were, bit for bit.

Budget: copies of modules no running job uses leave, least recently used
first, when a new copy needs the room (on a GPU the master is already in CPU
memory, so "back to the CPU" is dropping the copy). Each module has at most
one copy per manager, and a copy goes when its master is garbage collected.
A job declares what it pins with :meth:`DeviceMemory.job` (its modules, and an
activation estimate); a job whose needs exceed the whole budget fails at once
with :class:`DeviceOutOfMemory`; one that does not fit beside the running jobs
waits (``on_wait`` says why) until they finish.

Compared to ComfyUI's ``model_management`` (which moves the one module between
devices and casts it in place): copying keeps the built object pristine for
recipes, fingerprints and LoRA bases shared by several requests.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffsplit.engine.devices import measured_peak_bytes
from diffsplit.engine.dtypes import DtypePolicy, ModelKind, dtype_name
from diffsplit.engine.errors import EngineError
from diffsplit.engine.lru import LruTable

MIB = 1 << 20


class DeviceOutOfMemory(EngineError):
    """A job needs more device memory than the budget holds (after freeing what no job uses)."""

    def __init__(self, what: str, need_bytes: int, budget_bytes: int, pinned_bytes: int = 0) -> None:
        self.need_bytes = need_bytes
        self.budget_bytes = budget_bytes
        self.pinned_bytes = pinned_bytes
        held = f"; {pinned_bytes / MIB:.0f} MiB held by running jobs" if pinned_bytes else ""
        super().__init__(f"out of device memory: {what} needs {need_bytes / MIB:.0f} MiB, the device budget "
                         f"is {budget_bytes / MIB:.0f} MiB{held} (raise --vram-gb, or use a smaller dtype)")


@dataclass(frozen=True)
class DeviceMemoryStats:
    """Counters of one manager: what is on the device, and what moved."""

    device: str
    budget_bytes: int | None
    resident_bytes: int
    entries: int
    #: copies made (a module moved or cast to the device)
    placed: int
    #: placements served by a copy already there
    reused: int
    #: copies dropped to make room for another
    evicted: int
    #: node runs retried after an out-of-memory error
    oom_retries: int
    #: the most bytes resident at once (copies plus running jobs' activation estimates)
    peak_bytes: int
    #: the allocator's own peak on a CUDA device (torch.cuda.max_memory_allocated); None elsewhere
    measured_peak_bytes: int | None = None


@dataclass
class _Copy:
    master: weakref.ReferenceType[torch.nn.Module]
    placed: torch.nn.Module
    size: int
    dtype: torch.dtype
    pins: int = 0


@dataclass
class _JobPins:
    keys: set[int] = field(default_factory=set)
    activation_bytes: int = 0
    #: what the job declared it will place: counted as busy until placed, so a job admitted beside it waits
    modules: tuple[tuple[torch.nn.Module, torch.dtype], ...] = ()


def target_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module``'s parameters and buffers once floating tensors are in ``dtype`` (shared once)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * (itemsize if tensor.is_floating_point() else tensor.element_size())
    return total


def is_placed(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether every parameter and buffer already sits on ``device`` and every floating one is ``dtype``
    (None: any dtype)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if not same_device(tensor.device, device):
            return False
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            return False
    return True


def same_device(a: torch.device, b: torch.device) -> bool:
    """One device: the same type and (for CUDA) the same index, ``cuda`` meaning the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def placed_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` on ``device`` with floating tensors in ``dtype``; ``module`` is not touched.

    Parameters and buffers are converted one by one straight into the copy, so the master is never
    duplicated on its own device first.
    """
    memo: dict[int, object] = {}
    with torch.no_grad():
        for parameter in module.parameters():
            if id(parameter) not in memo:
                memo[id(parameter)] = torch.nn.Parameter(_converted(parameter, device, dtype),
                                                         requires_grad=parameter.requires_grad)
        for buffer in module.buffers():
            if id(buffer) not in memo:
                memo[id(buffer)] = _converted(buffer, device, dtype)
    return copy.deepcopy(module, memo)


def _converted(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    wanted = dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(device=device, dtype=wanted)


class DeviceMemory:
    """Placed copies of modules on one device under a byte budget (None: no budget). Thread-safe."""

    def __init__(self, device: torch.device, policy: DtypePolicy | None = None,
                 budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError("device budget must be >= 0 bytes")
        self.device = device
        self.policy = policy or DtypePolicy()
        self.budget_bytes = budget_bytes
        self._copies: LruTable[int, _Copy] = LruTable()
        self._lock = threading.Condition()
        self._jobs: dict[int, _JobPins] = {}
        self._local = threading.local()
        self._dead: deque[int] = deque()  # keys whose master was collected (appended by weakref callbacks)
        self._placed = self._reused = self._evicted = self._oom_retries = self._peak = 0

    @classmethod
    def from_settings(cls, device: str = "auto", *, dtype: str = "auto", unet_dtype: str = "auto",
                      vae_dtype: str = "auto", text_encoder_dtype: str = "auto",
                      budget_bytes: int | None = None) -> DeviceMemory:
        """The manager for the ``--device``/dtype flags as text (``budget_bytes`` None: the device's default).

        DeviceError/DtypeError name a bad setting.
        """
        from diffsplit.engine.devices import default_budget_bytes, resolve_device

        resolved = resolve_device(device)
        policy = DtypePolicy.choose(resolved, dtype=dtype, unet=unet_dtype, vae=vae_dtype,
                                    text_encoder=text_encoder_dtype)
        budget = budget_bytes if budget_bytes is not None else default_budget_bytes(resolved)
        return cls(resolved, policy, budget)

    # -- what jobs call ---------------------------------------------------------------------------
    @contextmanager
    def job(self, activation_bytes: int = 0, *, modules: Sequence[tuple[torch.nn.Module, torch.dtype]] = (),
            what: str = "the job", on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Run a job: reserve ``activation_bytes`` and pin every module placed in the block until it ends.

        ``modules`` (master, dtype) are what the job will place: their copies not yet on the device
        count towards its needs. Waits while the needs do not fit beside running jobs (``on_wait`` is
        told why, once); raises DeviceOutOfMemory when they could never fit. Nested calls join the
        outer job.
        """
        if getattr(self._local, "job", None) is not None:
            yield
            return
        pins = _JobPins(activation_bytes=max(0, activation_bytes), modules=tuple(modules))
        with self._lock:
            self._purge_dead_locked()
            self._reserve_locked(pins, modules, what, on_wait)
            self._jobs[id(pins)] = pins  # the peak counts its activations when it places
        self._local.job = pins
        try:
            yield
        finally:
            self._local.job = None
            with self._lock:
                del self._jobs[id(pins)]
                for key in pins.keys:
                    entry = self._copies.peek(key)
                    if entry is not None:
                        entry.pins -= 1
                self._lock.notify_all()

    def place(self, module: torch.nn.Module, kind: ModelKind) -> torch.nn.Module:
        """``module`` on this device in the policy's dtype for ``kind``: the master itself, or its copy."""
        return self.place_as(module, self.policy.of(kind))

    def place_as(self, module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
        """``module`` on this device in ``dtype`` (None: the dtype of its floating tensors now)."""
        wanted = dtype if dtype is not None else _float_dtype(module)
        if is_placed(module, self.device, wanted):
            return module
        key = id(module)
        pins = getattr(self._local, "job", None)
        with self._lock:
            self._purge_dead_locked()
            entry = self._copies.peek(key)
            if entry is not None and (entry.master() is not module or entry.dtype != wanted):
                self._drop_locked(key)  # a dead master's id reused, or another dtype asked: not this copy
                entry = None
            if entry is not None:
                self._copies.get(key)  # now the most recently used
                self._reused += 1
                self._pin_locked(key, entry, pins)
                self._note_peak_locked()  # a job sharing a copy adds its activations beside the others'
                return entry.placed
            size = target_bytes(module, wanted)
            self._make_room_locked(size, f"{type(module).__name__} in {dtype_name(wanted)}")
            placed = placed_copy(module, self.device, wanted)
            entry = _Copy(weakref.ref(module, self._forget_later(key)), placed, size, wanted)
            self._copies.put(key, entry, size)
            self._placed += 1
            self._pin_locked(key, entry, pins)
            self._note_peak_locked()
            return placed

    def free_unpinned(self) -> int:
        """Drop every copy no running job pins; the bytes freed."""
        with self._lock:
            freed = self._copies.evict_until(0, can_evict=_unpinned)
            self._lock.notify_all()
            return sum(copy.size for copy in freed)

    def note_oom_retry(self) -> None:
        """Count a node run retried after an out-of-memory error."""
        with self._lock:
            self._oom_retries += 1

    def stats(self) -> DeviceMemoryStats:
        """The counters now."""
        with self._lock:
            self._purge_dead_locked()
            return DeviceMemoryStats(
                device=str(self.device), budget_bytes=self.budget_bytes,
                resident_bytes=self._resident_locked(),
                entries=len(self._copies), placed=self._placed, reused=self._reused, evicted=self._evicted,
                oom_retries=self._oom_retries, peak_bytes=self._peak,
                measured_peak_bytes=measured_peak_bytes(self.device))

    def resident(self) -> list[tuple[str, int, int]]:
        """(class name, bytes, pins) of each copy, least recently used first."""
        with self._lock:
            return [(type(entry.placed).__name__, entry.size, entry.pins) for entry in self._copies.values()]

    # -- bookkeeping (the lock is held) -----------------------------------------------------------
    def _resident_locked(self) -> int:
        return self._copies.total_bytes

    def _activations_locked(self) -> int:
        return sum(job.activation_bytes for job in self._jobs.values())

    def _pinned_locked(self) -> int:
        return sum(entry.size for entry in self._copies.values() if entry.pins > 0)

    def _note_peak_locked(self) -> None:
        self._peak = max(self._peak, self._resident_locked() + self._activations_locked())

    def _pin_locked(self, key: int, entry: _Copy, pins: _JobPins | None) -> None:
        if pins is not None and key not in pins.keys:
            pins.keys.add(key)
            entry.pins += 1

    def _weights_needed_locked(self, modules: Sequence[tuple[torch.nn.Module, torch.dtype]]) -> int:
        """Bytes of the copies ``modules`` would add (those placed already, or at home, add nothing)."""
        total = 0
        for module, dtype in {id(module): (module, dtype) for module, dtype in modules}.values():
            entry = self._copies.peek(id(module))
            if is_placed(module, self.device, dtype):
                continue
            if entry is not None and entry.master() is module and entry.dtype == dtype:
                continue
            total += target_bytes(module, dtype)
        return total

    def _declared_locked(self) -> int:
        """Bytes running jobs declared but have not placed yet (placed ones count as pinned)."""
        return sum(self._weights_needed_locked(job.modules) for job in self._jobs.values())

    def _reserve_locked(self, pins: _JobPins, modules: Sequence[tuple[torch.nn.Module, torch.dtype]],
                        what: str, on_wait: Callable[[str], None] | None) -> None:
        if self.budget_bytes is None:
            return
        told = False
        while True:
            needs = pins.activation_bytes + self._weights_needed_locked(modules)
            if needs > self.budget_bytes:
                raise DeviceOutOfMemory(what, needs, self.budget_bytes)
            busy = self._pinned_locked() + self._activations_locked() + self._declared_locked()
            if busy + needs <= self.budget_bytes or not self._jobs:
                return  # fits beside the running jobs (unpinned copies make room), or nothing will finish
            if on_wait is not None and not told:
                on_wait(f"waiting for device memory: {what} needs {needs / MIB:.0f} MiB beside "
                        f"{busy / MIB:.0f} MiB in use by {len(self._jobs)} running job(s) "
                        f"(budget {self.budget_bytes / MIB:.0f} MiB)")
                told = True
            self._lock.wait()

    def _make_room_locked(self, size: int, what: str) -> None:
        if self.budget_bytes is None:
            return
        activations = self._activations_locked()
        if self._pinned_locked() + activations + size > self.budget_bytes:  # fails anyway: evict nothing
            raise DeviceOutOfMemory(what, size, self.budget_bytes, self._pinned_locked() + activations)
        self._evicted += len(self._copies.evict_until(self.budget_bytes - activations - size,
                                                      can_evict=_unpinned))
        if self._resident_locked() + activations + size > self.budget_bytes:
            raise DeviceOutOfMemory(what, size, self.budget_bytes, self._pinned_locked() + activations)

    def _drop_locked(self, key: int) -> None:
        self._copies.pop(key)

    def _forget_later(self, key: int) -> Callable[[weakref.ReferenceType[torch.nn.Module]], None]:
        """A weakref callback: when the master goes, its copy goes at the next call (a GC takes no lock)."""
        dead = self._dead

        def forget(_reference: weakref.ReferenceType[torch.nn.Module]) -> None:
            dead.append(key)

        return forget

    def _purge_dead_locked(self) -> None:
        still_pinned = []
        while self._dead:
            key = self._dead.popleft()
            entry = self._copies.peek(key)
            if entry is None or entry.master() is not None:
                continue
            if entry.pins > 0:
                still_pinned.append(key)  # a running job uses it: it goes at the first purge after the job
            else:
                self._copies.pop(key)
        self._dead.extend(still_pinned)


def _unpinned(_key: int, entry: _Copy) -> bool:
    return entry.pins <= 0


def _float_dtype(module: torch.nn.Module) -> torch.dtype:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
