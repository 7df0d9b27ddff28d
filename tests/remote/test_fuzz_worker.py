"""Fuzzing a real in-process worker on loopback over a raw ZeroMQ DEALER socket.

Three kinds of case: random multipart bytes; envelopes with random tensor
tables; well-formed envelopes (``transport.envelope.encode``) with random
headers for every op the worker has, and unknown ones, with random nested
values (tensors, tuples, wire markers). After every case the worker must
answer ``hello``; a request that needs a reply must get one (its own or, when
it could not be read, an error); nothing may reach the guards that catch bugs
(those log "failed" with a traceback from the transport or the dispatcher).

``DIFFSPLIT_FUZZ_EXAMPLES`` sets the total number of cases (default 3000,
shared by the three tests; ``make fuzz`` runs 100,000). Each test prints the
worker's RSS after a warm-up and at its end.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import threading
import types
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.wire_values import MARKERS
from diffsplit.remote.worker import Worker, WorkerConfig
from diffsplit.transport.envelope import MAGIC, VERSION, decode, encode
from diffsplit.transport.errors import TransportError
from diffsplit.transport.tensors import ITEMSIZE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

TOTAL_EXAMPLES = int(os.environ.get("DIFFSPLIT_FUZZ_EXAMPLES", "3000"))
#: Each test's share of the cases.
SHARES = {"frames": 0.2, "tables": 0.2, "ops": 0.6}
LONG_RUN = TOTAL_EXAMPLES > 10_000
#: Cases per hypothesis run (see ``fuzz``).
ROUND = 1000
#: How long the worker gets to answer after a case (generous: never a timing assertion).
REPLY_WAIT_S = 10.0
#: The most the worker's RSS may grow over a long run after warm-up.
MAX_RSS_GROWTH = 256 << 20
#: Log messages of the guards that catch bugs: none of them may fire.
BUG_GUARDS = ("decoding a message from a client failed", "handling a message from a client failed",
              "could not send an error reply", "handling a received message failed", "dispatching request",
              "the worker cannot go on", "died")


def share_of(share: str) -> int:
    """How many cases one test runs."""
    return max(1, int(TOTAL_EXAMPLES * SHARES[share]))


def fuzz_settings(examples: int, *, derandomize: bool) -> settings:
    """The fuzz profile: no example database (nothing written into the repo), no per-example deadline
    (the reply wait bounds each case), deterministic in the ordinary suite, exploring in long runs."""
    return settings(
        max_examples=examples, deadline=None, database=None, derandomize=derandomize, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def fuzz(target: FuzzTarget, share: str, cases: st.SearchStrategy[Any], body: Callable[[Any], None]) -> None:
    """Run ``body`` on ``share``'s number of cases, in hypothesis runs of at most ROUND cases.

    Hypothesis keeps a record of every case of a run, so one run of 100,000 cases
    would grow this process by over a GiB: in rounds, only the worker's memory is
    left to grow, which is what the RSS report is about.
    """
    total = share_of(share)
    target.start(total)
    done = 0
    while done < total:
        count = min(ROUND, total - done)

        def one_round(case: Any) -> None:  # a fresh function each round: settings apply once per function
            body(case)

        given(cases)(fuzz_settings(count, derandomize=total <= ROUND)(one_round))()
        done += count
    report(target, share)


def _module_constants() -> set[int]:
    """Ids of tensors that modules hold as constants (two containers deep): lazy imports, not leaks."""
    found: set[int] = set()
    pending: list[tuple[Any, int]] = [(vars(module), 0) for module in list(sys.modules.values())
                                      if issubclass(type(module), types.ModuleType)]
    while pending:  # type() only: isinstance() would wake lazy proxies (transformers' modules)
        value, depth = pending.pop()
        if issubclass(type(value), torch.Tensor):
            found.add(id(value))
        elif depth <= 2 and type(value) in (dict, list, tuple):
            items = value.values() if isinstance(value, dict) else value
            pending.extend((item, depth + 1) for item in items)
    return found


def live_tensors() -> int:
    """Tensors alive in this process but for modules' constants: a case's tensors kept alive show here."""
    gc.collect()
    constants = _module_constants()
    return sum(1 for obj in gc.get_objects()
               if issubclass(type(obj), torch.Tensor) and id(obj) not in constants)


def rss_bytes() -> int:
    """This process's resident set (the worker runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# Strategies -----------------------------------------------------------------

_TORCH_DTYPES = sorted(ITEMSIZE)
_FIELDS = ["shape", "dtype", "v", "steps", "op", "cls", "args", "kwargs", "select", "files", "sha256", "name",
           "folder", "digest", "seed", "state", "device", "value", "type", "class_type", "id", "index",
           "width", "height", "batch_size", "fingerprint", "file", "bytes"]
_KEYS = st.one_of(st.text(max_size=8), st.sampled_from([*sorted(MARKERS), *_FIELDS]))
_INTS = st.one_of(st.integers(-3, 300), st.integers(-(2**63), 2**64 - 1),
                  st.sampled_from([2**31, 2**32, 2**63 - 1, 4096, 65536]))


# Strategies made once, at import (hypothesis keeps what it makes: none is built per case).
_TENSOR_DTYPE, _TENSOR_KIND = st.sampled_from(_TORCH_DTYPES), st.sampled_from(["torch", "numpy", "scalar"])
_TENSOR_SHAPE, _BIT = st.lists(st.integers(0, 4), max_size=4), st.integers(0, 1)


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    dtype = draw(_TENSOR_DTYPE)
    shape = tuple(draw(_TENSOR_SHAPE))
    kind = draw(_TENSOR_KIND)
    t = torch.zeros(shape, dtype=getattr(torch, dtype)).fill_(draw(_BIT))
    if kind == "torch" or dtype == "bfloat16":
        return t
    array = t.numpy()
    return array.reshape(-1)[0] if kind == "scalar" and array.size else array


SCALARS = st.one_of(st.none(), st.booleans(), _INTS, st.floats(), st.text(max_size=16),
                    st.binary(max_size=16))
VALUES = st.recursive(
    st.one_of(SCALARS, tensors()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4),
                            st.tuples(inner, inner)),
    max_leaves=12,
)
PLAIN = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                     max_leaves=6)
MARKED = st.builds(lambda key, value: {key: value}, st.sampled_from(sorted(MARKERS)), VALUES)

_RECIPE_STEPS = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(["diffusers.from_config", "diffusers.from_pretrained",
                                      "diffusers.load_lora_weights"]), st.text(max_size=12)),
     "cls": st.one_of(st.sampled_from(["DDIMScheduler", "EulerDiscreteScheduler"]), st.text(max_size=12))},
    optional={"args": st.lists(VALUES, max_size=2), "kwargs": st.dictionaries(_KEYS, VALUES, max_size=2),
              "file": VALUES},
)
RECIPES = st.one_of(
    VALUES,
    st.fixed_dictionaries({"v": st.one_of(st.just(1), VALUES), "steps": st.lists(_RECIPE_STEPS, max_size=3)},
                          optional={"select": st.one_of(st.text(max_size=12), VALUES),
                                    "fingerprint": VALUES}),
)
_REGISTRY = default_registry()
_NODE_CLASSES = sorted(_REGISTRY)


def _float_tensor(*dims: st.SearchStrategy[int]) -> st.SearchStrategy[torch.Tensor]:
    return st.tuples(*dims, st.floats(-2, 2, width=32)).map(lambda s: torch.full(s[:-1], s[-1]))


_SMALL = st.integers(1, 12)
_IMAGE = _float_tensor(st.integers(1, 2), _SMALL, _SMALL, st.sampled_from([1, 3, 4]))
_LATENT = st.fixed_dictionaries({"samples": _float_tensor(st.integers(1, 2), st.sampled_from([4, 16]), _SMALL,
                                                          _SMALL)},
                                optional={"noise_mask": _float_tensor(st.just(1), st.just(1), _SMALL, _SMALL),
                                          "batch_index": st.lists(st.integers(-1, 3), max_size=2)})
_CONDITIONING = st.lists(st.tuples(_float_tensor(st.just(1), st.integers(1, 77), st.sampled_from([8, 768])),
                                   st.dictionaries(st.sampled_from(["pooled_output", "strength", "area",
                                                                    "mask", "control", "width"]),
                                                   st.one_of(VALUES, _float_tensor(st.just(1), _SMALL)),
                                                   max_size=3)).map(list), max_size=2)
_BY_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "STRING": st.text(max_size=24), "BOOLEAN": st.booleans(), "IMAGE": _IMAGE,
    "MASK": _float_tensor(st.integers(1, 2), _SMALL, _SMALL), "LATENT": _LATENT,
    "CONDITIONING": _CONDITIONING,
    "SIGMAS": _float_tensor(st.integers(0, 12)),
}


def _input_value(spec: Any) -> st.SearchStrategy[Any]:
    """A value for one declared input: of its type nearly always, within its bounds mostly."""
    if spec.type == "INT":
        low = -(2**31) if spec.min is None else max(int(spec.min), -(2**31))
        high = 2**31 if spec.max is None else min(int(spec.max), 2**31)
        good: st.SearchStrategy[Any] = st.one_of(st.integers(low, min(high, low + 64)),
                                                 st.integers(low, high))
    elif spec.type == "FLOAT":
        good = st.floats(spec.min, spec.max, allow_nan=False) if spec.min is not None else st.floats()
    elif spec.type == "COMBO":
        good = st.sampled_from(spec.choices) if spec.choices else st.text(max_size=12)
    else:
        good = _BY_TYPE.get(spec.type, MARKED)
    return mostly(good, st.one_of(MARKED, VALUES))


@functools.cache
def node_inputs(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Inputs for node class ``name`` by its declared names and types (each mostly present)."""
    return st.fixed_dictionaries({spec.name: _input_value(spec) for spec in _REGISTRY[name].inputs})


_ONE_IN_TEN = st.sampled_from([False] * 9 + [True])  # True last: the simplest (oft drawn) is False


def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any] = VALUES) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, else ``other``."""
    return _ONE_IN_TEN.flatmap(lambda rare: other if rare else good)


def op_fields(op: str) -> st.SearchStrategy[dict[str, Any]]:
    """Random fields for one op (one strategy per op, made once: hypothesis keeps what it makes)."""
    return _op_fields(op if op in _FIELDS_OF_OPS else "")


_FIELDS_OF_OPS = frozenset({"echo", "run_node", "call", "run_function", "upload"})


@functools.cache
def _op_fields(op: str) -> st.SearchStrategy[dict[str, Any]]:
    """Random fields for one op, near what the worker reads (and sometimes anything at all)."""
    inputs = st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(_FIELDS)),
                             st.one_of(VALUES, MARKED), max_size=5)
    by_op: dict[str, dict[str, st.SearchStrategy[Any]]] = {
        "echo": {"reply_bytes": mostly(st.integers(-2, 1 << 20))},
        "run_node": {
            "node": mostly(st.fixed_dictionaries(
                {"id": mostly(st.text(max_size=6)),
                 "class_type": mostly(st.sampled_from(_NODE_CLASSES), st.text(max_size=12))})),
            "inputs": mostly(inputs),
        },
        "call": {"target": RECIPES, "method": mostly(st.sampled_from(["forward", "__call__"])),
                 "args": mostly(st.lists(VALUES, max_size=3)),
                 "kwargs": mostly(st.dictionaries(_KEYS, VALUES, max_size=3))},
        "run_function": {"function": st.one_of(tensors(), VALUES)},
        "upload": {
            "folder": mostly(st.sampled_from(["checkpoints", "loras", "vae", "..", ""])),
            "name": mostly(st.sampled_from(["a.safetensors", "../x.safetensors", "a/b.safetensors", "."]),
                           st.text(max_size=12)),
            "sha256": mostly(st.text("0123456789abcdef", min_size=64, max_size=64)),
            "total_bytes": mostly(st.integers(-1, 1 << 16)),
            "offset": mostly(st.integers(-1, 1 << 16)),
            "data": mostly(st.binary(min_size=1, max_size=64).map(
                lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)), st.one_of(st.binary(), VALUES)),
            "final": mostly(st.booleans()),
        },
    }
    optional: dict[str, dict[str, st.SearchStrategy[Any]]] = {
        "run_node": {"uses_held": mostly(st.lists(st.text(max_size=64), max_size=3)),
                     "hold": mostly(st.lists(st.text(max_size=8), max_size=3)),
                     "files": VALUES, "deadline_s": mostly(st.floats())},
    }
    extra = {"extra": VALUES, "threads": mostly(st.integers(-1, 300))}
    return st.fixed_dictionaries(
        {key: mostly(value, st.just(_ABSENT)) for key, value in by_op.get(op, {}).items()},
        optional={**optional.get(op, {}), **extra},
    ).map(lambda fields: {key: value for key, value in fields.items() if value is not _ABSENT})


_ABSENT = object()
OPS = ["hello", "echo", "stats", "status", "free", "run_node", "call", "run_function", "upload", "cancel",
       "heartbeat", "progress", "error", "result"]


_OPS = mostly(st.sampled_from(OPS), st.text(max_size=10))


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """A header, and whether the request id is fresh (then a reply must come)."""
    op = draw(_OPS)
    header = {"op": op, **draw(op_fields(op))}
    node = header.get("node")
    class_type = node.get("class_type") if isinstance(node, dict) else None
    if op == "run_node" and isinstance(class_type, str) and class_type in _REGISTRY and not draw(_ONE_IN_TEN):
        header["inputs"] = draw(node_inputs(class_type))
    fresh = not draw(_ONE_IN_TEN)
    header["request_id"] = f"fuzz-{uuid.uuid4().hex}" if fresh else draw(VALUES)
    if draw(_ONE_IN_TEN):  # the op itself may be anything too
        header["op"] = draw(VALUES)
    return header, fresh


_DESCRIPTOR_DIMS = st.one_of(st.integers(0, 3), st.sampled_from([2**31, 2**63, 2**64 - 1]),
                             st.integers(-2, 9))


_TABLE_LENGTH, _FILL = st.integers(0, 3), st.sampled_from([0, 1, 7])
_KIND = st.one_of(st.sampled_from([0, 1, 2]), PLAIN)
_DTYPE = st.one_of(st.sampled_from(_TORCH_DTYPES), PLAIN)
_SHAPE = st.one_of(st.lists(_DESCRIPTOR_DIMS, max_size=3), PLAIN)


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[Any], list[bytes]]:
    """A tensor table, mostly well-formed, and the frames it may point at."""
    table, frames = [], []
    for _ in range(draw(_TABLE_LENGTH)):
        kind, dtype, shape = draw(_KIND), draw(_DTYPE), draw(_SHAPE)
        size = ITEMSIZE.get(dtype, 1) if isinstance(dtype, str) else 1
        for d in shape if isinstance(shape, list) else []:
            size *= d if isinstance(d, int) else 1
        data = bytes([draw(_FILL)]) * size if 0 <= size <= 256 else b"\x00"
        if draw(st.booleans()):
            frames.append(data)
            loc: Any = len(frames) - 1 if not draw(_ONE_IN_TEN) else draw(_INTS)
        else:
            loc = data if not draw(_ONE_IN_TEN) else draw(PLAIN)
        table.append([kind, dtype, shape, loc])
    return table, frames


def ref(index: int) -> msgpack.ExtType:
    return msgpack.ExtType(2, index.to_bytes(4, "big"))


# The worker under fuzz --------------------------------------------------------


class LogCounter(logging.Filter):
    """A filter on every diffsplit logger: counts each record by message template, keeps the first
    text of each (tracebacks included), and drops it, so that no log handler (pytest's included)
    holds a long run's records in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.formatter = logging.Formatter()
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}
        self.tracebacks: dict[str, str] = {}  # one per (message, innermost frames)

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.levelname} {record.name}: {record.msg}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if key not in self.first:
            self.first[key] = self.formatter.format(record)[-4000:]
        if record.exc_info and len(self.tracebacks) < 40:
            text = self.formatter.format(record)
            where = [line for line in text.splitlines() if line.lstrip().startswith("File ")]
            self.tracebacks.setdefault(f"{key} {where[-3:]}", text)
        return False

    def bugs(self) -> list[str]:
        return [self.first[key] for key in self.counts if any(guard in key for guard in BUG_GUARDS)]


@dataclass
class FuzzTarget:
    worker: Worker
    sock: zmq.Socket[Any]
    cases: int = 0
    rss_before: int = 0
    tensors_before: int = 0
    warmup: int = 0
    #: what the cases' replies were: (op, error kind or type) -> count
    outcomes: Counter[str] = field(default_factory=Counter)
    samples: dict[str, set[str]] = field(default_factory=dict)  # a few error messages of each outcome

    def start(self, examples: int) -> None:
        self.cases, self.warmup = 0, min(max(1, examples // 10), ROUND)
        self.rss_before, self.tensors_before = rss_bytes(), live_tensors()

    def send(self, parts: list[Any], expected_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Send one case, then wait for hello's reply (and the case's own, when it needs one).

        Returns the replies that came, by request id.
        """
        self.cases += 1
        if self.cases == self.warmup:
            self.rss_before, self.tensors_before = rss_bytes(), live_tensors()
        self.sock.send_multipart(parts, copy=True)
        hello = f"alive-{uuid.uuid4().hex}"
        self.sock.send_multipart(encode({"op": "hello", "request_id": hello}))
        waiting = {hello} | ({expected_id} if expected_id else set())
        replies: dict[str, dict[str, Any]] = {}
        while waiting:
            if not self.sock.poll(int(REPLY_WAIT_S * 1000)):
                raise AssertionError(f"no reply for {sorted(waiting)} within {REPLY_WAIT_S} s after the case")
            reply = decode(self.sock.recv_multipart())
            request_id = reply.get("request_id")
            if request_id is None and reply.get("op") == "error":
                waiting.discard(expected_id)  # the case could not be read: this error is its reply
            elif isinstance(request_id, str):
                waiting.discard(request_id)
                replies[request_id] = reply
            if request_id != hello and reply.get("op") != "heartbeat":
                outcome = _outcome(reply)
                self.outcomes[outcome] += 1
                seen = self.samples.setdefault(outcome, set())
                if len(seen) < 12 and isinstance(reply.get("error"), dict):
                    seen.add(str(reply["error"].get("message"))[:100])
        assert replies[hello]["op"] == "result", replies[hello]
        return replies


def _outcome(reply: dict[str, Any]) -> str:
    error = reply.get("error")
    if reply.get("op") == "error" and isinstance(error, dict):
        kind = error.get("kind") or f"transport {error.get('type')}"
        return f"error {kind}"
    return str(reply.get("op"))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    models = tmp_path_factory.mktemp("fuzz-models")
    for folder in ("checkpoints", "loras", "vae"):
        (models / folder).mkdir()
    daemon = Worker(WorkerConfig(models=models, listen="tcp://127.0.0.1:*", grace_s=1.0, allow_upload=True,
                                 insecure=True, max_upload_bytes=1 << 20))
    thread = threading.Thread(target=daemon.serve, name="diffsplit-test-fuzz-serve")
    thread.start()
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(daemon.endpoint)
    handler = LogCounter()
    top = logging.getLogger("diffsplit")
    loggers = [top, *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                      if name.startswith("diffsplit."))]  # a filter sees only its own logger's records
    saved_level = top.level
    top.setLevel(logging.WARNING)
    for logger in loggers:
        logger.addFilter(handler)
    try:
        yield FuzzTarget(daemon, sock)
    finally:
        for logger in loggers:
            logger.removeFilter(handler)
        top.setLevel(saved_level)
        sock.close(linger=0)
        context.term()
        daemon.stop()
        thread.join(60)
    summary = "\n".join(f"{n:7d}  {key}" for key, n in sorted(handler.counts.items(), key=lambda kv: -kv[1]))
    print(f"\nworker log records during the fuzz:\n{summary}")
    if os.environ.get("DIFFSPLIT_FUZZ_SAMPLES"):
        for text in handler.tracebacks.values():
            print(text[-1500:])
    bugs = handler.bugs()
    assert not bugs, "the fuzz reached a guard that catches bugs:\n" + "\n\n".join(bugs)


def report(target: FuzzTarget, name: str) -> None:
    after, tensors = rss_bytes(), live_tensors()
    print(f"\nreplies so far: {dict(target.outcomes.most_common())}")
    if os.environ.get("DIFFSPLIT_FUZZ_SAMPLES"):
        for outcome, messages in target.samples.items():
            print(f"  {outcome}:\n    " + "\n    ".join(sorted(messages)))
    held = getattr(target.worker.held, "_values", {})  # kept on purpose, up to the --held budget
    held_bytes = sum(size for _, size in held.values())
    print(f"\nfuzz {name}: {target.cases} cases; worker RSS {target.rss_before / 2**20:.0f} MiB after "
          f"{target.warmup} cases of warm-up, {after / 2**20:.0f} MiB at the end; it holds {len(held)} "
          f"conditioning values ({held_bytes / 2**20:.0f} MiB of its {target.worker.held.budget_bytes >> 20} "
          f"MiB budget) and caches {target.worker.cache.stats().entries} models; live tensors "
          f"{target.tensors_before} after warm-up, {tensors} at the end")
    assert tensors <= target.tensors_before + len(held) + 16, "tensors built for the cases stay alive"
    if LONG_RUN:
        grown = after - target.rss_before - held_bytes
        assert grown < MAX_RSS_GROWTH, "the worker's memory grew during the fuzz"


# The tests --------------------------------------------------------------------

_FRAME = st.one_of(st.binary(max_size=48), st.sampled_from([MAGIC, VERSION, b"", b"\x90\x80", b"\xc1"]))
_HEADER_BYTES = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda a, b: msgpack.packb(a) + msgpack.packb(b),
              st.lists(st.lists(SCALARS, max_size=4), max_size=2),
              st.dictionaries(st.text(max_size=6), SCALARS, max_size=4)),
    st.builds(lambda code, data: msgpack.packb([]) + msgpack.packb({"op": msgpack.ExtType(code, data)}),
              st.integers(0, 127), st.binary(max_size=8)),
)


_RAW_PARTS = st.one_of(
    st.lists(_FRAME, min_size=1, max_size=5),
    st.builds(lambda header, frames: [MAGIC, VERSION, header, *frames], _HEADER_BYTES,
              st.lists(_FRAME, max_size=3)),
)


def test_random_frames(target: FuzzTarget) -> None:
    def case(parts: list[bytes]) -> None:
        target.send(parts)

    fuzz(target, "frames", _RAW_PARTS, case)


def _needs_reply(header: dict[str, Any]) -> bool:
    op = header.get("op")
    return isinstance(op, str) and op not in ("heartbeat", "cancel")


def test_random_tensor_tables(target: FuzzTarget) -> None:
    def case(drawn: tuple[tuple[list[Any], list[bytes]], tuple[dict[str, Any], bool], list[int]]) -> None:
        (table, frames), (header, fresh), refs = drawn
        try:
            packed = encode(header)  # tensors the strategies made go into the table encode builds
        except TransportError:
            return
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)  # ext values stay ExtType
        unpacker.feed(bytes(packed[2]))
        own_table, body = unpacker.unpack(), unpacker.unpack()
        body.update({f"t{i}": ref(index) for i, index in enumerate(refs)})
        header_bytes = msgpack.packb([*own_table, *table], use_bin_type=True) + msgpack.packb(
            body, use_bin_type=True)
        parts = [MAGIC, VERSION, header_bytes, *packed[3:], *frames]
        target.send(parts, header["request_id"] if fresh and _needs_reply(header) else None)

    fuzz(target, "tables", st.tuples(tables(), requests(), st.lists(st.integers(0, 4), max_size=3)), case)


def test_every_op_with_random_fields(target: FuzzTarget) -> None:
    def case(request: tuple[dict[str, Any], bool]) -> None:
        header, fresh = request
        try:
            parts = encode(header)
        except TransportError:
            return
        target.send(parts, header["request_id"] if fresh and _needs_reply(header) else None)

    fuzz(target, "ops", requests(), case)


def test_the_fuzzed_worker_still_works(target: FuzzTarget) -> None:
    replies = target.send(encode({"op": "echo", "request_id": "last", "reply_bytes": 3}), "last")
    assert replies["last"]["data"] == b"\0\0\0"
    assert target.worker.failure is None
