"""The call recorder: ``sys.setprofile`` with a filter on code objects.

Only calls of watched code objects (known loaders and mutators, ``@loader``
and ``@node`` entry points) reach the listener; every other event costs one
dict lookup in the profile function. Calls are matched with their returns by
frame, per thread, and only the *outermost* watched call is reported: a
``from_pretrained`` that calls other ``from_pretrained``s internally is one
call. Marked nodes are reported at any depth outside loaders (a loader inside a
node is still recorded).

Recorders share one profile function (:class:`_ProfileHub`): a recorder
entered inside another one's block adds its watched calls to the shared
function, so nested traces each see every call they watch, and leaving the
inner block restores the outer recorder alone. A profile function that was
already installed (another profiler written in Python) is called first for
every event and is back when the last recorder stops; one that cannot be
chained (a C profiler such as cProfile) makes recording refuse with
:class:`ProfilerConflict` instead of silently displacing it. Line tracers
(``sys.settrace``: debuggers, coverage) are untouched.

While a torch module runs its forward (the UNet inside a sampler loop), the
profile function is switched off for that thread and switched back on by a
forward hook on that module, registered with ``always_call=True`` (so also
when the forward raises) and removed when recording stops: model code never
loads models, and this keeps the overhead of a traced sampler loop small.
Inside a call that is an outermost loader call for every active recorder, a
lighter profile function only waits for that call's return (nothing nested in
a loader is recorded). A ``@loader`` or ``@node`` called from inside a
module's forward is therefore not seen. Both shortcuts are off while a
chained profiler runs, so it sees every event.
"""

from __future__ import annotations

import dis
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Mapping
from types import CodeType, FrameType, TracebackType
from typing import Any, Protocol

import torch
from diffsplit.tracer.errors import TracerError
from diffsplit.tracer.file_reads import note_read
from diffsplit.tracer.known_loaders import ResolvedFunction

_RETURN_OPCODES = frozenset(dis.opmap[name] for name in ("RETURN_VALUE", "RETURN_CONST") if name in dis.opmap)
_MODULE_CALL_CODE: CodeType = torch.nn.Module._wrapped_call_impl.__code__
ProfileFunction = Callable[[FrameType, str, Any], Any]


class ProfilerConflict(TracerError):
    """Another profiler that cannot be chained holds ``sys.setprofile``; recording refuses to displace it."""


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


class _PauseState(threading.local):
    def __init__(self) -> None:
        self.paused: torch.nn.Module | None = None


Entries = tuple[tuple["CallRecorder", ResolvedFunction], ...]
#: A native reader's code maps to the name of its file argument instead of entries (see ``file_reads``).
Watched = Entries | str
#: What the module-call code maps to: pause until that forward returns.
_PAUSE = "pause in this module's forward"
#: The codes of one name, each with what it maps to: the profile function's table is keyed by ``co_name``.
Candidates = tuple[tuple[CodeType, Any], ...]


def _by_name(pairs: Mapping[CodeType, Any]) -> dict[str, Candidates]:
    """``code → value`` regrouped by the code's name, for lookups that hash a (cached) string only.

    Neither ``id(code)`` nor the code object works as a key in a profile function: ``id`` raises the
    ``builtins.id`` audit event (a Python call per event once any audit hook is installed, as
    ``file_reads`` does) and hashing a code object hashes its constants (~0.4 µs).
    """
    table: dict[str, list[tuple[CodeType, Any]]] = {}
    for code, value in pairs.items():
        table.setdefault(code.co_name, []).append((code, value))
    return {name: tuple(codes) for name, codes in table.items()}


class _ProfileHub:
    """The profile function shared by the active recorders of this process."""

    def __init__(self, previous: Any, previous_threads: Any) -> None:
        self.previous = previous
        self.previous_threads = previous_threads
        self.chained: ProfileFunction | None = previous if callable(previous) else None
        self.recorders: list[CallRecorder] = []
        self._by_name: dict[str, Candidates] = {}
        self._readers: dict[str, Candidates] = {}
        #: the readers that are also watched codes (a state-dict loader such as safetensors' load_file)
        self._watched_readers: dict[CodeType, str] = {}
        self._pause = _PauseState()
        self._resume_hooks: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()
        self._call_event, self._return_event = _event_names()
        self.profile: ProfileFunction = self._make_profile()

    # --- membership -------------------------------------------------------------------------

    def add(self, recorder: CallRecorder) -> None:
        self.recorders.append(recorder)
        self._rebuild()

    def remove(self, recorder: CallRecorder) -> None:
        self.recorders.remove(recorder)
        self._rebuild()

    def _rebuild(self) -> None:
        watched: dict[CodeType, list[tuple[CallRecorder, ResolvedFunction]]] = {}
        readers: dict[CodeType, str] = {}
        for recorder in self.recorders:
            for code, function in recorder.watched.items():
                watched.setdefault(code, []).append((recorder, function))
            readers.update(recorder.readers)
        table: dict[CodeType, Any] = {code: name for code, name in readers.items() if code not in watched}
        table.update({code: tuple(entries) for code, entries in watched.items()})
        if self.shortcuts and self.recorders and all(r.pause_in_module_calls for r in self.recorders):
            table.setdefault(_MODULE_CALL_CODE, _PAUSE)
        # updated in place: threads running the current function see the change
        self._readers.clear()
        self._readers.update(_by_name(readers))
        self._watched_readers.clear()
        self._watched_readers.update({code: name for code, name in readers.items() if code in watched})
        self._by_name.clear()
        self._by_name.update(_by_name(table))
        self.profile = self._make_profile()
        sys.setprofile(self.profile)
        threading.setprofile(self.profile)

    def close(self) -> None:
        for handle in list(self._resume_hooks.values()):
            handle.remove()
        self._resume_hooks.clear()
        self._pause.paused = None
        if sys.getprofile() in (self.profile, None):
            sys.setprofile(self.previous)
        threading.setprofile(self.previous_threads)

    @property
    def shortcuts(self) -> bool:
        """Whether pausing in forwards and skipping the inside of loaders are allowed."""
        return self.chained is None

    # --- the profile function -----------------------------------------------------------------

    def _make_profile(self) -> ProfileFunction:
        lookup = self._by_name.get
        enter = self._enter
        leave = self._leave
        pause = self._pause_in
        call, ret = self._call_event, self._return_event
        chained = self.chained

        def profile(frame: FrameType, event: str, arg: Any) -> None:
            if event is call:
                code = frame.f_code
                candidates = lookup(code.co_name)
                if candidates is not None:
                    for watched, entries in candidates:
                        if watched is code:
                            if entries is _PAUSE:
                                pause(frame)
                            else:
                                enter(frame, entries)
                            return
            elif event is ret:
                code = frame.f_code
                candidates = lookup(code.co_name)
                if candidates is not None:
                    for watched, entries in candidates:
                        if watched is code:
                            if entries is not _PAUSE:
                                leave(frame, entries, arg)
                            return

        function: ProfileFunction = profile
        if chained is not None:
            other: ProfileFunction = chained

            def chained_profile(frame: FrameType, event: str, arg: Any) -> None:
                other(frame, event, arg)
                profile(frame, event, arg)

            function = chained_profile
        innermost = self.recorders[-1].listener if self.recorders else None
        function.diffsplit_listener = innermost  # type: ignore[attr-defined]  # read by active_listener()
        return function

    def _hand_back(self) -> None:
        """A thread still running a stale profile function after recording stopped gets its old one back."""
        sys.setprofile(self.previous_threads)

    def _enter(self, frame: FrameType, entries: Watched) -> None:
        if not self.recorders:
            self._hand_back()
            return
        if isinstance(entries, str):
            note_read(frame.f_locals.get(entries))
            return
        for recorder, function in entries:
            recorder.entered(frame, function)
        if self._watched_readers:
            reads = self._watched_readers.get(frame.f_code)  # a watched call: hashing its code is rare enough
            if reads is not None:
                note_read(frame.f_locals.get(reads))
        if self.shortcuts and all(recorder.inside_loader for recorder in self.recorders):
            sys.setprofile(self._await_return(frame, entries))

    def _leave(self, frame: FrameType, entries: Watched, value: Any) -> None:
        if isinstance(entries, str):
            return
        for recorder, _ in entries:
            recorder.left(frame, value)

    def _await_return(self, target: FrameType, entries: Entries) -> ProfileFunction:
        """A profile function for the inside of an outermost loader call: it waits for its return and
        reports the files native readers are handed (``file_reads``)."""
        call, ret = self._call_event, self._return_event
        reader = self._readers.get

        def inner(frame: FrameType, event: str, arg: Any) -> None:
            if event is call:
                code = frame.f_code
                candidates = reader(code.co_name)
                if candidates is not None:
                    for watched, name in candidates:
                        if watched is code:
                            note_read(frame.f_locals.get(name))
            elif frame is target and event is ret:
                sys.setprofile(self.profile if self.recorders else self.previous)
                self._leave(frame, entries, arg)

        return inner

    def _pause_in(self, frame: FrameType) -> None:
        if not self.recorders:
            self._hand_back()
            return
        module = frame.f_locals.get("self")
        if isinstance(module, torch.nn.Module) and self._pause.paused is None:
            if module not in self._resume_hooks:
                # Stays registered until recording stops: removing it from inside the hook would
                # break torch's iteration over the module's hooks when the forward raised.
                self._resume_hooks[module] = module.register_forward_hook(self._resume, always_call=True)
            self._pause.paused = module
            sys.setprofile(None)

    def _resume(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._pause.paused is module:
            self._pause.paused = None
            if self.recorders:
                sys.setprofile(self.profile)


_hub_lock = threading.Lock()
_hubs: list[_ProfileHub] = []  # at most one: the hub of the recorders active now


def _join(recorder: CallRecorder) -> _ProfileHub:
    with _hub_lock:
        if not _hubs:
            current = sys.getprofile()
            if current is not None and not callable(current):
                raise ProfilerConflict(
                    f"another profiler ({type(current).__name__}) is active on this thread and cannot be "
                    "shared; diffsplit's tracer needs sys.setprofile: stop that profiler before tracing"
                )
            _hubs.append(_ProfileHub(current, threading.getprofile()))
        hub = _hubs[0]
        hub.add(recorder)
        return hub


def _part(recorder: CallRecorder, hub: _ProfileHub) -> None:
    with _hub_lock:
        hub.remove(recorder)
        if not hub.recorders:
            hub.close()
            _hubs.clear()


class CallRecorder:
    """A context manager that reports watched calls to a listener while it is active.

    ``readers`` are native file readers whose file argument goes to ``file_reads.note_read`` when
    called (inside loader calls, where a read block collects).

    ``errors`` collects failures of the listener (they never reach the traced code).
    """

    def __init__(
        self,
        watched: Mapping[CodeType, ResolvedFunction],
        listener: CallListener,
        *,
        pause_in_module_calls: bool = True,
        readers: Mapping[CodeType, str] | None = None,
    ) -> None:
        self.watched: Mapping[CodeType, ResolvedFunction] = dict(watched)
        #: native file readers (code → name of the file argument), reported to ``file_reads``
        self.readers: Mapping[CodeType, str] = dict(readers or {})
        self.listener = listener
        self.pause_in_module_calls = pause_in_module_calls
        self._state = _ThreadState()
        self._hub: _ProfileHub | None = None
        self.errors: list[str] = []

    @property
    def active(self) -> bool:
        """Whether the recorder is installed."""
        return self._hub is not None

    @property
    def inside_loader(self) -> bool:
        """Whether this thread is inside an outermost loader call of this recorder."""
        return self._state.depth > 0

    def __enter__(self) -> CallRecorder:
        if self._hub is not None:
            raise RuntimeError("this recorder is already recording")
        self._hub = _join(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            _part(self, hub)
        self._state.stack.clear()
        self._state.depth = 0

    def entered(self, frame: FrameType, function: ResolvedFunction) -> None:
        """The hub saw a call of a code this recorder watches."""
        state = self._state
        counts = function.role == "call"
        token = None
        if state.depth == 0:
            try:
                token = self.listener.call_started(function, function.arguments(frame.f_locals))
            except Exception:
                self.errors.append(f"while recording {function.qualname}: {traceback.format_exc(limit=4)}")
        state.stack.append((frame, token, counts))
        if counts:
            state.depth += 1

    def left(self, frame: FrameType, value: Any) -> None:
        """The hub saw the return of a code this recorder watches."""
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
            self.listener.call_finished(token, value, raised)
        except Exception:
            self.errors.append(f"while recording a result: {traceback.format_exc(limit=4)}")


def active_listener() -> Any | None:
    """The listener (a trace's session) of the innermost recorder active on this thread, or None.

    Read from the interpreter's profile hook; inside a torch module forward or a
    loader call (where recording pauses) this is None.
    """
    return getattr(sys.getprofile(), "diffsplit_listener", None)
