"""Load on one worker: 32 clients x 50 requests each, no reply lost or duplicated.

A ``diffsplit worker`` process on loopback (2 slots, JSON request log on
stderr) serves 32 clients at once, each with its own connection, sending 50
small real requests one after another: an ``echo`` whose reply size names the
request, an ``EmptyLatentImage`` whose output shape names it, and a
``VAEDecode`` of the tiny SD 1.5 VAE (a cached model). Every reply must carry
its own request id and its own size or shape; the worker's log must hold each
request id exactly once. Latency (submit to reply) p50/p99 overall and per
op, throughput and the worker's RSS before and after go to
``benchmark.extra_info`` and are printed. Nothing here asserts a timing.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_worker_load.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.transport.errors import TransportError
from diffsplit.transport.sockets import Client

from diffsplit.demo import READY_PREFIX, stop_process

CLIENTS = 32
REQUESTS_PER_CLIENT = 50
REPLY_TIMEOUT_S = 300.0
MB = 1 << 20


@dataclass(frozen=True)
class Sent:
    """One request as a client sent it, and what its reply must show."""

    client: int
    index: int
    kind: str
    expect: Any


@dataclass(frozen=True)
class Answer:
    """What came back for one request."""

    sent: Sent
    request_id: str
    latency_s: float
    ok: bool
    problem: str = ""


def vae_recipe(models_dir: Path) -> dict[str, Any]:
    registry = default_registry()
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    return output_recipe_source(workflow, registry, ModelStore(models_dir))("1", 2)


def make_request(client: int, index: int, vae: dict[str, Any]) -> tuple[dict[str, Any], Sent]:
    """The ``index``-th request of ``client``: echo, EmptyLatentImage or VAEDecode in turn."""
    serial = client * REQUESTS_PER_CLIENT + index
    kind = ("echo", "empty_latent", "vae_decode")[index % 3]
    if kind == "echo":
        size = serial + 1  # the reply's size names the request
        return {"op": "echo", "reply_bytes": size, "data": b"\x01" * 64}, Sent(client, index, kind, size)
    if kind == "empty_latent":
        width, height = 16 + 8 * (serial % 32), 16 + 8 * (serial // 32 % 32)  # the shape names it (mostly)
        header = {"op": "run_node", "node": {"id": "5", "class_type": "EmptyLatentImage"},
                  "inputs": {"width": width, "height": height, "batch_size": 1}}
        return header, Sent(client, index, kind, (1, 4, height // 8, width // 8))
    header = {"op": "run_node", "node": {"id": "7", "class_type": "VAEDecode"},
              "inputs": {"vae": {"$ds:model": vae}, "samples": {"samples": torch.zeros(1, 4, 8, 8)}}}
    return header, Sent(client, index, kind, (1, 64, 64, 3))


def check(reply: dict[str, Any], request_id: str, sent: Sent) -> str:
    """"" when ``reply`` is the right answer to ``sent``, else what is wrong."""
    if reply.get("request_id") != request_id:
        return f"reply carries request id {reply.get('request_id')!r}, not {request_id!r}"
    if reply.get("op") != "result":
        return f"error reply: {reply.get('error')}"
    if sent.kind == "echo":
        got = len(reply["data"])
    elif sent.kind == "empty_latent":
        samples = reply["outputs"][0]["samples"]  # zeros travel as a {"$ds:zeros": {shape, dtype}} tag
        got = tuple(samples["$ds:zeros"]["shape"]) if isinstance(samples, dict) else tuple(samples.shape)
    else:
        got = tuple(reply["outputs"][0].shape)
    return "" if got == sent.expect else f"{sent.kind}: got {got}, expected {sent.expect}"


def one_client(address: str, client: int, vae: dict[str, Any], start: threading.Barrier,
               answers: list[Answer]) -> None:
    with Client(address) as connection:
        start.wait()
        for index in range(REQUESTS_PER_CLIENT):
            header, sent = make_request(client, index, vae)
            began = time.perf_counter()
            request_id = connection.submit(header)
            try:
                reply = connection.result(request_id, timeout=REPLY_TIMEOUT_S)
            except TransportError as exc:
                answers.append(Answer(sent, request_id, time.perf_counter() - began, False, f"lost: {exc}"))
                continue
            latency = time.perf_counter() - began
            problem = check(reply, request_id, sent)
            answers.append(Answer(sent, request_id, latency, not problem, problem))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def start_worker(models_dir: Path, log_path: Path) -> tuple[subprocess.Popen[str], str, Any]:
    log = log_path.open("w")
    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models_dir),
               "--listen", "tcp://127.0.0.1:*", "--slots", "2", "--max-queue", "64", "--cache-gb", "2",
               "--grace", "5", "--log-json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline() if process.stdout is not None else ""
    assert line.startswith(READY_PREFIX), f"the worker did not start: {line!r}"
    return process, line[len(READY_PREFIX):].split()[0], log


def test_32_clients_x_50_requests_no_reply_lost_or_duplicated(benchmark, capsys, models_dir: Path,
                                                              tmp_path: Path) -> None:
    vae = vae_recipe(models_dir)
    log_path = tmp_path / "worker.log.jsonl"
    process, address, log = start_worker(models_dir, log_path)
    try:
        worker = psutil.Process(process.pid)
        rss_start = worker.memory_info().rss
        with Client(address) as warm:  # build the VAE once: the load measures the served state
            for kind in range(3):
                header, sent = make_request(CLIENTS, kind, vae)
                request_id = warm.submit(header)
                assert not check(warm.result(request_id, timeout=REPLY_TIMEOUT_S), request_id, sent)
        rss_before = worker.memory_info().rss
        answers: list[Answer] = []
        wall: list[float] = []

        def load() -> None:
            answers.clear()
            start = threading.Barrier(CLIENTS + 1)
            threads = [threading.Thread(target=one_client, args=(address, n, vae, start, answers),
                                        name=f"load-client-{n}") for n in range(CLIENTS)]
            for thread in threads:
                thread.start()
            start.wait()
            began = time.perf_counter()
            for thread in threads:
                thread.join(REPLY_TIMEOUT_S * REQUESTS_PER_CLIENT)
            wall.append(time.perf_counter() - began)

        benchmark.pedantic(load, rounds=1, iterations=1)
        rss_after = worker.memory_info().rss
    finally:
        stop_process(process, 60)
        log.close()

    sent_total = CLIENTS * REQUESTS_PER_CLIENT
    problems = [a.problem for a in answers if not a.ok]
    lost = sent_total - sum(1 for a in answers if not a.problem.startswith("lost"))
    answered_ids = Counter(a.request_id for a in answers if not a.problem.startswith("lost"))
    logged = Counter(line["request_id"] for line in _log_lines(log_path) if line.get("event") == "request")
    load_ids = {a.request_id for a in answers}
    duplicated = sum(n - 1 for n in answered_ids.values() if n > 1) + \
        sum(n - 1 for request_id, n in logged.items() if request_id in load_ids and n > 1)
    unlogged = sum(1 for request_id in load_ids if logged[request_id] == 0)
    latencies = [a.latency_s for a in answers if a.ok]
    figures: dict[str, Any] = {
        "clients": CLIENTS, "requests": sent_total, "answered": len(answers), "lost": lost,
        "duplicated": duplicated, "wrong": len(problems) - lost, "unlogged": unlogged,
        "wall_s": wall[0], "requests_per_s": sent_total / wall[0],
        "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "rss_start_mb": rss_start / MB, "rss_before_mb": rss_before / MB, "rss_after_mb": rss_after / MB,
        "rss_growth_mb": (rss_after - rss_before) / MB,
    }
    for kind in ("echo", "empty_latent", "vae_decode"):
        times = [a.latency_s for a in answers if a.ok and a.sent.kind == kind]
        figures[f"{kind}_p50_ms"] = 1000 * percentile(times, 50)
        figures[f"{kind}_p99_ms"] = 1000 * percentile(times, 99)
    benchmark.extra_info.update(figures)
    with capsys.disabled():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        print(f"\n[worker load {CLIENTS}x{REQUESTS_PER_CLIENT}] {shown}")
    assert len(answers) == sent_total
    assert lost == 0 and duplicated == 0, problems[:5]
    assert not problems, problems[:5]
    assert unlogged == 0


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for text in path.read_text().splitlines():
        if text.startswith("{"):
            lines.append(json.loads(text))
    return lines
