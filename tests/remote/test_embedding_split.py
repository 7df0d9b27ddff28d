"""Embeddings in offloaded text encoders: the worker uses the client's file (by sha256) or fails naming it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import NodeFailed
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.models.tiny_embeddings import SD15_EMBEDDING_FILE, write_tiny_embeddings
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RemoteNodeError
from diffsplit.engine.store import ModelStore

from diffsplit.demo import local_worker

from .test_split_runs import assert_same_outputs, run_workflow

LOGGER = "diffsplit.engine.nodes.prompt_embeddings"


def embedding_workflow(*, lora: bool = True) -> dict[str, Any]:
    """SD 1.5 text-to-image naming an SD 1.5 embedding, an SDXL one (CLIP-L part) and a missing one."""
    document = sd15_workflow(lora=lora, steps=2)
    document["3"]["inputs"]["text"] = "a red fox embedding:tiny-sd15-embedding in snow"
    document["4"]["inputs"]["text"] = "(embedding:tiny-sdxl-embedding:0.8) blurry embedding:not-in-any-store"
    return document


def _same_conditioning(first: list, second: list) -> bool:
    return all(
        torch.equal(a_cond, b_cond) and torch.equal(a_extras["pooled_output"], b_extras["pooled_output"])
        for (a_cond, a_extras), (b_cond, b_extras) in zip(first, second, strict=True)
    )


def test_text_encode_and_sampler_on_worker_equal_local_bit_for_bit(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    document = embedding_workflow()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    local_warnings = [record.message for record in caplog.records]
    caplog.clear()
    remote = [f"CLIPTextEncode={worker_address}", f"KSampler={worker_address}"]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                     remote=remote)
    assert set(runner.stats) == {"3", "4", "6"}
    for node_id in ("3", "4"):
        assert _same_conditioning(local.outputs[node_id][0], split.outputs[node_id][0]), node_id
    assert_same_outputs(local, split, ["6", "7"])
    # both runs found the two tiny embeddings; the missing one is the same one warning, here from the
    # client that looked it up
    assert local_warnings == [record.message for record in caplog.records]
    (warning,) = local_warnings
    assert "node 4 (CLIPTextEncode)" in warning and "'not-in-any-store'" in warning


@pytest.fixture(scope="module")
def other_embedding_store(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A worker's store holding another file under the client's embedding name."""
    root = tmp_path_factory.mktemp("worker-other-embedding")
    (root / "checkpoints").mkdir()
    shutil.copy(models_dir / "checkpoints" / "tiny-sd15.safetensors", root / "checkpoints")
    write_tiny_embeddings(root / "embeddings", seed=1)
    return root


def test_a_worker_with_another_file_under_the_name_fails_naming_it(
    other_embedding_store: Path, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    ours = models_dir / "embeddings" / SD15_EMBEDDING_FILE
    theirs = other_embedding_store / "embeddings" / SD15_EMBEDDING_FILE
    assert ours.read_bytes() != theirs.read_bytes()
    with local_worker(other_embedding_store) as address, pytest.raises(NodeFailed) as caught:
        run_workflow(embedding_workflow(lora=False), models_dir, tmp_path, inputs_dir, registry,
                     remote=[f"3={address}"])
    error = caught.value.__cause__
    assert isinstance(error, RemoteNodeError) and error.kind == "MissingModel"
    assert error.error["name"] == f"embeddings/{SD15_EMBEDDING_FILE}"
    assert error.error["sha256"] == ModelStore(models_dir).sha256(ours)
    assert "node 3 (CLIPTextEncode)" in str(error) and SD15_EMBEDDING_FILE in str(error)
