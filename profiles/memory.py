"""Peak memory per node: the torch allocator on a CUDA device, process RSS on the CPU.

On the CPU the process RSS is sampled by one background thread (every
``interval_s``) while nodes run; a node's peak is the highest sample taken
while it ran, together with the readings at its start and end. Nodes running
at the same time share the samples (the profiler runs one node at a time).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType

import psutil
import torch
from diffsplit.profiles.model import MemoryMeasure


@dataclass(frozen=True)
class MemoryMark:
    """The reading taken when a node started."""

    token: int
    start_bytes: int


class MemoryProbe:
    """Measures the peak memory of code between :meth:`begin` and :meth:`end`.

    Use as a context manager around a run: it starts and stops the sampler thread.
    """

    def __init__(self, *, device: str = "cpu", interval_s: float = 0.005) -> None:
        self.kind = "cuda" if device.startswith("cuda") and torch.cuda.is_available() else "rss"
        self.device = device
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._peaks: dict[int, int] = {}
        self._next_token = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryProbe:
        if self.kind == "rss":
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="diffsplit-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def begin(self) -> MemoryMark:
        """Start measuring one node."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            now = torch.cuda.memory_allocated(self.device)
        else:
            now = self._rss()
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._peaks[token] = now
        return MemoryMark(token, now)

    def end(self, mark: MemoryMark) -> MemoryMeasure:
        """Stop measuring the node of ``mark``; its peak and what it kept."""
        with self._lock:
            sampled = self._peaks.pop(mark.token, mark.start_bytes)
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            now = torch.cuda.memory_allocated(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            now, peak = self._rss(), sampled
        return MemoryMeasure(kind=self.kind, peak_bytes=max(peak, now), delta_bytes=now - mark.start_bytes)

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if not self._peaks:
                    continue
            rss = self._rss()
            with self._lock:
                for token, peak in self._peaks.items():
                    if rss > peak:
                        self._peaks[token] = rss
