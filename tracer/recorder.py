"""The call recorder: ``sys.setprofile`` with a filter on code objects.

Only calls of watched code objects (known loaders and mutators, ``@loader``
and ``@node`` entry points) reach the listener; every other event costs one
dict lookup in the profile function. Calls are matched with their returns by
frame, per thread, and only the *outermost* watched call is reported: a
``from_pretrained`` that calls other ``from_pretrained``s internally is one
call. Marked nodes are reported at any depth outside loaders (a loader inside a
node is still recorded).

While a torch module runs its forward (the UNet inside a sampler loop), the
profile function is switched off for that thread and switched back on by a
forward hook on that module, registered with ``always_call=True`` (so also
when the forward raises) and removed when recording stops: model code never
loads models, and this keeps the overhead of a traced sampler loop small.
Inside an outermost loader call, a lighter profile function only waits for
that call's return (nothing nested in a loader is recorded). A ``@loader`` or ``@node`` called from inside a
module's forward is therefore not seen.

The previous profile functions (this thread's and the one given to new
threads) are restored when recording stops, also when the traced code raised.
"""

from __future__ import annotations

import dis
import sys
import threading
import traceback
import weakref
from collections.abc import Mapping
from types import CodeType, FrameType, TracebackType
from typing import Any, Protocol

import torch
from diffsplit.tracer.known_loaders import ResolvedFunction

_RETURN_OPCODES = frozenset(dis.opmap[name] for name in ("RETURN_VALUE", "RETURN_CONST") if name in dis.opmap)
_MODULE_CALL_CODE: CodeType = torch.nn.Module._wrapped_call_impl.__code__


class CallListener(Protocol):
    """Receives the outermost watched calls."""

    def call_started(self, function: ResolvedFunction, arguments: dict[str, Any]) -> object | None:
        """A watched call began; returns a token for :meth:`call_finished` (None: not interested)."""
        ...

    def call_finished(self, token: object, result: Any, raised: bool) -> None:
        """The call of ``token`` returned ``result`` (``raised``: it raised instead)."""
        ...


def _event_names() -> tuple[str, str]:
    """The exact string objects the interpreter passes as the "call" and "return" events.

    Comparing events by identity is several times cheaper than ``==`` inside a
    profile function; the objects are captured from a real event so this holds
    on any interpreter.
    """
    seen: dict[str, str] = {}

    def capture(frame: FrameType, event: str, arg: Any) -> None:
        seen.setdefault(event, event)

    def probe() -> None:
        return None

    previous = sys.getprofile()
    sys.setprofile(capture)
    try:
        probe()
    finally:
        sys.setprofile(previous)
    return seen.get("call", "call"), seen.get("return", "return")


def _raised(frame: FrameType) -> bool:
    """Whether a frame at its 'return' event is unwinding an exception (not at a return opcode)."""
    code = frame.f_code.co_code
    return frame.f_lasti < 0 or code[frame.f_lasti] not in _RETURN_OPCODES


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.stack: list[tuple[FrameType, object | None, bool]] = []
        self.depth = 0
        self.paused: torch.nn.Module | None = None


class CallRecorder:
    """A context manager that reports watched calls to a listener while it is active.

    ``errors`` collects failures of the listener (they never reach the traced code).
    """

    def __init__(
        self,
        watched: Mapping[CodeType, ResolvedFunction],
        listener: CallListener,
        *,
        pause_in_module_calls: bool = True,
    ) -> None:
        self._watched = dict(watched)
        self._listener = listener
        self._pause_in_module_calls = pause_in_module_calls
        self._state = _ThreadState()
        self._active = False
        self._previous: tuple[Any, Any] | None = None
        self._resume_hooks: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()
        self._call_event, self._return_event = _event_names()
        self._profile = self._make_profile()
        self._profile.diffsplit_listener = listener  # lets active_listener() find the trace from the hook
        self.errors: list[str] = []

    @property
    def active(self) -> bool:
        """Whether the recorder is installed."""
        return self._active

    def _make_profile(self) -> Any:
        # Keyed by id: hashing a code object costs ~0.4 µs, far more than the rest of this function.
        by_id = {id(code): function for code, function in self._watched.items()}
        lookup = by_id.get
        enter = self._enter
        leave = self._leave
        pause = self._pause
        module_call = id(_MODULE_CALL_CODE) if self._pause_in_module_calls else None

        call, ret = self._call_event, self._return_event

        def profile(frame: FrameType, event: str, arg: Any) -> None:
            if event is call:
                key = id(frame.f_code)
                function = lookup(key)
                if function is not None:
                    enter(frame, function)
                elif key == module_call:
                    pause(frame)
            elif event is ret and id(frame.f_code) in by_id:
                leave(frame, arg)

        return profile

    def __enter__(self) -> CallRecorder:
        if self._active:
            raise RuntimeError("this recorder is already recording")
        self._previous = (sys.getprofile(), threading.getprofile())
        try:
            self._active = True
            threading.setprofile(self._profile)
            sys.setprofile(self._profile)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        self._active = False
        previous, previous_threads = self._previous or (None, None)
        if sys.getprofile() in (self._profile, None):  # a recorder entered later and still active stays
            sys.setprofile(previous)
        threading.setprofile(previous_threads)
        for handle in list(self._resume_hooks.values()):
            handle.remove()
        self._resume_hooks.clear()
        self._state.stack.clear()
        self._state.depth = 0
        self._state.paused = None

    def _pause(self, frame: FrameType) -> None:
        if not self._active:  # a thread started while recording: hand it back its old profile
            sys.setprofile(self._previous[1] if self._previous else None)
            return
        module = frame.f_locals.get("self")
        if isinstance(module, torch.nn.Module) and self._state.paused is None:
            if module not in self._resume_hooks:
                # Stays registered until recording stops: removing it from inside the hook would
                # break torch's iteration over the module's hooks when the forward raised.
                self._resume_hooks[module] = module.register_forward_hook(self._resume, always_call=True)
            self._state.paused = module
            sys.setprofile(None)

    def _resume(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        state = self._state
        if state.paused is module:
            state.paused = None
            if self._active:
                sys.setprofile(self._profile)

    def _enter(self, frame: FrameType, function: ResolvedFunction) -> None:
        if not self._active:  # a thread started while recording: hand it back its old profile
            sys.setprofile(self._previous[1] if self._previous else None)
            return
        state = self._state
        counts = function.role == "call"
        token = None
        if state.depth == 0:
            try:
                token = self._listener.call_started(function, function.arguments(frame.f_locals))
            except Exception:
                self.errors.append(f"while recording {function.qualname}: {traceback.format_exc(limit=4)}")
        state.stack.append((frame, token, counts))
        if counts:
            state.depth += 1
            if state.depth == 1:
                sys.setprofile(self._await_return(frame))

    def _await_return(self, target: FrameType) -> Any:
        """A profile function for the inside of an outermost loader call: it only waits for its return.

        Nothing nested in a loader is recorded, so this skips the lookup on every event.
        """
        ret = self._return_event

        def inner(frame: FrameType, event: str, arg: Any) -> None:
            if frame is target and event is ret:
                sys.setprofile(self._profile if self._active else None)
                self._leave(frame, arg)

        return inner

    def _leave(self, frame: FrameType, value: Any) -> None:
        stack = self._state.stack
        if not any(entry[0] is frame for entry in reversed(stack)):
            return  # entered before recording started
        while stack:
            entered, token, counts = stack.pop()
            if counts:
                self._state.depth -= 1
            if entered is frame:
                if token is not None:
                    self._finish(token, value, _raised(frame))
                return
            if token is not None:
                self._finish(token, None, True)

    def _finish(self, token: object, value: Any, raised: bool) -> None:
        try:
            self._listener.call_finished(token, value, raised)
        except Exception:
            self.errors.append(f"while recording a result: {traceback.format_exc(limit=4)}")


def active_listener() -> Any | None:
    """The listener (a trace's session) of the recorder active on this thread, or None.

    Read from the interpreter's profile hook, so no global state is kept; inside a
    torch module forward (where recording pauses) this is None.
    """
    return getattr(sys.getprofile(), "diffsplit_listener", None)
