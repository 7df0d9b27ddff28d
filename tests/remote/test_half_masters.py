"""A worker computing in fp16 keeps an fp16 file's weights in fp16: half the memory, the same image."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.dtypes import DtypePolicy
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.models.checkpoint import kept_dtype, load_checkpoint_part, save_checkpoint
from diffsplit.engine.models.tiny import tiny_checkpoint_parts
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.remote.builder import ModelBuilder
from diffsplit.remote.cache import ModelCache, module_bytes
from diffsplit.remote.errors import BadRequest
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.objects import named_tensors

from diffsplit.demo import local_worker
from tests.remote.test_part_builds import recipe_of_output
from tests.remote.test_split_dtypes import DECODER, SAMPLER, _run
from tests.remote.test_worker_choice import status_of

HALF = DtypePolicy.choose(torch.device("cpu"), dtype="fp16")


@pytest.fixture(scope="module")
def half_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.5 checkpoint stored in fp16 (under its usual name), with the tiny LoRA."""
    root = tmp_path_factory.mktemp("half-models")
    (root / "checkpoints").mkdir()
    shutil.copytree(models_dir / "loras", root / "loras")
    parts = tiny_checkpoint_parts("sd15", seed=0)
    for module in (parts.model.unet, parts.vae.model, *parts.clip.encoders):
        module.to(torch.float16)
    save_checkpoint(root / "checkpoints" / "tiny-sd15.safetensors", parts)
    return root


def test_the_kept_dtype_is_the_files_own_or_float32(half_models: Path, models_dir: Path) -> None:
    half_file = half_models / "checkpoints" / "tiny-sd15.safetensors"
    full_file = models_dir / "checkpoints" / "tiny-sd15.safetensors"
    assert kept_dtype(half_file, "model", torch.float16) == torch.float16
    assert kept_dtype(half_file, "model", torch.bfloat16) == torch.float32  # never rounds fp16 to bf16
    assert kept_dtype(full_file, "model", torch.float16) == torch.float32  # never rounds fp32 weights
    assert kept_dtype(half_file, "vae", torch.float32) == torch.float32


def test_half_masters_take_half_the_cache_and_pass_the_clients_fingerprint(half_models: Path) -> None:
    cache = ModelCache(1 << 30)
    builder = ModelBuilder(ModelStore(half_models), default_registry(), cache, master_dtypes=HALF)
    sent = recipe_of_output(half_models, "1", 0)
    client_model = load_checkpoint_part(half_models / "checkpoints" / "tiny-sd15.safetensors", "model")
    sent["fingerprint"] = fingerprint(client_model)  # the client loads float32
    built = builder.build(sent)
    assert {t.dtype for t in built.unet.parameters()} == {torch.float16}
    assert module_bytes(built) * 2 == module_bytes(client_model)
    assert fingerprint(built, as_dtype=torch.float32) == fingerprint(client_model)
    wrong = {**sent, "fingerprint": "0" * 64}
    with pytest.raises(BadRequest, match="differs"):
        ModelBuilder(ModelStore(half_models), default_registry(), ModelCache(1 << 30),
                     master_dtypes=HALF).build(wrong)


def test_a_lora_on_a_half_master_matches_the_clients_float32_merge(half_models: Path) -> None:
    from diffsplit.engine.executor import Executor

    registry = default_registry()
    workflow = load_workflow(sd15_workflow(), registry)
    executor = Executor(registry, ModelStore(half_models), output_dir=half_models / "out")
    client_lora = executor.run(workflow, targets=["2"]).outputs["2"]
    builder = ModelBuilder(ModelStore(half_models), registry, ModelCache(1 << 30), master_dtypes=HALF)
    for index in (0, 1):
        sent = {**recipe_of_output(half_models, "2", index), "fingerprint": fingerprint(client_lora[index])}
        builder.build(sent)  # raises if the merged weights differ from the client's


@pytest.fixture(scope="module")
def half_worker(half_models: Path) -> Iterator[str]:
    with local_worker(half_models, extra_args=["--device", "cpu", "--dtype", "fp16"]) as address:
        yield address


def test_split_with_half_masters_equals_local_in_fp16(
    half_worker: str, half_models: Path, tmp_path: Path, registry: NodeRegistry
) -> None:
    local = _run(half_models, tmp_path / "local", registry, "fp16", [])
    split = _run(half_models, tmp_path / "split", registry, "fp16",
                 [f"KSampler={half_worker}", f"VAEDecode={half_worker}"])
    for node_id in (SAMPLER, DECODER):
        a, b = local.outputs[node_id][0], split.outputs[node_id][0]
        a = a["samples"] if isinstance(a, dict) else a
        b = b["samples"] if isinstance(b, dict) else b
        assert torch.equal(a, b), f"node {node_id} differs between the fp16 worker and fp16 here"
    status = status_of(half_worker)
    vae = next(model for model in status["models"] if model["digest"].endswith(":2"))
    local_vae = load_checkpoint_part(half_models / "checkpoints" / "tiny-sd15.safetensors", "vae")
    assert vae["bytes"] * 2 == module_bytes(local_vae), "the worker keeps the fp16 VAE in fp16"


def test_standalone_files_keep_their_half_dtype(tmp_path: Path) -> None:
    """VAELoader, ControlNetLoader, UNETLoader and CLIPLoader on a worker computing in fp16: an fp16
    file stays fp16, and is checked against the float32 load's fingerprint."""
    from diffsplit.engine.models.checkpoint import save_controlnet, save_vae
    from diffsplit.engine.models.text_encoder_files import save_text_encoder_file
    from diffsplit.engine.models.tiny import tiny_controlnet
    from diffsplit.engine.models.unet_file import save_unet_file
    from diffsplit.engine.rebuild import build, store_resolver
    from diffsplit.engine.types import ControlNet
    from diffsplit.tracer.recipe import Recipe

    parts = tiny_checkpoint_parts("sd15", seed=2)
    controlnet = tiny_controlnet(parts.model.unet, seed=2)
    for module in (parts.model.unet, parts.vae.model, parts.clip.encoders[0], controlnet.model):
        module.to(torch.float16)
    for folder in ("vae", "controlnet", "diffusion_models", "text_encoders"):
        (tmp_path / folder).mkdir()
    save_vae(tmp_path / "vae" / "half.safetensors", parts.vae)
    save_controlnet(tmp_path / "controlnet" / "half.safetensors", ControlNet(model=controlnet.model))
    save_unet_file(tmp_path / "diffusion_models" / "half.safetensors", parts.model)
    save_text_encoder_file(tmp_path / "text_encoders" / "half.safetensors", parts.clip.encoders[0], "clip_l")
    store = ModelStore(tmp_path, index_path=tmp_path / "index.json")
    registry = default_registry()
    nodes = {
        "VAELoader": {"vae_name": "half.safetensors"},
        "ControlNetLoader": {"control_net_name": "half.safetensors"},
        "UNETLoader": {"unet_name": "half.safetensors", "weight_dtype": "default"},
        "CLIPLoader": {"clip_name": "half.safetensors", "type": "stable_diffusion"},
    }
    for node, inputs in nodes.items():
        workflow = load_workflow({"1": {"class_type": node, "inputs": inputs}}, registry)
        data = output_recipe_source(workflow, registry, store)("1", 0)
        assert data is not None
        float32 = build(Recipe.from_dict(data), store_resolver(store), registry=registry)
        recipe = Recipe.from_dict({**data, "fingerprint": fingerprint(float32)})
        kept = build(recipe, store_resolver(store), registry=registry, master_dtypes=HALF)
        dtypes = {t.dtype for _path, t in named_tensors(kept) if t.is_floating_point()}
        assert dtypes == {torch.float16}, node
        assert {t.dtype for _path, t in named_tensors(float32) if t.is_floating_point()} == {torch.float32}


def _half_run(models: Path, out: Path, registry: NodeRegistry, remote: list[str], *,
              keep_half: bool, lazy: bool = True) -> tuple[Any, Any]:
    """The SD 1.5 workflow computing in fp16 here; loaders keep half files in half with ``keep_half``."""
    from diffsplit.engine.device_memory import DeviceMemory
    from diffsplit.engine.device_runner import DeviceNodeRunner
    from diffsplit.engine.executor import Executor, run_node_locally
    from diffsplit.engine.offload import RemoteRunner
    from diffsplit.engine.remote_assign import assign_remotes

    store = ModelStore(models)
    workflow = load_workflow(sd15_workflow(), registry)
    executor = Executor(registry, store, output_dir=out, max_workers=1,
                        master_dtypes=HALF if keep_half else None)
    memory = DeviceMemory(torch.device("cpu"), HALF)
    assigned = assign_remotes(workflow, registry, remote)
    if not assigned:
        return executor.run(workflow, node_runner=DeviceNodeRunner(run_node_locally, memory)), None
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store,
                      lazy_loaders=lazy) as runner:
        local_part = DeviceNodeRunner(runner, memory, elsewhere=lambda node_id: node_id in assigned)
        return executor.run(workflow, node_runner=local_part), runner


def test_a_local_fp16_run_keeps_half_files_in_half_and_gives_the_same_image(
    half_models: Path, tmp_path: Path, registry: NodeRegistry
) -> None:
    doubled, _ = _half_run(half_models, tmp_path / "a", registry, [], keep_half=False)
    kept, _ = _half_run(half_models, tmp_path / "b", registry, [], keep_half=True)
    assert kept.outputs["1"][0].unet.dtype == torch.float16
    assert doubled.outputs["1"][0].unet.dtype == torch.float32
    assert torch.equal(kept.outputs[DECODER][0], doubled.outputs[DECODER][0])


def test_an_eager_half_client_and_a_float32_worker_agree_on_the_weights(
    half_models: Path, tmp_path: Path, registry: NodeRegistry, half_worker: str
) -> None:
    """The client's fp16 fingerprints pass on a float32 worker (compared in fp16) and an fp16 one."""
    local, _ = _half_run(half_models, tmp_path / "local", registry, [], keep_half=True)
    remote = [f"KSampler={half_worker}", f"VAEDecode={half_worker}"]
    split, runner = _half_run(half_models, tmp_path / "split", registry, remote, keep_half=True, lazy=False)
    assert set(runner.stats) == {SAMPLER, DECODER}
    assert torch.equal(local.outputs[DECODER][0], split.outputs[DECODER][0])
    with local_worker(half_models) as float32_worker:
        other, runner = _half_run(half_models, tmp_path / "fp32", registry, [f"KSampler={float32_worker}"],
                                  keep_half=True, lazy=False)
    assert set(runner.stats) == {SAMPLER}
    assert torch.isfinite(other.outputs[DECODER][0]).all()
