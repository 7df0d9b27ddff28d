"""``diffsplit serve --ray``: worker replicas as a Ray Serve application, on a real local Ray instance.

The serve command runs as its own process (``--ray local``) and the same
clients as for a worker talk to it: ``diffsplit run --remote`` gives the image
of an all-local run bit for bit; three clients' compatible samplers sent at
once are gathered by ``@serve.batch`` and sampled in lockstep on the replica
(one UNet pass per step; each within fp32 rounding of the same request alone);
a replica's refusal reaches the client as the worker's own error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_ops import UploadChunk

from ..remote.test_cross_client_batching import ATOL, STEPS, alone, request, samples_of
from .conftest import CliRun, png_pixels, write_json

pytest.importorskip("ray")

#: How long the serve process may take to deploy its replica (Ray start plus a replica importing torch).
START_S = 180
WAIT_S = 120
#: Steps a sampler cannot finish within the test's waits.
LONG_STEPS = 5000


@pytest.fixture(scope="module")
def serve_address(models_dir: Path) -> Iterator[str]:
    """``diffsplit serve --ray local`` with one replica batching up to 4 requests gathered over 300 ms."""
    process = subprocess.Popen(
        [sys.executable, "-m", "diffsplit.cli", "serve", "--ray", "local", "--ray-cpus", "2", "--models",
         str(models_dir), "--listen", "tcp://127.0.0.1:*", "--batch-max", "4", "--batch-wait-ms", "300",
         "--device", "cpu", "--grace", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert process.stdout is not None
    address = None
    for line in process.stdout:  # the first line the front prints says where it listens
        if "listening on " in line:
            address = line.split("listening on ", 1)[1].split()[0]
            break
    try:
        assert address is not None, "diffsplit serve never said where it listens"
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_node_run_through_serve_equals_the_all_local_run(
    serve_address: str, run_cli: Callable[..., CliRun], models_dir: Path, tmp_path: Path,
) -> None:
    workflow = write_json(tmp_path / "wf.json", sd15_workflow(steps=2, lora=True))
    split = run_cli("run", workflow, "--models", models_dir, "--out", tmp_path / "split", "-q",
                    "--remote", f"6={serve_address}")
    assert split.exit_code == 0, split.stderr
    local = run_cli("run", workflow, "--models", models_dir, "--out", tmp_path / "local", "-q")
    assert local.exit_code == 0, local.stderr
    assert np.array_equal(png_pixels(split.saved[0]), png_pixels(local.saved[0]))


def replica_batching(address: str) -> dict[str, Any]:
    with Client(address) as client:
        reply = client.request({"op": "stats"}, timeout=60)
    assert reply["op"] == "result", reply
    (replica,) = reply["forwarded"]["replicas"]
    return replica["batching"]


def test_three_clients_sent_together_are_sampled_as_one_batch_on_the_replica(
    serve_address: str, models_dir: Path,
) -> None:
    headers = [request(models_dir, n) for n in range(3)]
    before = replica_batching(serve_address)
    with ExitStack() as stack:
        clients = [stack.enter_context(Client(serve_address)) for _ in headers]
        ids = [client.submit(header) for client, header in zip(clients, headers, strict=True)]
        batched = [samples_of(client.result(request_id, timeout=WAIT_S))
                   for client, request_id in zip(clients, ids, strict=True)]
    after = replica_batching(serve_address)
    assert after["batches"] == before["batches"] + 1
    assert after["batched_requests"] - before["batched_requests"] == 3
    assert after["unet_passes"] - before["unet_passes"] == STEPS  # one pass per step for the three
    solo = alone(serve_address, headers)
    assert replica_batching(serve_address)["batches"] == after["batches"], "one at a time: no batch"
    differences = [float((b - s).abs().max()) for b, s in zip(batched, solo, strict=True)]
    print(f"\nserve: batched vs alone, max |latent difference| = {max(differences):.3g}")
    assert max(differences) < ATOL, differences
    assert not torch.equal(solo[0], solo[1]), "each kept its own seed, CFG and prompt"


def test_a_cancel_reaches_the_replica_and_frees_its_slot(serve_address: str, models_dir: Path) -> None:
    long = request(models_dir, 0, steps=LONG_STEPS)  # minutes of sampling on the replica's one slot
    with Client(serve_address) as client:
        request_id = client.submit(long)
        time.sleep(3)  # gathered, forwarded and sampling on the replica
        client.cancel(request_id)  # the front drops it and tells the replica that runs it
        started = time.monotonic()
        reply = client.request(request(models_dir, 1), timeout=WAIT_S)
    assert reply["op"] == "result", reply
    assert time.monotonic() - started < 30, "the cancelled sampler still held the replica's slot"


def test_a_replica_refusal_reaches_the_client_as_the_workers_error(serve_address: str,
                                                                   models_dir: Path) -> None:
    header = request(models_dir, 0)
    model = header["inputs"]["model"]
    model["$ds:model"] = {**model["$ds:model"], "fingerprint": "0" * 16}  # not the weights the store has
    with Client(serve_address) as client:
        reply = client.request(header, timeout=WAIT_S)
    assert reply["op"] == "error" and "differs from the client's" in reply["error"]["message"], reply


def test_ops_the_front_does_not_forward_are_refused_by_name(serve_address: str) -> None:
    with Client(serve_address) as client:
        chunk = UploadChunk(folder="loras", name="x.safetensors", sha256="0" * 64, total_bytes=1, offset=0,
                            data=b"x", final=True)
        reply = client.request(chunk.header(), timeout=WAIT_S)
    assert reply["op"] == "error" and "not served here" in reply["error"]["message"], reply


def test_serve_refuses_uploads_before_ray_starts(run_cli: Callable[..., CliRun], models_dir: Path) -> None:
    done = run_cli("serve", "--ray", "local", "--models", models_dir, "--allow-upload", "--insecure")
    assert done.exit_code != 0 and "takes no uploads" in done.stderr
