"""A lean client: models only remote nodes use are never built here, and the image is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffsplit.engine.errors import NodeFailed
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.executor import Executor
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.lazy_models import LazyModel, materialised
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.recipe import RECIPE_TAG

from tests.remote.test_split_runs import assert_same_outputs, run_workflow

SAMPLER_AND_DECODE = ("KSampler", "VAEDecode")


def split_run(document: dict, models_dir: Path, out: Path, inputs_dir: Path, registry: NodeRegistry,
              address: str, classes: tuple[str, ...] = SAMPLER_AND_DECODE, **runner_options: object):
    store = ModelStore(models_dir)
    workflow = load_workflow(document, registry)
    executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=out)
    assigned = assign_remotes(workflow, registry, [f"{name}={address}" for name in classes])
    runner = RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store,
                          **runner_options)
    with runner:
        return executor.run(workflow, node_runner=runner), runner


def test_sampler_and_decode_remote_build_only_the_text_encoders_here(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = sd15_workflow()
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, _ = split_run(document, models_dir, tmp_path / "split", inputs_dir, registry, worker_address)
    assert_same_outputs(local, split, ["6", "7"])
    checkpoint, lora = split.outputs["1"], split.outputs["2"]
    assert all(isinstance(handle, LazyModel) for handle in (*checkpoint, *lora))
    built = {(handle.node_id, handle.index) for handle in (*checkpoint, *lora) if handle.loaded}
    assert built == {("1", 1), ("2", 1)}, "only the CLIPs (base and LoRA'd) are needed here"


def test_the_recipes_sent_carry_fingerprints_read_from_the_file(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    split, runner = split_run(sd15_workflow(), models_dir, tmp_path, inputs_dir, registry, worker_address)
    whole = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    vae_recipe = runner.recipe_of(split.outputs["1"][2])
    assert vae_recipe is not None and vae_recipe["fingerprint"] == fingerprint(whole.vae)
    lora_model = runner.recipe_of(split.outputs["2"][0])
    assert lora_model is not None
    base = lora_model["steps"][0]["kwargs"]["model"][RECIPE_TAG]
    assert base["fingerprint"] == fingerprint(whole.model)  # the worker checks the base it builds
    assert not split.outputs["1"][0].loaded and not split.outputs["1"][2].loaded


def test_a_base_fingerprint_that_does_not_match_is_refused_by_the_worker(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    """The base fingerprint in a LoRA recipe is checked when the worker builds the base."""
    from diffsplit.remote.builder import ModelBuilder
    from diffsplit.remote.cache import ModelCache
    from diffsplit.remote.errors import BadRequest

    split, runner = split_run(sd15_workflow(), models_dir, tmp_path, inputs_dir, registry, worker_address)
    recipe = runner.recipe_of(split.outputs["2"][0])
    assert recipe is not None
    step = recipe["steps"][0]
    base = step["kwargs"]["model"][RECIPE_TAG]
    wrong = {**base, "fingerprint": "0" * 64}
    bad = {**recipe, "steps": [{**step, "kwargs": {**step["kwargs"], "model": {RECIPE_TAG: wrong}}}]}
    builder = ModelBuilder(ModelStore(models_dir), registry, ModelCache(1 << 30))
    builder.build(recipe)  # as sent: builds
    with pytest.raises(BadRequest, match="differs"):
        ModelBuilder(ModelStore(models_dir), registry, ModelCache(1 << 30)).build(bad)


def test_a_node_that_falls_back_here_builds_what_it_needs(
    models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = sd15_workflow()
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, runner = split_run(document, models_dir, tmp_path / "split", inputs_dir, registry,
                              "tcp://127.0.0.1:9", fallback_local=True, timeout_s=5.0)
    assert_same_outputs(local, split, ["6", "7"])
    assert split.outputs["2"][0].loaded and split.outputs["1"][2].loaded
    assert runner.placement("6") == "local"


def test_a_broken_checkpoint_is_reported_by_its_loader_node_before_anything_is_sent(
    models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    store_dir = tmp_path / "models"
    (store_dir / "checkpoints").mkdir(parents=True)
    (store_dir / "loras").mkdir()
    (store_dir / "checkpoints" / "tiny-sd15.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (store_dir / "loras" / "tiny-sd15-lora.safetensors").write_bytes(
        (models_dir / "loras" / "tiny-sd15-lora.safetensors").read_bytes())
    with pytest.raises(NodeFailed) as caught:
        split_run(sd15_workflow(), store_dir, tmp_path / "out", inputs_dir, registry, "tcp://127.0.0.1:9")
    assert caught.value.node_id == "1" and "CheckpointLoaderSimple" in str(caught.value)


def test_eager_loaders_on_request(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    split, _ = split_run(sd15_workflow(), models_dir, tmp_path, inputs_dir, registry, worker_address,
                         lazy_loaders=False)
    assert not any(isinstance(value, LazyModel) for value in split.outputs["1"])
    assert materialised(split.outputs["1"][0]) is split.outputs["1"][0]
