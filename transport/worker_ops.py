"""The worker's ops as frozen dataclasses: one ``header()`` to send, one ``parse()`` where they arrive.

The client (``engine.offload``, ``engine.call_offload``), the byte predictor
(``profiles.sizes``) and the worker (``remote.worker``) build and read requests
and replies only through these types, so a field is named in one place. A
``parse`` takes what a peer sent and raises :class:`BadRequest` naming the field
that is wrong; it checks shapes and types only (what a field may *ask for* —
node classes, recipes, sizes against the worker's limits — is the worker's
to check). Wire values inside (node inputs, call arguments, outputs) stay in
their wire form (``engine.wire_values`` decodes them); a run's model files stay
raw for ``engine.run_files``.

Ops: ``run_node`` (:class:`RunNode` → :class:`NodeResult`), ``call``
(:class:`Call` → :class:`CallResult`), ``run_function`` (:class:`RunFunction`
→ :class:`CallResult`), ``upload`` (:class:`UploadChunk`), ``echo``
(:class:`Echo`); ``hello``, ``stats``, ``status`` and ``free`` carry no fields.
Errors are :mod:`diffsplit.transport.worker_errors`; ``cancel``, ``progress``
and heartbeats are the transport's (:mod:`diffsplit.transport.protocol`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffsplit.transport.compute_threads import HEADER_KEY as THREADS_FIELD
from diffsplit.transport.compute_threads import BadThreadCount, requested_threads
from diffsplit.transport.shown import shown
from diffsplit.transport.worker_errors import BadRequest

RESULT_OP = "result"
#: Ops that name no fields (their replies are ``result`` with what the op reports).
HELLO, STATS, STATUS, FREE = "hello", "stats", "status", "free"
#: A request's priority (higher is served first) and the range it may take (default 0).
PRIORITY_FIELD = "priority"
MIN_PRIORITY = -10
MAX_PRIORITY = 10
#: The longest node id a worker keeps (it is echoed in progress and messages).
MAX_NODE_ID_CHARS = 256
#: The field of a request's conditioning scale estimator settings, and of the reply's decisions.
CONDITIONS_FIELD = "conditions"
#: The most chains of condition decisions a client reads from one reply.
MAX_CONDITION_DECISIONS = 64
#: The field of a run's model files (``engine.run_files`` reads it).
FILES_FIELD = "files"


def parse_priority(header: Mapping[str, Any]) -> int:
    """The ``priority`` a request asks for (0 when it names none); BadRequest outside the range."""
    priority: object = header.get(PRIORITY_FIELD, 0)
    if (isinstance(priority, int) and not isinstance(priority, bool)
            and MIN_PRIORITY <= priority <= MAX_PRIORITY):
        return priority
    raise BadRequest(f"'{PRIORITY_FIELD}' must be an int in [{MIN_PRIORITY}, {MAX_PRIORITY}], "
                     f"not {shown(priority)}")


def parse_threads(header: Mapping[str, Any]) -> int | None:
    """The intra-op thread count a request asks for (None: it states none); BadRequest when malformed."""
    try:
        return requested_threads(header)
    except BadThreadCount as exc:
        raise BadRequest(str(exc)) from None


def _optional(name: str, value: Any) -> dict[str, Any]:
    return {} if value is None else {name: value}


@dataclass(frozen=True)
class RunNode:
    """Run one node: its class, its inputs as wire values, what to hold and what it uses held."""

    op: ClassVar[str] = "run_node"

    node_id: str
    class_type: str
    inputs: Mapping[str, Any]
    #: input name → content digest of its wire value: the client asks the worker to keep these
    hold: Mapping[str, str] = field(default_factory=dict)
    #: digests of values the worker holds that the inputs refer to (``$ds:held``)
    uses_held: tuple[str, ...] = ()
    #: model files the node reads while running, as ``engine.run_files`` writes them (None: none)
    files: Any = None
    deadline_s: float | None = None
    priority: int = 0
    threads: int | None = None
    #: the conditioning scale estimator's settings (``--conditions auto``; the worker checks them)
    conditions: Mapping[str, Any] | None = None

    def header(self) -> dict[str, Any]:
        """The request as a message header."""
        return {
            **_optional(CONDITIONS_FIELD, None if self.conditions is None else dict(self.conditions)),
            "op": self.op, "node": {"id": self.node_id, "class_type": self.class_type},
            "inputs": dict(self.inputs), "hold": dict(self.hold), "uses_held": list(self.uses_held),
            **_optional(THREADS_FIELD, self.threads), **_optional(FILES_FIELD, self.files),
            **_optional("deadline_s", self.deadline_s),
            **({PRIORITY_FIELD: self.priority} if self.priority else {}),
        }

    @classmethod
    def parse(cls, header: Mapping[str, Any]) -> RunNode:
        """The request a peer sent (BadRequest names a malformed field)."""
        node = header.get("node")
        if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
            raise BadRequest("run_node needs 'node': {'id': ..., 'class_type': ...}")
        inputs = header.get("inputs")
        if not isinstance(inputs, Mapping) or not all(isinstance(name, str) for name in inputs):
            raise BadRequest("run_node needs 'inputs' as a mapping of input names (str)")
        hold = header.get("hold")
        if hold is not None and not (isinstance(hold, Mapping | list)
                                     and all(isinstance(name, str) for name in hold)):
            raise BadRequest("run_node's 'hold' must map input names (str) to digests")
        uses = header.get("uses_held")
        if uses is not None and (not isinstance(uses, list) or not all(isinstance(d, str) for d in uses)):
            raise BadRequest("'uses_held' must be a list of digests (str)")
        deadline = header.get("deadline_s")
        if deadline is not None and (not isinstance(deadline, int | float) or isinstance(deadline, bool)
                                     or not math.isfinite(deadline) or deadline <= 0):
            raise BadRequest(f"'deadline_s' must be a number of seconds > 0, not {shown(deadline)}")
        conditions = header.get(CONDITIONS_FIELD)
        if conditions is not None and not isinstance(conditions, Mapping):
            raise BadRequest(f"'{CONDITIONS_FIELD}' must be a mapping of settings, not {shown(conditions)}")
        held_names = dict(hold) if isinstance(hold, Mapping) else dict.fromkeys(hold or (), "")
        return cls(
            node_id=str(node.get("id", "?"))[:MAX_NODE_ID_CHARS], class_type=node["class_type"],
            inputs=dict(inputs), hold={str(k): str(v) for k, v in held_names.items()},
            uses_held=tuple(uses or ()), files=header.get(FILES_FIELD),
            deadline_s=None if deadline is None else float(deadline),
            priority=parse_priority(header), threads=parse_threads(header),
            conditions=None if conditions is None else dict(conditions),
        )


@dataclass(frozen=True)
class Timings:
    """Where a request's time went on the worker, and its model cache hits and misses."""

    queue_s: float = 0.0
    rebuild_s: float = 0.0
    run_s: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0

    def to_dict(self) -> dict[str, Any]:
        """As the reply carries them."""
        return {"queue_s": self.queue_s, "rebuild_s": self.rebuild_s, "run_s": self.run_s,
                "cache_hits": self.cache_hits, "cache_misses": self.cache_misses}

    @classmethod
    def parse(cls, data: object) -> Timings:
        """From a reply (a field that is not a number reads as 0)."""
        found = data if isinstance(data, Mapping) else {}

        def number(name: str) -> float:
            value = found.get(name)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

        return cls(queue_s=number("queue_s"), rebuild_s=number("rebuild_s"), run_s=number("run_s"),
                   cache_hits=int(number("cache_hits")), cache_misses=int(number("cache_misses")))


@dataclass(frozen=True)
class NodeResult:
    """A node's outputs as wire values, the digests the worker now holds, its timings."""

    outputs: tuple[Any, ...]
    held: tuple[str, ...] = ()
    timings: Timings = Timings()
    #: the conditioning scale estimator's decisions as plain data (a request that asked for it)
    conditions: tuple[Any, ...] = ()

    def header(self) -> dict[str, Any]:
        """The reply as a message header."""
        return {"op": RESULT_OP, "outputs": list(self.outputs), "held": list(self.held),
                "timings": self.timings.to_dict(),
                **({CONDITIONS_FIELD: list(self.conditions)} if self.conditions else {})}

    @classmethod
    def parse(cls, reply: Mapping[str, Any], expected_outputs: int) -> NodeResult | None:
        """The result a worker sent, or None when it does not carry ``expected_outputs`` outputs."""
        outputs = reply.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != expected_outputs:
            return None
        held = reply.get("held")
        conditions = reply.get(CONDITIONS_FIELD)
        return cls(outputs=tuple(outputs),
                   held=tuple(str(d) for d in held) if isinstance(held, list) else (),
                   timings=Timings.parse(reply.get("timings")),
                   conditions=tuple(conditions[:MAX_CONDITION_DECISIONS]) if isinstance(conditions, list)
                   else ())


@dataclass(frozen=True)
class _Invocation:
    """What ``call`` and ``run_function`` share: the arguments as wire values, the thread count."""

    args: list[Any]
    kwargs: Mapping[str, Any]
    threads: int | None

    def _argument_fields(self) -> dict[str, Any]:
        return {"args": list(self.args), "kwargs": dict(self.kwargs),
                **_optional(THREADS_FIELD, self.threads)}

    @staticmethod
    def _parse_arguments(header: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any], int | None]:
        args, kwargs = header.get("args", []), header.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, Mapping):
            raise BadRequest("'args' must be a list and 'kwargs' a mapping")
        if not all(isinstance(name, str) for name in kwargs):
            raise BadRequest("'kwargs' must be keyed by argument names (str)")
        return args, dict(kwargs), parse_threads(header)


#: What op ``call`` may invoke on a rebuilt object: a module's forward, or a pipeline's __call__.
CALLABLE_METHODS = frozenset({"forward", "__call__"})


@dataclass(frozen=True)
class Call(_Invocation):
    """Call ``method`` of the object ``target`` (a recipe) rebuilds, with wire-value arguments."""

    op: ClassVar[str] = "call"

    target: Mapping[str, Any]
    method: str

    def header(self) -> dict[str, Any]:
        """The request as a message header."""
        return {"op": self.op, "target": dict(self.target), "method": self.method, **self._argument_fields()}

    @classmethod
    def parse(cls, header: Mapping[str, Any]) -> Call:
        """The request a peer sent (BadRequest names a malformed field)."""
        method, target = header.get("method"), header.get("target")
        if not isinstance(method, str) or method not in CALLABLE_METHODS or not isinstance(target, Mapping):
            raise BadRequest(f"call needs a 'target' recipe and a 'method' in {sorted(CALLABLE_METHODS)}")
        args, kwargs, threads = cls._parse_arguments(header)
        return cls(args=args, kwargs=kwargs, threads=threads, target=dict(target), method=method)


@dataclass(frozen=True)
class RunFunction(_Invocation):
    """Run a ``@node`` step's code (cloudpickled, as a uint8 tensor: its own frame) with these arguments."""

    op: ClassVar[str] = "run_function"

    code: torch.Tensor

    def header(self) -> dict[str, Any]:
        """The request as a message header."""
        return {"op": self.op, "function": self.code, **self._argument_fields()}

    @classmethod
    def parse(cls, header: Mapping[str, Any]) -> RunFunction:
        """The request a peer sent; the code is only checked to be bytes, never loaded here."""
        code = header.get("function")
        if not isinstance(code, torch.Tensor) or code.dtype != torch.uint8 or code.dim() != 1:
            raise BadRequest("run_function needs 'function' as pickled bytes")
        args, kwargs, threads = cls._parse_arguments(header)
        return cls(args=args, kwargs=kwargs, threads=threads, code=code)


@dataclass(frozen=True)
class CallResult:
    """What a ``call`` or ``run_function`` returned (a wire value) and the generators' states after it."""

    output: Any
    generator_states: tuple[torch.Tensor, ...] = ()
    timings: Timings = Timings()

    def header(self) -> dict[str, Any]:
        """The reply as a message header."""
        return {"op": RESULT_OP, "output": self.output, "generator_states": list(self.generator_states),
                "timings": self.timings.to_dict()}

    @classmethod
    def parse(cls, reply: Mapping[str, Any]) -> CallResult:
        """The result a worker sent (generator states that are not byte tensors are left out)."""
        states = reply.get("generator_states")
        kept = tuple(state for state in states if isinstance(state, torch.Tensor)
                     and state.dtype == torch.uint8) if isinstance(states, list) else ()
        return cls(output=reply.get("output"), generator_states=kept,
                   timings=Timings.parse(reply.get("timings")))


def _whole_number(header: Mapping[str, Any], name: str) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"upload: malformed header ('{name}' must be a whole number, not {shown(value)})")
    return value


@dataclass(frozen=True)
class UploadChunk:
    """One piece of a model file a worker lacks (the worker checks folder, name, size and hash)."""

    op: ClassVar[str] = "upload"

    folder: str
    name: str
    sha256: str
    total_bytes: int
    offset: int
    #: the chunk's bytes (as received: a view of the message's frame, not a copy)
    data: bytes | bytearray | memoryview
    final: bool
    #: a file named by content (``<sha256>.safetensors``) for the worker's content cache, not its store
    content: bool = False

    @property
    def target(self) -> str:
        """``folder/name``, as messages name it."""
        return f"{self.folder}/{self.name}"

    def header(self) -> dict[str, Any]:
        """The request as a message header; the data travels as a uint8 tensor, in its own frame."""
        data = self.data if isinstance(self.data, bytearray) else bytearray(self.data)  # writable: no copy
        chunk = torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        return {"op": self.op, "folder": self.folder, "name": self.name, "sha256": self.sha256,
                "total_bytes": self.total_bytes, "offset": self.offset, "data": chunk, "final": self.final,
                **({"content": True} if self.content else {})}

    @classmethod
    def parse(cls, header: Mapping[str, Any]) -> UploadChunk:
        """The chunk a peer sent (BadRequest names a malformed field)."""
        texts = {name: header.get(name) for name in ("folder", "name", "sha256")}
        for name, value in texts.items():
            if not isinstance(value, str):
                raise BadRequest(f"upload: malformed header ('{name}' must be text, not {shown(value)})")
        flags = {name: header.get(name, default) for name, default in (("final", None), ("content", False))}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise BadRequest(f"upload: malformed header ('{name}' must be true or false, "
                                 f"not {shown(value)})")
        return cls(folder=str(texts["folder"]), name=str(texts["name"]), sha256=str(texts["sha256"]).lower(),
                   total_bytes=_whole_number(header, "total_bytes"), offset=_whole_number(header, "offset"),
                   data=_chunk_bytes(header.get("data")), final=bool(flags["final"]),
                   content=bool(flags["content"]))


def _chunk_bytes(value: object) -> bytes | memoryview:
    """A chunk's bytes as sent: small ones inline, large ones a uint8 tensor in its own frame (not copied)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
        return memoryview(value.numpy().data)
    raise BadRequest(f"upload: malformed header ('data' must be bytes or a 1-D uint8 tensor, not "
                     f"{type(value).__name__})")


@dataclass(frozen=True)
class Echo:
    """The link probe: ``data`` goes up, ``reply_bytes`` zero bytes come back."""

    op: ClassVar[str] = "echo"

    reply_bytes: int = 0
    data: Any = b""

    def header(self) -> dict[str, Any]:
        """The request as a message header."""
        return {"op": self.op, "reply_bytes": self.reply_bytes, "data": self.data}

    @classmethod
    def parse(cls, header: Mapping[str, Any], max_reply_bytes: int) -> Echo:
        """The probe a peer sent; BadRequest unless ``reply_bytes`` is in [0, ``max_reply_bytes``]."""
        size = header.get("reply_bytes", 0)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= max_reply_bytes:
            raise BadRequest(f"echo: reply_bytes must be an int in [0, {max_reply_bytes}]")
        return cls(reply_bytes=size, data=None)


def simple_request(op: str) -> dict[str, Any]:
    """The header of an op with no fields (``hello``, ``stats``, ``status``, ``free``)."""
    if op not in (HELLO, STATS, STATUS, FREE):
        raise ValueError(f"{op!r} is not an op without fields")
    return {"op": op}
