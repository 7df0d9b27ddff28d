"""Transport benchmarks: codec throughput and socket round trips against a plain memory
copy measured in the same run, and wire bytes against raw tensor bytes for real payloads.

Every figure goes to ``benchmark.extra_info`` (see ``--benchmark-json``) and is printed.
Nothing here asserts a timing.

    .venv/bin/python -m pytest bench/test_transport_bench.py -q --benchmark-columns=min,median
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from diffsplit.transport.auth import ClientCurve, ServerCurve, generate_keypair
from diffsplit.transport.envelope import decode, describe, encode
from diffsplit.transport.errors import TransportError
from diffsplit.transport.pool import ClientPool
from diffsplit.transport.sockets import Client, Server, Settings

MB = 1024 * 1024
HEADER_ALLOWANCE = 2048  # the goal: wire bytes <= 1.02 x raw tensor bytes + 2 KB


def best_of(fn: Callable[[], object], min_repeat: int = 20, min_seconds: float = 0.25) -> float:
    """The fastest call of ``fn`` in seconds (the statistic of the 'min' column), after a warm-up,
    over at least ``min_repeat`` calls and ``min_seconds`` (fresh allocations fault pages in)."""
    for _ in range(3):
        fn()
    best, calls, started = float("inf"), 0, time.perf_counter()
    while calls < min_repeat or time.perf_counter() - started < min_seconds:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        calls += 1
    return best


def copy_baseline(t: torch.Tensor) -> float:
    """A plain single-threaded memory copy of the tensor's bytes (``clone()`` may fan out
    over OpenMP threads, which makes it erratic on a busy machine)."""
    view = memoryview(t.numpy()).cast("B")
    return best_of(lambda: bytearray(view))


def report(benchmark, capsys, name: str, **figures: object) -> None:
    benchmark.extra_info.update(figures)
    with capsys.disabled():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        print(f"\n[{name}] {shown}")


def ratio_to_copy(benchmark, baseline: float) -> float:
    return benchmark.stats.stats.min / baseline


@pytest.mark.parametrize("megabytes", [1, 16])
def test_codec_round_trip_vs_copy(benchmark, capsys, megabytes: int) -> None:
    t = torch.randn(megabytes * MB // 4)
    copy = copy_baseline(t)

    def round_trip() -> torch.Tensor:
        return decode(encode({"op": "x", "t": t}))["t"]

    assert torch.equal(benchmark(round_trip), t)
    report(
        benchmark,
        capsys,
        f"encode+decode {megabytes} MB",
        copy_min_s=copy,
        codec_min_s=benchmark.stats.stats.min,
        ratio_vs_copy=ratio_to_copy(benchmark, copy),
        codec_gb_per_s=megabytes * MB / benchmark.stats.stats.min / 1e9,
    )


@pytest.mark.parametrize("megabytes", [1, 16])
def test_codec_with_received_copy_vs_copy(benchmark, capsys, megabytes: int) -> None:
    """encode, one copy of every part (what the receiving socket holds), decode."""
    t = torch.randn(megabytes * MB // 4)
    copy = copy_baseline(t)

    def round_trip() -> torch.Tensor:
        return decode([bytearray(p) for p in encode({"op": "x", "t": t})])["t"]

    assert torch.equal(benchmark(round_trip), t)
    report(
        benchmark,
        capsys,
        f"encode+copy+decode {megabytes} MB",
        copy_min_s=copy,
        ratio_vs_copy=ratio_to_copy(benchmark, copy),
    )


def sd15_payload() -> dict:
    latent = {"samples": torch.randn(1, 4, 64, 64)}
    positive = [[torch.randn(1, 77, 768), {}]]
    negative = [[torch.randn(1, 77, 768), {}]]
    return ksampler_request(latent, positive, negative, "v1-5-pruned-emaonly.safetensors")


def sdxl_payload() -> dict:
    def cond() -> list:
        extra = {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0}
        extra |= {"target_width": 1024, "target_height": 1024}
        return [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280), **extra}]]

    request = ksampler_request(
        {"samples": torch.randn(1, 4, 128, 128)}, cond(), cond(), "sd_xl_base_1.0.safetensors"
    )
    request["inputs"]["add_time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2)
    return request


def ksampler_request(latent: dict, positive: list, negative: list, checkpoint: str) -> dict:
    """A node-specific workflow as the offload client sends it: node, recipe, inputs."""
    recipe = {
        "v": 1,
        "steps": [
            {
                "op": "diffusers.from_single_file",
                "cls": "StableDiffusionPipeline",
                "file": {
                    "name": checkpoint,
                    "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
                },
                "kwargs": {"torch_dtype": "float16"},
            }
        ],
        "select": "unet",
        "fingerprint": "0f3b8c1d2e4a5968",
    }
    node = {
        "class_type": "KSampler",
        "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8.0, "sampler_name": "euler"},
    }
    node["inputs"] |= {"scheduler": "normal", "denoise": 1.0}
    inputs = {"latent_image": latent, "positive": positive, "negative": negative}
    return {"op": "run", "request_id": "3f2a9c", "node": node, "recipes": {"model": recipe}, "inputs": inputs}


@pytest.mark.parametrize("payload", [sd15_payload, sdxl_payload], ids=["sd15", "sdxl"])
def test_wire_bytes_vs_raw_tensor_bytes(benchmark, capsys, payload: Callable[[], dict]) -> None:
    header = payload()
    parts = benchmark(encode, header)
    stats = describe(parts)
    assert stats.wire_bytes == sum(memoryview(p).nbytes for p in parts)
    report(
        benchmark,
        capsys,
        f"wire bytes {payload.__name__}",
        wire_bytes=stats.wire_bytes,
        tensor_bytes=stats.tensor_bytes,
        overhead_bytes=stats.overhead_bytes,
        header_bytes=stats.header_bytes,
        n_frames=stats.n_frames,
        wire_over_raw=stats.wire_bytes / stats.tensor_bytes,
        goal_bytes=int(1.02 * stats.tensor_bytes) + HEADER_ALLOWANCE,
        meets_goal=stats.wire_bytes <= 1.02 * stats.tensor_bytes + HEADER_ALLOWANCE,
    )
    assert "wire_over_raw" in benchmark.extra_info and "meets_goal" in benchmark.extra_info


@contextmanager
def answering(server: Server, answer: Callable[[dict], dict]) -> Iterator[str]:
    """``server`` answering every request with ``answer(header)`` in a thread; its endpoint."""

    def serve() -> None:
        while True:
            try:
                request = server.recv(timeout=0.1)
            except TransportError:
                return
            if request is not None:
                server.reply(request, answer(request.header))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.endpoint
    finally:
        server.close()
        thread.join(10)


@pytest.fixture(scope="module")
def echo_endpoint() -> Iterator[str]:
    server = Server(settings=Settings(heartbeat_interval=0.5, heartbeat_timeout=10.0))
    with answering(server, lambda header: {"op": "result", "t": header["t"]}) as endpoint:
        yield endpoint


def test_loopback_round_trip_16mb(benchmark, capsys, echo_endpoint: str) -> None:
    t = torch.randn(16 * MB // 4)
    copy = copy_baseline(t)
    with Client(echo_endpoint, settings=Settings(heartbeat_interval=0.5, heartbeat_timeout=10.0)) as client:
        out = benchmark(lambda: client.request({"op": "echo", "t": t}, timeout=30)["t"])
    assert torch.equal(out, t)
    report(
        benchmark,
        capsys,
        "loopback round trip 16 MB (there and back)",
        copy_min_s=copy,
        round_trip_min_s=benchmark.stats.stats.min,
        ratio_vs_copy=ratio_to_copy(benchmark, copy),
        gb_per_s_both_ways=2 * 16 * MB / benchmark.stats.stats.min / 1e9,
    )


@pytest.fixture(scope="module")
def curve_echo() -> Iterator[tuple[str, ClientCurve]]:
    """A CURVE server on loopback answering every request (what a worker on a network looks like)."""
    keys = generate_keypair()
    settings = Settings(heartbeat_interval=0.5, heartbeat_timeout=10.0)
    server = Server("tcp://127.0.0.1:*", settings=settings, curve=ServerCurve(keys))
    with answering(server, lambda header: {"op": "result"}) as endpoint:
        yield endpoint, ClientCurve(keys.public)


def test_pooled_call_vs_a_connection_per_call(benchmark, capsys, curve_echo: tuple[str, ClientCurve]) -> None:
    """One small request per ``@node``-style call: leased from the process's pool (one context and one
    CURVE handshake, kept) against the old way, a new Client (context, I/O thread, handshake) per call."""
    endpoint, curve = curve_echo
    settings = Settings(heartbeat_interval=0.5, heartbeat_timeout=10.0)

    def fresh() -> None:
        with Client(endpoint, settings=settings, curve=curve) as client:
            client.request({"op": "ping"}, timeout=30)

    pool = ClientPool()
    try:
        def pooled() -> None:
            with pool.lease(endpoint, settings=settings, curve=curve) as client:
                client.request({"op": "ping"}, timeout=30)

        per_call = best_of(fresh, min_repeat=10)
        benchmark(pooled)
        assert pool.connections() == 1
    finally:
        pool.close()
    report(benchmark, capsys, "a call through the pool vs a new connection per call (CURVE, loopback)",
           connection_per_call_min_s=per_call, pooled_min_s=benchmark.stats.stats.min,
           per_call_over_pooled=per_call / benchmark.stats.stats.min)
