"""Attacks on a real worker process through recipes: code execution, reading files, learning paths.

The worker runs as a child process on loopback (``diffsplit worker``) with
``--allow-upload`` and without CURVE or ``--trust-code`` (``--insecure``: a
loopback endpoint), as in the attack it must withstand. Every reply is checked
for the store's absolute path and any path the attacker sent.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.store import ModelStore
from diffsplit.remote.redact import PathRedactor
from diffsplit.tracer.files import StoreFileRefs
from diffsplit.transport.sockets import Client
from safetensors.torch import save_file

from .test_bounded_work import started_worker

SHA = "b" * 64
SECRET = torch.arange(7.0) * 3.25  # a tensor no model in the store holds


@pytest.fixture
def store(tmp_path: Path, models_dir: Path) -> Path:
    """A worker store: the tiny SD 1.5 folder (a link to the session's) and a broken checkpoint."""
    root = tmp_path / "worker-models"
    (root / "diffusers").mkdir(parents=True)
    (root / "diffusers" / "tiny-sd15").symlink_to(models_dir / "diffusers" / "tiny-sd15")
    (root / "loras").mkdir()
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A safetensors file outside the store, holding :data:`SECRET`."""
    path = tmp_path / "private" / "secret.safetensors"
    path.parent.mkdir()
    save_file({"samples": SECRET}, path)
    return path


@pytest.fixture
def worker(store: Path) -> Iterator[str]:
    """``diffsplit worker --allow-upload --insecure`` on ``store`` (no CURVE, no --trust-code)."""
    with started_worker(store, "--allow-upload", "--insecure", "--grace", "5") as address:
        yield address


def texts(reply: dict[str, Any]) -> str:
    """Every text of an error reply, joined."""
    error = reply.get("error", {})
    return "\n".join(str(value) for value in error.values())


def assert_no_local_paths(reply: dict[str, Any], *paths: Path) -> None:
    shown = texts(reply)
    for path in paths:
        for form in {str(path), str(path.resolve())}:
            assert form not in shown, f"the reply names {form}: {shown}"


def tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    if isinstance(value, list | tuple):
        return [t for item in value for t in tensors_in(item)]
    return []


def passthrough(samples: Any) -> dict[str, Any]:
    """A LatentUpscale that returns its input unchanged (width and height 0)."""
    return {"op": "run_node", "node": {"id": "1", "class_type": "LatentUpscale"},
            "inputs": {"samples": samples, "upscale_method": "nearest-exact", "width": 0, "height": 0,
                       "crop": "disabled"}}


def load_file_recipe(*args: Any, file: dict[str, Any] | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"op": "safetensors.load_file", "args": list(args)}
    if file is not None:
        step["file"] = file
    return {"$ds:model": {"v": 1, "steps": [step]}}


def test_the_upload_rce_recipe_is_refused_and_the_uploaded_code_never_runs(
    worker: str, store: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "rce-marker"
    evil = store / "loras" / "x.py"  # placed as an upload would have: the worker's own store
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    folder = StoreFileRefs(ModelStore(store)).file_ref(store / "diffusers" / "tiny-sd15").to_dict()
    recipe = {"v": 1, "steps": [{"op": "diffusers.from_pretrained", "cls": "StableDiffusionPipeline",
                                 "file": folder,
                                 "kwargs": {"custom_pipeline": str(evil), "trust_remote_code": True}}]}
    with Client(worker) as client:
        reply = client.request({"op": "call", "target": recipe, "method": "__call__", "args": [],
                                "kwargs": {}}, timeout=120)
        assert reply["op"] == "error" and reply["error"]["kind"] == "BadRequest", reply
        assert "custom_pipeline" in reply["error"]["message"] and "refused" in reply["error"]["message"]
        assert not marker.exists(), "the uploaded Python file ran on the worker"
        assert_no_local_paths(reply, store, evil)
        assert client.request({"op": "hello"}, timeout=10)["op"] == "result"


def test_a_file_outside_the_store_is_never_read_through_a_passthrough_node(
    worker: str, store: Path, outside: Path
) -> None:
    dotdot = {"name": "../../private/secret.safetensors", "sha256": SHA, "bytes": outside.stat().st_size}
    attempts = [
        load_file_recipe(str(outside)),
        {"$ds:model": {"v": 1, "steps": [{"op": "safetensors.load_file",
                                          "kwargs": {"filename": str(outside)}}]}},
        load_file_recipe(file=dotdot),
        load_file_recipe(file={**dotdot, "name": str(outside)}),
    ]
    with Client(worker) as client:
        for samples in attempts:
            reply = client.request(passthrough(samples), timeout=120)
            assert reply["op"] == "error", "the worker read a file outside its store"
            assert not any(torch.equal(t, SECRET) for t in tensors_in(reply) if t.shape == SECRET.shape)
            assert_no_local_paths(reply, store, outside, outside.parent)


def test_refusals_do_not_tell_whether_a_path_exists(worker: str, store: Path, outside: Path) -> None:
    with Client(worker) as client:
        replies = [client.request(passthrough(load_file_recipe(str(path))), timeout=120)
                   for path in (outside, outside.with_name("absent.safetensors"), Path("/etc/hostname"))]
    messages = [reply["error"]["message"].partition("]: ")[2] for reply in replies]
    assert messages[0] and messages[0] == messages[1] == messages[2]
    assert {reply["error"]["kind"] for reply in replies} == {"BadRequest"}


def test_load_failures_on_the_worker_name_store_files_never_the_store_path(worker: str, store: Path) -> None:
    refs = StoreFileRefs(ModelStore(store))
    folder = refs.file_ref(store / "diffusers" / "tiny-sd15").to_dict()
    missing_part = {"$ds:model": {"v": 1, "steps": [{
        "op": "diffusers.from_pretrained", "cls": "UNet2DConditionModel", "file": folder,
        "kwargs": {"subfolder": "no-such-part"}}]}}
    broken = refs.file_ref(store / "checkpoints" / "broken.safetensors").to_dict()
    loader = {"op": "run_node", "node": {"id": "4", "class_type": "CheckpointLoaderSimple"},
              "inputs": {"ckpt_name": "broken.safetensors"},
              "files": [{"folder": "checkpoints", "name": "broken.safetensors", "file": broken}]}
    with Client(worker) as client:
        unet = client.request(passthrough(missing_part), timeout=120)
        assert unet["op"] == "error" and "diffusers/tiny-sd15" in texts(unet), unet
        assert_no_local_paths(unet, store, store / "diffusers" / "tiny-sd15")
        checkpoint = client.request(loader, timeout=120)
        assert checkpoint["op"] == "error" and "broken.safetensors" in texts(checkpoint), checkpoint
        assert_no_local_paths(checkpoint, store)


def test_the_redactor_rewrites_every_local_path_a_reply_could_carry(tmp_path: Path) -> None:
    root, extra = tmp_path / "models", tmp_path / "elsewhere" / "loras"
    redactor = PathRedactor.for_store(root, {"loras": [extra]})
    reply = redactor.reply({
        "kind": "NodeFailed",
        "message": f"OSError: no config.json in {root}/diffusers/sd15/unet; see {extra}/a.safetensors",
        "traceback": f'File "{Path(sys.prefix)}/lib/x.py", line 1\nopen {tmp_path}/secret/key.pem failed',
        "digests": [f"{root}"],
        "bytes": 3,
    })
    assert "diffusers/sd15/unet" in reply["message"] and "loras/a.safetensors" in reply["message"]
    assert "<python>/lib/x.py" in reply["traceback"] and "…/key.pem" in reply["traceback"]
    assert reply["digests"] == ["<models>"] and reply["bytes"] == 3
    assert str(tmp_path) not in str(reply) and sys.prefix not in str(reply)
    assert redactor.text("see https://huggingface.co/org/repo and 1/2 of checkpoints/a.ckpt") == (
        "see https://huggingface.co/org/repo and 1/2 of checkpoints/a.ckpt"
    )


@pytest.mark.parametrize("loader", ["model", "pipeline"])
def test_a_lora_whose_header_asks_peft_to_import_a_module_is_refused_before_loading(
    worker: str, store: Path, models_dir: Path, loader: str
) -> None:
    import json

    from diffsplit.engine.lora_metadata import ADAPTER_METADATA_KEY
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(models_dir / "diffusers" / "tiny-sd15", subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), adapter_name="x")
    unet.save_lora_adapter(store / "loras", adapter_name="x", weight_name="clean.safetensors")
    config = json.loads(json.dumps(unet.peft_config["x"].to_dict(), default=lambda v: sorted(v)))
    evil = {**config, "megatron_config": {"tensor_model_parallel_size": 1},
            "megatron_core": "megatron.diffsplit_marker"}  # passes peft's own prefix check: it would import
    tensors = load_file(store / "loras" / "clean.safetensors")
    save_file(tensors, store / "loras" / "evil.safetensors",
              metadata={"format": "pt", ADAPTER_METADATA_KEY: json.dumps(evil)})
    refs = StoreFileRefs(ModelStore(store))
    folder = refs.file_ref(store / "diffusers" / "tiny-sd15").to_dict()

    def recipe(lora: str) -> dict[str, Any]:
        file = refs.file_ref(store / "loras" / lora).to_dict()
        if loader == "pipeline":  # a pipeline's LoRA loaded into its UNet alone
            return {"v": 1, "select": "unet", "steps": [
                {"op": "diffusers.from_pretrained", "cls": "StableDiffusionPipeline", "file": folder},
                {"op": "diffusers.pipeline_lora_into_unet", "cls": "StableDiffusionPipeline", "on": "unet",
                 "file": file, "kwargs": {"adapter_name": "x"}}]}
        return {"v": 1, "steps": [
            {"op": "diffusers.from_pretrained", "cls": "UNet2DConditionModel", "file": folder,
             "kwargs": {"subfolder": "unet"}},
            {"op": "diffusers.load_lora_adapter", "on": "", "file": file,
             "kwargs": {"adapter_name": "x", "prefix": None}}]}

    width = unet.config.cross_attention_dim
    sample = [torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 77, width)]
    with Client(worker) as client:
        clean = client.request({"op": "call", "target": recipe("clean.safetensors"), "method": "forward",
                                "args": sample, "kwargs": {}}, timeout=120)
        assert clean["op"] == "result", clean  # the same adapter with diffusers' own header loads
        reply = client.request({"op": "call", "target": recipe("evil.safetensors"), "method": "forward",
                                "args": sample, "kwargs": {}}, timeout=120)
    assert reply["op"] == "error" and reply["error"]["kind"] == "BadRequest", reply
    assert "megatron" in reply["error"]["message"] and "only peft's default" in reply["error"]["message"]
    assert "No module named" not in texts(reply)
    assert_no_local_paths(reply, store)


@pytest.mark.parametrize("cls", ["UNet2DConditionModel", "os.system", None])
def test_a_pipeline_lora_step_runs_only_through_a_pipeline_class(worker: str, store: Path, models_dir: Path,
                                                                 cls: str | None) -> None:
    refs = StoreFileRefs(ModelStore(store))
    shutil.copyfile(models_dir / "loras" / "tiny-sd15-lora.safetensors", store / "loras" / "l.safetensors")
    step: dict[str, Any] = {"op": "diffusers.pipeline_lora_into_unet", "on": "unet",
                            "file": refs.file_ref(store / "loras" / "l.safetensors").to_dict()}
    if cls is not None:
        step["cls"] = cls
    target = {"v": 1, "select": "unet", "steps": [
        {"op": "diffusers.from_pretrained", "cls": "StableDiffusionPipeline",
         "file": refs.file_ref(store / "diffusers" / "tiny-sd15").to_dict()}, step]}
    with Client(worker) as client:
        reply = client.request({"op": "call", "target": target, "method": "forward", "args": [],
                                "kwargs": {}}, timeout=60)
    assert reply["op"] == "error" and reply["error"]["kind"] == "BadRequest", reply
    assert "class" in reply["error"]["message"]
    assert_no_local_paths(reply, store)
