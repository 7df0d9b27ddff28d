"""Terminal progress for workflow runs: one line per node, a bar for samplers."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import TextIO

BAR_WIDTH = 24


@dataclass
class ProgressPrinter:
    """Prints node lines and a step bar; safe to call from executor threads.

    On a terminal the bar redraws in place; elsewhere (logs, CI) it prints a
    line at the first and last step only, so logs stay short.
    """

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _bar_open: bool = field(default=False, repr=False)

    @property
    def _is_tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def node_done(self, node_id: str, class_type: str, seconds: float, *, where: str = "local",
                  cached: bool = False) -> None:
        """One line per finished node."""
        if self.quiet:
            return
        how = "cached" if cached else f"{seconds:7.3f}s"
        with self._lock:
            self._close_bar()
            self.stream.write(f"  node {node_id:>4} {class_type:<28} {where:<8} {how}\n")
            self.stream.flush()

    def step(self, node_id: str, step: int, total: int) -> None:
        """A sampler step: draws the bar."""
        if self.quiet or total <= 0:
            return
        filled = int(BAR_WIDTH * step / total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        text = f"  node {node_id:>4} [{bar}] {step}/{total}"
        with self._lock:
            if self._is_tty:
                self.stream.write("\r" + text)
                self._bar_open = step < total
                if not self._bar_open:
                    self.stream.write("\n")
            elif step in (1, total):
                self.stream.write(text + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A free-form line (start, summary)."""
        if self.quiet:
            return
        with self._lock:
            self._close_bar()
            self.stream.write(text + "\n")
            self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
