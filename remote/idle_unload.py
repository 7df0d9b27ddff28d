"""A background check that drops models no job has used for a while (``--idle-unload-s``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from diffsplit.remote.cache import CachedModel, ModelCache, release_memory

log = logging.getLogger(__name__)

#: The longest pause between two checks, whatever the idle time.
MAX_CHECK_INTERVAL_S = 5.0
#: The shortest pause between two checks.
MIN_CHECK_INTERVAL_S = 0.05


class IdleUnloader:
    """Every ``check_interval_s`` drops the cache entries unused for more than ``idle_s`` seconds.

    Entries a running job uses are never dropped. ``on_unload`` hears each batch dropped.
    ``start`` once, ``stop`` when the worker stops (joins the thread; idempotent).
    """

    def __init__(
        self,
        cache: ModelCache,
        idle_s: float,
        *,
        on_unload: Callable[[list[CachedModel]], None] | None = None,
    ) -> None:
        if not idle_s > 0:
            raise ValueError(f"the idle time before unloading must be > 0 s, not {idle_s}")
        self.cache = cache
        self.idle_s = idle_s
        self.check_interval_s = min(MAX_CHECK_INTERVAL_S, max(MIN_CHECK_INTERVAL_S, idle_s / 4))
        self._on_unload = on_unload
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="diffsplit-idle-unload", daemon=True)

    def start(self) -> None:
        """Start the background check."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the check and wait for its thread (at most ``timeout_s``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def check(self) -> list[CachedModel]:
        """One check now: drop what sat idle too long; returns what was dropped."""
        dropped = self.cache.drop_idle(self.idle_s)
        if dropped:
            if self._on_unload is not None:
                self._on_unload(dropped)
            release_memory()
        return dropped

    def _loop(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            try:
                self.check()
            except Exception:  # a failed check must not end the checks: log it and go on
                log.exception("the idle-unload check failed")
