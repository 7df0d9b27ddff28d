"""What a hostile or careless peer cannot do to a worker: reach code, overwrite models, exhaust memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.wire_values import WireValueError, from_wire
from diffsplit.remote.builder import ModelBuilder
from diffsplit.remote.cache import ModelCache
from diffsplit.remote.errors import BadRequest
from diffsplit.transport.sockets import Client

from diffsplit.demo import local_worker

SCHEDULER_STEP = {"op": "diffusers.from_config", "cls": "DDIMScheduler", "args": [{}]}


@pytest.mark.parametrize("select", ["__init__.__globals__.os.getpid", "config._internal_dict", "_private"])
def test_recipe_paths_cannot_reach_private_attributes(models_dir: Path, select: str) -> None:
    builder = ModelBuilder(ModelStore(models_dir), default_registry(), ModelCache(1 << 30))
    with pytest.raises(BadRequest, match="part"):
        builder.build({"v": 1, "steps": [SCHEDULER_STEP], "select": select})


def test_call_op_with_a_dunder_path_is_refused_over_the_wire(models_dir: Path) -> None:
    recipe = {"v": 1, "steps": [SCHEDULER_STEP], "select": "__init__.__globals__.os.getpid"}
    with local_worker(models_dir) as address, Client(address) as client:
        call = {"op": "call", "target": recipe, "method": "__call__", "args": [], "kwargs": {}}
        reply = client.request(call, timeout=30)
        assert reply["op"] == "error" and reply["error"]["kind"] == "BadRequest"
        plain = {"v": 1, "steps": [SCHEDULER_STEP]}
        not_pipeline = client.request(
            {"op": "call", "target": plain, "method": "__call__", "args": [], "kwargs": {}}, timeout=30)
        assert "not a pipeline" in not_pipeline["error"]["message"]
        assert client.request({"op": "hello"}, timeout=10)["op"] == "result"


def upload(client: Client, folder: str, name: str, data: bytes) -> dict:
    import hashlib

    chunk = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return client.request({
        "op": "upload", "folder": folder, "name": name, "sha256": hashlib.sha256(data).hexdigest(),
        "total_bytes": len(data), "offset": 0, "data": chunk, "final": True,
    }, timeout=30)


def test_uploads_never_replace_models_and_bad_names_do_not_stop_the_worker(tmp_path: Path) -> None:
    store = tmp_path / "models"
    (store / "checkpoints").mkdir(parents=True)
    original = store / "checkpoints" / "real.safetensors"
    original.write_bytes(b"the real model")
    import subprocess
    import sys

    from diffsplit.demo import READY_PREFIX

    process = subprocess.Popen(
        [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(store), "--listen",
         "tcp://127.0.0.1:*", "--allow-upload", "--insecure"], stdout=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline()[len(READY_PREFIX):].split()[0]
        with Client(address) as client:
            replaced = upload(client, "checkpoints", "real.safetensors", b"an impostor")
            assert replaced["op"] == "error" and "not replaced" in replaced["error"]["message"]
            assert original.read_bytes() == b"the real model"
            same = upload(client, "checkpoints", "real.safetensors", b"the real model")
            assert same["op"] == "result"
            nested = upload(client, "checkpoints", "real.safetensors/inner.safetensors", b"x")
            assert nested["op"] == "error"
            escape = upload(client, "checkpoints", "../../evil.safetensors", b"x")
            assert escape["op"] == "error" and not (tmp_path / "evil.safetensors").exists()
            still_serving = client.request({"op": "hello"}, timeout=10)
            assert still_serving["op"] == "result"
    finally:
        process.terminate()
        process.wait(20)


def test_zeros_descriptors_are_bounded() -> None:
    def no_models(recipe):
        raise AssertionError("no model expected")

    with pytest.raises(WireValueError, match="over"):
        from_wire({"$ds:zeros": {"shape": [65536, 65536], "dtype": "float32"}}, no_models)
    with pytest.raises(WireValueError):
        from_wire({"$ds:zeros": {"shape": [-1, 4], "dtype": "float32"}}, no_models)
    small = from_wire({"$ds:zeros": {"shape": [1, 4, 8, 8], "dtype": "float16"}}, no_models)
    assert small.shape == (1, 4, 8, 8) and small.dtype == torch.float16 and not small.any()
