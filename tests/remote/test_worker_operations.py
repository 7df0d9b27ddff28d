"""Operating a worker: one log line per request, the status op and command, free, idle unload.

Real workers on loopback: an in-process ``Worker`` served on a thread, or a
``diffsplit worker`` process for what only the command line sets up (JSON
lines on stderr).
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.remote.errors import BadRequest
from diffsplit.remote.log_format import configure_worker_logging
from diffsplit.remote.operations import may_control
from diffsplit.remote.request_log import OPS_LOGGER
from diffsplit.remote.worker import Worker, WorkerConfig
from diffsplit.transport.auth import ClientCurve, ServerCurve, generate_keypair, save_keypair
from diffsplit.transport.errors import RequestCancelled
from diffsplit.transport.server import Request
from diffsplit.transport.sockets import Client

from diffsplit import cli
from diffsplit.demo import READY_PREFIX

CHECKPOINT = "tiny-sd15.safetensors"


def checkpoint_recipe(models_dir: Path, output: int) -> dict[str, Any]:
    """The recipe of the SD 1.5 checkpoint loader's output (0 model, 1 clip, 2 vae)."""
    registry = default_registry()
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    return output_recipe_source(workflow, registry, ModelStore(models_dir))("1", output)


def empty_latent(width: int = 64, height: int = 64) -> dict[str, Any]:
    return {"op": "run_node", "node": {"id": "5", "class_type": "EmptyLatentImage"},
            "inputs": {"width": width, "height": height, "batch_size": 1}}


def vae_decode(models_dir: Path) -> dict[str, Any]:
    return {"op": "run_node", "node": {"id": "7", "class_type": "VAEDecode"},
            "inputs": {"vae": {"$ds:model": checkpoint_recipe(models_dir, 2)},
                       "samples": {"samples": torch.zeros(1, 4, 8, 8)}}}


def long_sampler(models_dir: Path, steps: int = 5000) -> dict[str, Any]:
    conditioning = [[torch.zeros(1, 77, 64), {}]]
    return {
        "op": "run_node", "node": {"id": "6", "class_type": "KSampler"},
        "inputs": {
            "model": {"$ds:model": checkpoint_recipe(models_dir, 0)}, "seed": 1, "steps": steps, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal",
            "positive": conditioning, "negative": conditioning,
            "latent_image": {"samples": torch.zeros(1, 4, 8, 8)}, "denoise": 1.0,
        },
    }


class Served:
    """An in-process worker on a loopback port, served by a thread until ``close``."""

    def __init__(self, config: WorkerConfig, curve: ClientCurve | None = None) -> None:
        self.worker = Worker(config)
        self.address = self.worker.endpoint
        self._thread = threading.Thread(target=self.worker.serve, name="test-worker-serve", daemon=True)
        self._thread.start()
        try:
            with Client(self.address, curve=curve) as client:  # answered once serving: slots run by then
                assert client.request({"op": "hello"}, timeout=60)["op"] == "result"
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.worker.stop()
        self._thread.join(60)
        assert not self._thread.is_alive()


@pytest.fixture(scope="module")
def served(models_dir: Path) -> Iterator[Served]:
    worker = Served(WorkerConfig(models=models_dir, listen="tcp://127.0.0.1:*", slots=2, grace_s=2.0))
    yield worker
    worker.close()


def status_of(address: str) -> dict[str, Any]:
    with Client(address) as client:
        reply = client.request({"op": "status"}, timeout=30)
    assert reply["op"] == "result", reply
    return reply["status"]


def idle_status(address: str) -> dict[str, Any]:
    """The status once no slot is busy (a reply can reach us just before its slot is free again)."""
    deadline = time.monotonic() + 60
    status = status_of(address)
    while status["slots"]["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
        status = status_of(address)
    return status


def test_every_request_gives_one_log_record_with_its_fields(served: Served, models_dir: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=OPS_LOGGER), Client(served.address) as client:
        echo_id = client.submit({"op": "echo", "reply_bytes": 1000, "data": b"x" * 5000})
        assert client.result(echo_id, timeout=30)["op"] == "result"
        node_id = client.submit(empty_latent())
        assert client.result(node_id, timeout=30)["op"] == "result"
        bad_id = client.submit({"op": "run_node", "node": {"id": "1", "class_type": "Nope"}, "inputs": {}})
        assert client.result(bad_id, timeout=30)["error"]["kind"] == "BadRequest"
        unknown_id = client.submit({"op": "format_disk"})
        assert client.result(unknown_id, timeout=30)["error"]["kind"] == "BadRequest"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_request_records(caplog)) < 4:
            time.sleep(0.05)  # the reply can reach us before its slot thread writes the record
    records = _request_records(caplog)
    by_id = {r["request_id"]: r for r in records}
    assert sorted(r["request_id"] for r in records) == sorted({echo_id, node_id, bad_id, unknown_id})
    assert by_id[echo_id]["op"] == "echo" and by_id[echo_id]["outcome"] == "ok"
    assert (by_id[echo_id]["bytes_in"], by_id[echo_id]["bytes_out"]) == (5000, 1000)
    assert by_id[node_id]["node"] == "EmptyLatentImage" and by_id[node_id]["outcome"] == "ok"
    assert by_id[bad_id]["node"] == "Nope" and by_id[bad_id]["outcome"] == "BadRequest"
    assert by_id[unknown_id]["op"] == "format_disk" and by_id[unknown_id]["outcome"] == "BadRequest"
    assert len({r["client"] for r in records}) == 1 and records[0]["client"].startswith("peer:")
    for record in records:
        assert record["queue_s"] >= 0 and record["run_s"] >= 0
    text = [m for m in caplog.messages if f"id={node_id}" in m]
    assert len(text) == 1 and "op=run_node" in text[0] and "outcome=ok" in text[0]


def _request_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.ops for r in caplog.records
            if r.name == OPS_LOGGER and getattr(r, "ops", {}).get("event") == "request"]


def test_text_lines_stay_one_line_per_request_whatever_the_peer_sends(served: Served) -> None:
    stream = io.StringIO()
    ops = logging.getLogger(OPS_LOGGER)
    saved = (list(ops.handlers), ops.level, ops.propagate)
    configure_worker_logging(json_lines=False, stream=stream)
    try:
        with Client(served.address) as client:
            forged = {"op": "evil\nop=status outcome=ok", "request_id": "id\nforged"}
            evil = client.request(forged, timeout=30)
            assert evil["op"] == "error"
            assert client.request({"op": "hello"}, timeout=30)["op"] == "result"
    finally:
        ops.handlers[:] = saved[0]
        ops.setLevel(saved[1])
        ops.propagate = saved[2]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO op=")
    assert all(stamp.match(line) for line in lines), lines
    assert "op='evil\\nop=status outcome=ok'" in lines[0] and "outcome=BadRequest" in lines[0]


def test_status_reports_models_cache_queue_slots_and_clients(served: Served, models_dir: Path) -> None:
    with Client(served.address) as client:
        assert client.request(vae_decode(models_dir), timeout=120)["op"] == "result"
    status = idle_status(served.address)
    names = [m["name"] for m in status["models"]]
    assert f"CheckpointLoaderSimple({CHECKPOINT})" in names
    model = status["models"][names.index(f"CheckpointLoaderSimple({CHECKPOINT})")]
    assert model["bytes"] > 0 and not model["in_use"]
    assert status["cache"]["bytes"] == sum(m["bytes"] for m in status["models"])
    assert status["cache"]["budget_bytes"] == served.worker.config.cache_bytes
    assert status["slots"] == {"busy": 0, "total": 2}
    assert status["queue"] == {"length": 0, "max": served.worker.config.max_queue}
    assert status["clients"]["connected"] >= 1 and status["clients"]["known"] >= 2
    assert status["requests"]["total"] >= 1
    assert str(models_dir) not in json.dumps(status)  # no absolute paths go to peers


def test_worker_status_command_prints_the_models(served: Served, models_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with Client(served.address) as client:
        assert client.request(vae_decode(models_dir), timeout=120)["op"] == "result"
    assert cli.main(["worker", "status", served.address]) == 0
    text = capsys.readouterr().out
    assert f"CheckpointLoaderSimple({CHECKPOINT})" in text and "MiB" in text
    assert "slots: 0 busy of 2" in text and "connected" in text
    assert cli.main(["worker", "status", served.address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert any(CHECKPOINT in m["name"] for m in status["models"])


def test_worker_status_command_names_an_unreachable_worker(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["worker", "status", "tcp://127.0.0.1:9", "--timeout", "1", "--heartbeat-timeout", "0.5"])
    assert code == cli.EXIT_FAILED
    assert "tcp://127.0.0.1:9" in capsys.readouterr().err


def test_free_drops_the_cached_models_and_status_shows_it(served: Served, models_dir: Path) -> None:
    with Client(served.address) as client:
        assert client.request(vae_decode(models_dir), timeout=120)["op"] == "result"
        before = status_of(served.address)
        assert before["cache"]["entries"] >= 1 and before["cache"]["bytes"] > 0
        freed = client.request({"op": "free"}, timeout=30)
    assert freed["op"] == "result" and freed["kept"] == []
    assert sorted(m["digest"] for m in freed["freed"]) == sorted(m["digest"] for m in before["models"])
    assert freed["freed_bytes"] == before["cache"]["bytes"]
    after = status_of(served.address)
    assert (after["cache"]["entries"], after["cache"]["bytes"], after["models"]) == (0, 0, [])
    assert after["cache"]["unloaded"] == before["cache"]["unloaded"] + len(freed["freed"])


def test_free_keeps_the_model_of_a_running_job(served: Served, models_dir: Path) -> None:
    running = threading.Event()
    stop = threading.Event()
    outcome: list[BaseException] = []

    def wait_for_sampler(client: Client, request_id: str) -> None:
        try:
            client.result(request_id, timeout=300, on_progress=lambda _: running.set(), cancel=stop)
        except RequestCancelled as exc:
            outcome.append(exc)

    with Client(served.address) as sampler_client, Client(served.address) as control:
        request_id = sampler_client.submit(long_sampler(models_dir))
        waiter = threading.Thread(target=wait_for_sampler, args=(sampler_client, request_id))
        waiter.start()
        try:
            assert running.wait(120), "the sampler never reported a step"
            during = status_of(served.address)
            freed = control.request({"op": "free"}, timeout=30)
        finally:
            stop.set()  # cancel the sampler: it stops at its next step
            waiter.join(60)
        assert freed["op"] == "result"
        assert [m["name"] for m in freed["kept"]] == [f"CheckpointLoaderSimple({CHECKPOINT})"]
        assert freed["kept"][0]["in_use"] and all(not m["in_use"] for m in freed["freed"])
        assert outcome, "the sampler was meant to be cancelled, not to finish"
        assert during["slots"]["busy"] == 1
        assert [m["in_use"] for m in during["models"] if CHECKPOINT in m["name"]] == [True]
        assert not idle_status(served.address)["slots"]["busy"]
        again = control.request({"op": "free"}, timeout=30)  # the job is gone: now it goes
    assert [m["name"] for m in again["freed"]] == [f"CheckpointLoaderSimple({CHECKPOINT})"]


def test_free_is_refused_beyond_loopback_without_client_authentication() -> None:
    anonymous = Request("r1", "free", {}, b"\x00peer", None)
    may_control(anonymous, "tcp://127.0.0.1:5555", authenticates_clients=False)
    may_control(anonymous, "ipc:///tmp/worker.sock", authenticates_clients=False)
    with pytest.raises(BadRequest, match="beyond loopback"):
        may_control(anonymous, "tcp://0.0.0.0:5555", authenticates_clients=False)
    with pytest.raises(BadRequest, match="allow-listed"):
        may_control(anonymous, "tcp://127.0.0.1:5555", authenticates_clients=True)
    listed = Request("r2", "free", {}, b"\x00peer", "A" * 40)
    may_control(listed, "tcp://10.0.0.5:5555", authenticates_clients=True)


def test_status_and_free_commands_over_curve_with_an_allow_list(models_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    worker_keys, alice_keys = generate_keypair(), generate_keypair()
    worker_public, _ = save_keypair(worker_keys, tmp_path, "worker")
    _, alice_secret = save_keypair(alice_keys, tmp_path, "alice")
    curve = ServerCurve(worker_keys, frozenset({alice_keys.public}))
    served = Served(WorkerConfig(models=models_dir, listen="tcp://127.0.0.1:*", curve=curve, grace_s=1.0),
                    curve=ClientCurve(worker_keys.public, alice_keys))
    try:
        keys = ["--curve", str(alice_secret), "--server-key", str(worker_public)]
        assert cli.main(["worker", "status", served.address, *keys]) == 0
        assert "(CURVE allow-list)" in capsys.readouterr().out
        assert cli.main(["worker", "free", served.address, "--json", *keys]) == 0
        assert json.loads(capsys.readouterr().out) == {"freed": [], "kept": [], "freed_bytes": 0}
    finally:
        served.close()


def test_idle_models_are_unloaded_after_the_idle_time(models_dir: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    served = Served(WorkerConfig(models=models_dir, listen="tcp://127.0.0.1:*", idle_unload_s=0.5,
                                 grace_s=1.0))
    try:
        with caplog.at_level(logging.INFO, logger=OPS_LOGGER), Client(served.address) as client:
            assert client.request(vae_decode(models_dir), timeout=120)["op"] == "result"
            deadline = time.monotonic() + 60
            status = status_of(served.address)
            while (status["models"] or not _unloads(caplog)) and time.monotonic() < deadline:
                time.sleep(0.1)
                status = status_of(served.address)
        assert status["models"] == [] and status["cache"]["unloaded"] >= 1
        assert status["cache"]["idle_unload_s"] == 0.5
        unloads = _unloads(caplog)
        assert [u["name"] for u in unloads] == [f"CheckpointLoaderSimple({CHECKPOINT})"]
        assert unloads[0]["idle_s"] > 0.5
    finally:
        served.close()
    assert not any(t.name == "diffsplit-idle-unload" for t in threading.enumerate())


def _unloads(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.ops for r in caplog.records if getattr(r, "ops", {}).get("event") == "unload"]


def test_worker_process_logs_json_lines_on_stderr(models_dir: Path) -> None:
    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models_dir),
               "--listen", "tcp://127.0.0.1:*", "--log-json", "--grace", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        address = line[len(READY_PREFIX):].split()[0]
        with Client(address) as client:
            ids = [client.submit(empty_latent(64 + 8 * n, 64)) for n in range(3)]
            ids.append(client.submit({"op": "echo", "reply_bytes": 10}))
            ids.append(client.submit({"op": "nope"}))
            replies = [client.result(request_id, timeout=60) for request_id in ids]
        assert [r["op"] for r in replies] == ["result"] * 4 + ["error"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    lines = [json.loads(text) for text in stderr.splitlines() if text.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request"]
    assert sorted(r["request_id"] for r in requests) == sorted(ids)  # each exactly once
    assert {r["outcome"] for r in requests} == {"ok", "BadRequest"}
    assert [r["node"] for r in requests if r["op"] == "run_node"] == ["EmptyLatentImage"] * 3
    for record in requests:
        assert record["level"] == "INFO" and record["logger"] == OPS_LOGGER
        assert {"client", "queue_s", "run_s", "bytes_in", "bytes_out", "ts"} <= set(record)
