"""Split == local for workflows built from separate model files: the worker rebuilds every loader.

UNETLoader, CLIPLoader, DualCLIPLoader, VAELoader and CheckpointLoader (with its
``.yaml`` config, found by sha256 in the worker's ``configs/``) feed a KSampler,
CLIPTextEncode and VAEDecode that run on a real worker process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from diffsplit.engine.example_workflows import separate_files_workflow
from diffsplit.engine.nodes.registry import NodeRegistry

from diffsplit.demo import local_worker

from .test_split_runs import assert_same_outputs, run_workflow

REMOTE = ("KSampler", "CLIPTextEncode", "VAEDecode")


@pytest.fixture(scope="module")
def models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny set (linked folder by folder) plus a v-prediction LDM config."""
    root = tmp_path_factory.mktemp("component-models")
    for folder in models_dir.iterdir():
        if folder.is_dir() and folder.name != "configs" and not folder.name.startswith("."):
            (root / folder.name).symlink_to(folder, target_is_directory=True)
    (root / "configs").mkdir()
    text = (models_dir / "configs" / "v1-inference.yaml").read_text()
    (root / "configs" / "v1-inference.yaml").write_text(text)
    document = yaml.safe_load(text)
    document["model"]["params"]["parameterization"] = "v"
    (root / "configs" / "v-inference.yaml").write_text(yaml.safe_dump(document))
    return root


@pytest.fixture(scope="module")
def worker(models: Path) -> Iterator[str]:
    """A worker process serving that folder."""
    with local_worker(models) as address:
        yield address


def remote(address: str) -> list[str]:
    return [f"{class_type}={address}" for class_type in REMOTE]


def assert_same_conditioning(local, split, node_id: str) -> None:
    (local_cond,), (split_cond,) = local.outputs[node_id][0], split.outputs[node_id][0]
    assert torch.equal(local_cond[0], split_cond[0])
    assert local_cond[1].keys() == split_cond[1].keys()
    for key, value in local_cond[1].items():
        other = split_cond[1][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize(("family", "options"), [
    ("sdxl", {"swap_clips": True}),  # UNETLoader + DualCLIPLoader (CLIP-G first) + VAELoader
    ("sd15", {"weight_dtype": "fp8_e4m3fn"}),  # UNETLoader (fp8) + CLIPLoader + VAELoader
])  # fmt: skip
def test_separate_file_loaders_are_rebuilt_on_the_worker(
    worker: str, models: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry,
    family: str, options: dict,
) -> None:
    document = separate_files_workflow(family, **options)
    local, _ = run_workflow(document, models, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models, tmp_path / "split", inputs_dir, registry,
                                 remote=remote(worker))
    assert set(runner.stats) == {"3", "4", "6", "7"}
    assert_same_conditioning(local, split, "3")
    assert_same_outputs(local, split, ["6", "7"])


def test_checkpoint_loader_config_travels_to_the_worker(
    worker: str, models: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = separate_files_workflow("sd15", separate=False)
    document["1"] = {"class_type": "CheckpointLoader",
                     "inputs": {"config_name": "v-inference.yaml", "ckpt_name": "tiny-sd15.safetensors"}}
    local, _ = run_workflow(document, models, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models, tmp_path / "split", inputs_dir, registry,
                                 remote=remote(worker))
    assert local.outputs["1"][0].sampling.prediction_type == "v_prediction"
    assert set(runner.stats) == {"3", "4", "6", "7"}
    assert_same_outputs(local, split, ["6", "7"])
    plain = separate_files_workflow("sd15", separate=False)
    eps, _ = run_workflow(plain, models, tmp_path / "eps", inputs_dir, registry)
    assert not torch.equal(eps.outputs["7"][0], split.outputs["7"][0])  # the worker ran v-prediction
