"""The envelope codec: exact round trips, zero copy, limits, hostile input."""

from __future__ import annotations

import collections
import enum
import gc
import os
import pickle
import random
import re
import warnings

import msgpack
import numpy as np
import pytest
import torch
import zmq
from diffsplit.transport.envelope import (
    INLINE_THRESHOLD,
    MAGIC,
    VERSION,
    Limits,
    content_digest,
    decode,
    describe,
    encode,
)
from diffsplit.transport.errors import MalformedMessage, MessageTooLarge, UnsupportedType

TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
]
NUMPY_DTYPES = ["float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "bool"]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaN payloads and all) for floats; 0/1 for bool."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert type(b) is torch.Tensor
    assert b.dtype == a.dtype and b.shape == a.shape and b.is_contiguous()
    assert raw_bytes(a) == raw_bytes(b)


def round_trip(header: dict, **kwargs) -> dict:
    return decode([bytes(p) for p in encode(header, **kwargs)])


def split_header(parts: list) -> tuple[object, object]:
    """Read the tensor table and body of an encoded message with a permissive reader."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(bytes(parts[2]))
    return unpacker.unpack(), unpacker.unpack()


def rebuild(parts: list, table: object, body: object) -> list:
    return [parts[0], parts[1], msgpack.packb(table) + msgpack.packb(body), *parts[3:]]


def tensor_ref(index: int) -> msgpack.ExtType:
    return msgpack.ExtType(2, index.to_bytes(4, "big"))


# Round trips ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (64, 1024)], ids=["inline", "frame"])
def test_every_torch_dtype_round_trips_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = random_tensor(dtype, shape)
    parts = encode({"t": t})
    assert len(parts) == (3 if shape == (3, 5) else 4)
    assert_identical(t, decode([bytes(p) for p in parts])["t"])


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("n", [7, 40_000])
def test_every_numpy_dtype_round_trips_bit_exact(dtype: str, n: int) -> None:
    a = np.frombuffer(np.random.default_rng(1).bytes(n * np.dtype(dtype).itemsize), dtype=dtype)
    if dtype == "bool":
        a = np.random.default_rng(1).integers(0, 2, n).astype(bool)
    out = round_trip({"a": a.reshape(-1, 1)})["a"]
    assert type(out) is np.ndarray and out.dtype == a.dtype and out.shape == (n, 1)
    assert out.tobytes() == a.tobytes() and out.flags.c_contiguous and out.flags.writeable


def test_numpy_scalars_and_big_endian_arrays() -> None:
    out = round_trip(
        {"f": np.float32(1.5), "i": np.int64(-3), "b": np.bool_(True), "be": np.arange(4, dtype=">i4")}
    )
    assert type(out["f"]) is np.float32 and out["f"] == 1.5
    assert type(out["i"]) is np.int64 and out["i"] == -3
    assert type(out["b"]) is np.bool_ and out["b"]
    assert out["be"].dtype == np.dtype("int32") and out["be"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor(3.25),
        lambda: torch.tensor(True),
        lambda: torch.empty(0),
        lambda: torch.empty(0, 3, dtype=torch.bfloat16),
        lambda: torch.empty(2, 0, 4, dtype=torch.int64),
        lambda: torch.arange(200_000, dtype=torch.float32).reshape(400, 500).t(),  # non-contiguous, framed
        lambda: torch.arange(100, dtype=torch.float16)[10:60:3],  # strided slice, offset storage
        lambda: torch.ones(1, 4).expand(5000, 4),  # stride-0 dims
        lambda: torch.randn(3, requires_grad=True),
        lambda: torch.nn.Parameter(torch.randn(2, 2)),
        lambda: torch._neg_view(torch.randn(4)),  # lazy negation bit
    ],
    ids=[
        "0dim",
        "0dim-bool",
        "empty",
        "empty-2d-bf16",
        "empty-3d",
        "transposed",
        "slice",
        "expand",
        "grad",
        "param",
        "neg-view",
    ],
)
def test_special_shapes_and_layouts(make) -> None:
    t = make()
    out = round_trip({"t": t})["t"]
    assert_identical(t.detach(), out)
    assert not out.requires_grad


def test_comfyui_structures_round_trip() -> None:
    latent = {"samples": random_tensor(torch.float32, (1, 4, 64, 64)), "noise_mask": torch.ones(1, 1, 64, 64)}
    conditioning = [
        [
            random_tensor(torch.float16, (1, 77, 2048), 1),
            {"pooled_output": random_tensor(torch.float16, (1, 1280), 2), "width": 1024},
        ],
        [
            random_tensor(torch.float16, (1, 77, 2048), 3),
            {"pooled_output": None, "strength": 0.5, "area": (64, 64, 0, 0)},
        ],
    ]
    header = {
        "op": "KSampler",
        "latent_image": latent,
        "positive": conditioning,
        "seed": 2**63 - 1,
        "cfg": 7.5,
    }
    out = round_trip(header)
    assert out.keys() == header.keys()
    assert_identical(latent["samples"], out["latent_image"]["samples"])
    assert_identical(latent["noise_mask"], out["latent_image"]["noise_mask"])
    for (t, meta), (t2, meta2) in zip(conditioning, out["positive"], strict=True):
        assert_identical(t, t2)
        assert meta.keys() == meta2.keys()
    assert_identical(conditioning[0][1]["pooled_output"], out["positive"][0][1]["pooled_output"])
    assert out["positive"][1][1] == {"pooled_output": None, "strength": 0.5, "area": (64, 64, 0, 0)}
    assert out["seed"] == 2**63 - 1 and out["cfg"] == 7.5


def test_plain_values_keep_their_types() -> None:
    header = {
        "t": (1, (2.5, None), [], (), [(True, False)], "ünïcode", b"\x00\xff", -(2**63), 2**64 - 1),
        "floats": [float("inf"), float("-inf"), -0.0, 1e-300],
        "nested": {"a": {"b": {"c": [[[]]]}}},
    }
    out = round_trip(header)
    assert out["t"] == header["t"] and type(out["t"][1]) is tuple and type(out["t"][4][0]) is tuple
    assert type(out["t"][2]) is list and out["t"][3] == ()
    assert out["nested"] == header["nested"]
    assert out["floats"][:2] == [float("inf"), float("-inf")] and str(out["floats"][2]) == "-0.0"
    nan = round_trip({"x": float("nan")})["x"]
    assert nan != nan


def test_subclasses_travel_as_their_base_type() -> None:
    class Color(enum.IntEnum):
        RED = 1

    Point = collections.namedtuple("Point", "x y")
    out = round_trip(
        {"o": collections.OrderedDict(a=1), "c": Color.RED, "p": Point(1, 2), "b": bytearray(b"ab")}
    )
    assert out == {"o": {"a": 1}, "c": 1, "p": (1, 2), "b": b"ab"}
    assert type(out["c"]) is int and type(out["p"]) is tuple and type(out["o"]) is dict


def test_one_tensor_twice_is_sent_once_and_stays_one_object() -> None:
    t = random_tensor(torch.float32, (256, 256))
    parts = encode({"a": t, "b": [t, t]})
    assert len(parts) == 4
    out = decode(parts)
    assert out["a"] is out["b"][0] is out["b"][1]


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({1, 2}, "header['x']"),
        ([1, {"y": object()}], "header['x'][1]['y']"),
        ({3: "int key"}, "header['x']"),
        (torch.zeros(2, dtype=torch.complex64), "header['x']"),
        (torch.zeros(2).to_sparse(), "header['x']"),
        (np.array(["a", "b"]), "header['x']"),
        (np.zeros(2, dtype=object), "header['x']"),
    ],
    ids=["set", "object", "int-key", "complex", "sparse", "str-array", "object-array"],
)
def test_unsupported_values_are_named_with_their_path(value: object, where: str) -> None:
    with pytest.raises(UnsupportedType, match=f"at {re.escape(where)}"):
        encode({"x": value})


def test_unsupported_header_shapes() -> None:
    with pytest.raises(UnsupportedType, match="must be a dict"):
        encode([1, 2])  # type: ignore[arg-type]
    with pytest.raises(UnsupportedType, match="cannot pack"):
        encode({"x": 2**64})
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(UnsupportedType, match="cycle"):
        encode({"x": cyclic})


# Zero copy ------------------------------------------------------------------


def address(buffer) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


def test_large_contiguous_tensor_is_framed_without_copy() -> None:
    t = torch.randn(128, 128)  # 64 KiB: exactly the threshold
    assert t.numel() * 4 == INLINE_THRESHOLD
    parts = encode({"t": t, "small": torch.randn(10)})
    assert len(parts) == 4
    frame = parts[3]
    assert isinstance(frame, memoryview) and frame.nbytes == t.numel() * 4
    assert address(frame) == t.data_ptr()
    stats = describe(parts)
    assert stats.n_frames == 1 and stats.inline_tensor_bytes == 40 and stats.tensor_bytes == 65536 + 40


def test_inline_threshold_is_configurable() -> None:
    t = torch.randn(100)
    assert len(encode({"t": t}, inline_threshold=100)) == 4
    assert len(encode({"t": t}, inline_threshold=401)) == 3


def test_non_contiguous_tensor_is_copied_once_and_still_exact() -> None:
    t = torch.randn(256, 512).t()
    parts = encode({"t": t})
    assert address(parts[3]) != t.data_ptr()
    assert_identical(t, decode(parts)["t"])


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for s in (a, b):
        s.linger = 0
        s.rcvtimeo = 5000
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def test_decoded_tensors_use_aligned_frames_in_place_and_outlive_them(pair) -> None:
    a, b = pair
    t = random_tensor(torch.float32, (512, 512))
    a.send_multipart(encode({"t": t, "s": torch.arange(3)}), copy=False)
    frames = b.recv_multipart(copy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable buffer" warning from torch.frombuffer
        out = decode(frames)
    frame_address = address(frames[3].buffer)
    # zero copy out of the zmq message where it sits 64-byte aligned, else one aligned copy
    assert (out["t"].data_ptr() == frame_address) == (frame_address % 64 == 0)
    assert out["t"].data_ptr() % 64 == 0
    del frames
    gc.collect()
    assert_identical(t, out["t"])
    out["t"].add_(1)  # writable, and ours to change
    assert out["s"].tolist() == [0, 1, 2]


def test_decoding_read_only_bytes_copies_into_writable_tensors() -> None:
    t = random_tensor(torch.int16, (300, 300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode([bytes(p) for p in encode({"t": t})])["t"]
    out.zero_()
    assert raw_bytes(t) != raw_bytes(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_arrive_on_the_cpu() -> None:
    t = torch.randn(300, 300, device="cuda")
    out = round_trip({"t": t})["t"]
    assert out.device.type == "cpu" and torch.equal(out, t.cpu())


# Limits and hostile input ---------------------------------------------------


def test_header_claiming_a_100_gb_tensor_is_refused_before_allocation() -> None:
    parts = encode({"t": torch.zeros(16)})
    table, body = split_header(parts)
    table[0][2] = [25_000_000_000]  # float32: 100 GB
    with pytest.raises(MessageTooLarge, match="max_total_bytes"):
        decode(rebuild(parts, table, body))


def test_too_many_frames() -> None:
    header = {f"t{i}": torch.zeros(1) for i in range(5)}
    with pytest.raises(MessageTooLarge, match="max_frames=4"):
        encode(header, Limits(max_frames=4), inline_threshold=1)
    parts = encode(header, inline_threshold=1)
    with pytest.raises(MessageTooLarge, match="max_frames=4"):
        decode(parts, Limits(max_frames=4))
    with pytest.raises(MessageTooLarge, match="max_frames"):
        decode([MAGIC, VERSION, parts[2], *([b"x"] * 10_000)])


def test_oversized_header_and_total() -> None:
    parts = encode({"blob": b"x" * 5000, "t": torch.zeros(1000)}, inline_threshold=1)
    with pytest.raises(MessageTooLarge, match="max_header_bytes=4096"):
        decode(parts, Limits(max_header_bytes=4096))
    with pytest.raises(MessageTooLarge, match="max_header_bytes=4096"):
        encode({"blob": b"x" * 5000}, Limits(max_header_bytes=4096))
    with pytest.raises(MessageTooLarge, match="max_total_bytes=8000"):
        decode(parts, Limits(max_total_bytes=8000))


def test_too_many_dims() -> None:
    parts = encode({"t": torch.zeros([1] * 9)})
    with pytest.raises(MessageTooLarge, match="max_tensor_dims=8"):
        decode(parts)
    assert decode(parts, Limits(max_tensor_dims=9))["t"].shape == (1,) * 9


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda table: table[0].__setitem__(2, [3, 3]), "needs 36 bytes, got 64"),  # shape vs frame length
        (
            lambda table: table[0].__setitem__(1, "float64"),
            "needs 128 bytes, got 64",
        ),  # dtype vs frame length
        (lambda table: table[1].__setitem__(2, [7]), "needs 7 bytes, got 3"),  # shape vs inline bytes
        (lambda table: table[0].__setitem__(1, "float8"), "unknown dtype"),
        (lambda table: table[0].__setitem__(1, "object"), "unknown dtype"),
        (lambda table: table[0].__setitem__(0, 1) or table[0].__setitem__(1, "bfloat16"), "unknown dtype"),
        (lambda table: table[0].__setitem__(0, 9), "unknown kind"),
        (lambda table: table[0].__setitem__(2, [-4, -4]), "non-negative"),
        (lambda table: table[0].__setitem__(2, "16"), "non-negative"),
        (lambda table: table[0].__setitem__(3, 5), "frame 5 does not exist"),
        (lambda table: table[0].__setitem__(3, "abc"), "neither a frame index nor bytes"),
        (lambda table: table.append(table[0]), "used twice"),
        (lambda table: table[1].__setitem__(3, b"\x00\x02\x01"), "bool tensor"),
        (lambda table: table.__setitem__(1, [0, "uint8"]), "not \\[kind, dtype, shape, loc\\]"),
    ],
)
def test_descriptor_mismatches_are_malformed(tamper, match: str) -> None:
    parts = encode({"big": torch.zeros(16), "flags": torch.tensor([True, False, True])}, inline_threshold=64)
    table, body = split_header(parts)
    tamper(table)
    with pytest.raises(MalformedMessage, match=match):
        decode(rebuild(parts, table, body))


def test_unreferenced_frames_and_tensors_are_malformed() -> None:
    parts = encode({"t": torch.zeros(100)}, inline_threshold=1)
    with pytest.raises(MalformedMessage, match="not referenced"):
        decode([*parts, b"\x00" * 8])
    table, _ = split_header(parts)
    with pytest.raises(MalformedMessage, match="not referenced"):
        decode(rebuild(parts, table, {"no": "refs"}))


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([MAGIC, VERSION], "at least 3 parts"),
        ([b"DSPX", VERSION, b"\x80"], "bad magic"),
        ([b"DSPL!", VERSION, b"\x80"], "bad magic"),
        ([MAGIC, b"\x02", b"\x80"], "unsupported envelope version"),
        ([MAGIC, b"1", b"\x80"], "unsupported envelope version"),
        ([MAGIC, VERSION, b""], "not valid msgpack"),
        ([MAGIC, VERSION, b"\xc1\xc1\xc1"], "not valid msgpack"),
        ([MAGIC, VERSION, msgpack.packb([]) + b"\x92\x01"], "not valid msgpack"),  # truncated body
        ([MAGIC, VERSION, msgpack.packb({})], "not an array"),
        ([MAGIC, VERSION, msgpack.packb([]) + msgpack.packb([1])], "not a map"),
        ([MAGIC, VERSION, msgpack.packb([]) + msgpack.packb({}) + b"\x00"], "trailing"),
        ([MAGIC, VERSION, msgpack.packb([]) + msgpack.packb({1: 2})], "not valid msgpack"),
        ([MAGIC, VERSION, msgpack.packb([]) + msgpack.packb({b"k": 2})], "keys must be str"),
        (
            [MAGIC, VERSION, msgpack.packb([]) + msgpack.packb({"t": msgpack.ExtType(42, b"x")})],
            "extension type 42",
        ),
        ([MAGIC, VERSION, msgpack.packb([]) + msgpack.packb({"t": tensor_ref(0)})], "reference to tensor 0"),
        ([MAGIC, VERSION, msgpack.packb([tensor_ref(0)]) + msgpack.packb({})], "extension type 2"),
        ([MAGIC, VERSION, msgpack.packb([]) + msgpack.packb({"t": msgpack.Timestamp(1, 0)})], "timestamp"),
        ([MAGIC, VERSION, msgpack.packb([]) + msgpack.packb({"t": [msgpack.Timestamp(1, 0)]})], "timestamp"),
        (
            [MAGIC, VERSION, msgpack.packb([]) + msgpack.packb({"t": [1, msgpack.ExtType(1, b"")]})],
            "tuple marker",
        ),
        ([MAGIC, VERSION, msgpack.packb([]) + msgpack.packb({"t": msgpack.ExtType(1, b"")})], "tuple marker"),
        ([MAGIC, VERSION, msgpack.packb([]) + b"\xa2\xff\xfe"], "not valid msgpack"),  # invalid UTF-8
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_messages(parts: list, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode(parts)


def test_corrupted_headers_fail_cleanly() -> None:
    """Seeded byte flips in a real header: decode succeeds or raises a TransportError, nothing else."""
    header = {"lat": {"samples": torch.randn(1, 4, 8, 8)}, "c": [(torch.randn(2, 3), {"w": 1024})], "s": "x"}
    parts = [bytes(p) for p in encode(header, inline_threshold=256)]
    rng = random.Random(0)
    outcomes = set()
    for _ in range(500):
        corrupt = bytearray(parts[2])
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        try:
            decode([MAGIC, VERSION, bytes(corrupt), *parts[3:]])
            outcomes.add("ok")
        except (MalformedMessage, MessageTooLarge) as exc:
            outcomes.add(type(exc).__name__)
    assert "MalformedMessage" in outcomes


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickles_are_never_unpickled(tmp_path) -> None:
    target = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(target)))
    with pytest.raises(MalformedMessage):
        decode([MAGIC, VERSION, payload])
    with pytest.raises(MalformedMessage):
        decode([MAGIC, VERSION, msgpack.packb([]) + payload])
    out = round_trip({"blob": payload})
    assert out["blob"] == payload and isinstance(out["blob"], bytes)
    assert not target.exists()


# describe and content_digest ------------------------------------------------


def test_describe_counts_wire_and_tensor_bytes() -> None:
    header = {"big": torch.zeros(1, 4, 64, 64), "small": torch.zeros(10, dtype=torch.float16), "n": 3}
    parts = encode(header)
    stats = describe(parts)
    assert stats == describe(header)
    assert stats.n_frames == 1 and stats.frame_bytes == 65536
    assert stats.tensor_bytes == 65536 + 20 and stats.inline_tensor_bytes == 20
    assert stats.header_bytes == len(parts[2])
    assert stats.wire_bytes == sum(memoryview(p).nbytes for p in parts)
    assert 0 < stats.overhead_bytes < 200


def test_content_digest() -> None:
    t = random_tensor(torch.bfloat16, (4, 77))
    a = {"x": [t, {"w": 1024, "p": (1, 2)}], "s": "txt"}
    b = {"s": "txt", "x": [t.clone(), {"p": (1, 2), "w": 1024}]}
    assert content_digest(a) == content_digest(b) == content_digest(round_trip(a))
    assert len(content_digest(a)) == 64
    flipped = t.clone()
    flipped.view(torch.int16)[0, 0] ^= 1
    different = [
        {"s": "txt", "x": [flipped, {"w": 1024, "p": (1, 2)}]},
        {"s": "txt", "x": [t.float(), {"w": 1024, "p": (1, 2)}]},
        {"s": "txt", "x": [t.reshape(77, 4), {"w": 1024, "p": (1, 2)}]},
        {"s": "txt", "x": [t, {"w": 1024, "p": [1, 2]}]},
        {"s": "txt", "x": [t, {"w": 1024.0, "p": (1, 2)}]},
        {"s": "txt", "x": [t, {"w": True, "p": (1, 2)}]},
        {"s": b"txt", "x": [t, {"w": 1024, "p": (1, 2)}]},
    ]
    assert len({content_digest(d) for d in different} | {content_digest(a)}) == len(different) + 1
    assert content_digest(np.zeros(3, dtype=np.float32)) != content_digest(torch.zeros(3))
    assert content_digest(torch.zeros(3, 4).t()) == content_digest(torch.zeros(4, 3))
    with pytest.raises(UnsupportedType):
        content_digest({"x": {1, 2}})
    with pytest.raises(UnsupportedType):
        content_digest({1: 2})
