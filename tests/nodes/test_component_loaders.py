"""UNETLoader, CLIPLoader, DualCLIPLoader and CheckpointLoader: ComfyUI's inputs, the checkpoint's images."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from diffsplit.engine.errors import ModelFileError, NodeFailed
from diffsplit.engine.example_workflows import separate_files_workflow
from diffsplit.engine.executor import Executor, RunResult
from diffsplit.engine.extra_paths import open_store
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.component_loaders import (
    CHECKPOINT_LOADER,
    CLIP_LOADER,
    DUAL_CLIP_LOADER,
    NODES,
    UNET_LOADER,
)
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.types import ModelSampling


@dataclass
class StoreContext:
    """The part of a NodeContext that loader nodes use: model files from a real store."""

    store: ModelStore
    node_id: str = "1"

    def model_path(self, folder: str, name: str) -> Path:
        return self.store.resolve(folder, name)


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    return default_registry()


@pytest.fixture
def context(models_dir: Path, tmp_path: Path) -> StoreContext:
    return StoreContext(ModelStore(models_dir, index_path=tmp_path / "index.json"))


@pytest.fixture
def linked_root(models_dir: Path, tmp_path: Path) -> Path:
    """A models folder whose checkpoints are the tiny set's (linked), with a configs folder of its own."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "checkpoints").symlink_to(models_dir / "checkpoints", target_is_directory=True)
    (root / "configs").mkdir()
    shutil.copy(models_dir / "configs" / "v1-inference.yaml", root / "configs")
    return root


def run(document: dict[str, Any], models: Path, registry: NodeRegistry, tmp_path: Path) -> RunResult:
    store = ModelStore(models, index_path=tmp_path / "index.json")
    executor = Executor(registry, store, output_dir=tmp_path / "out", max_workers=1)
    return executor.run(load_workflow(document, registry))


def image(result: RunResult) -> torch.Tensor:
    return result.outputs["7"][0]


def test_declarations_match_comfyui() -> None:
    assert all(node.is_loader for node in NODES)
    assert [(s.name, s.model_folder) for s in UNET_LOADER.inputs] == [
        ("unet_name", "diffusion_models"), ("weight_dtype", None)]
    dtypes = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
    assert UNET_LOADER.input("weight_dtype").choices == dtypes
    assert [s.name for s in CLIP_LOADER.inputs] == ["clip_name", "type", "device"]
    assert CLIP_LOADER.input("clip_name").model_folder == "text_encoders"
    assert CLIP_LOADER.input("type").choices[:3] == ("stable_diffusion", "stable_cascade", "sd3")
    assert [s.name for s in DUAL_CLIP_LOADER.inputs] == ["clip_name1", "clip_name2", "type", "device"]
    assert DUAL_CLIP_LOADER.input("type").choices[:3] == ("sdxl", "sd3", "flux")
    for node in (CLIP_LOADER, DUAL_CLIP_LOADER):
        device = node.input("device")
        assert device.optional and device.choices == ("default", "cpu") and device.default == "default"
    assert [(s.name, s.model_folder) for s in CHECKPOINT_LOADER.inputs] == [
        ("config_name", "configs"), ("ckpt_name", "checkpoints")]
    assert [o.type for o in CHECKPOINT_LOADER.outputs] == ["MODEL", "CLIP", "VAE"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_separate_files_give_the_checkpoints_images_bit_for_bit(
    models_dir: Path, registry: NodeRegistry, tmp_path: Path, family: str
) -> None:
    separate = run(separate_files_workflow(family), models_dir, registry, tmp_path / "separate")
    whole = run(separate_files_workflow(family, separate=False), models_dir, registry, tmp_path / "whole")
    assert image(separate).shape == (1, 64, 64, 3)
    assert torch.equal(separate.outputs["6"][0]["samples"], whole.outputs["6"][0]["samples"])
    assert torch.equal(image(separate), image(whole))


def test_dual_clip_order_does_not_matter(models_dir: Path, registry: NodeRegistry, tmp_path: Path) -> None:
    straight = run(separate_files_workflow("sdxl"), models_dir, registry, tmp_path / "a")
    swapped = run(separate_files_workflow("sdxl", swap_clips=True), models_dir, registry, tmp_path / "b")
    assert torch.equal(straight.outputs["3"][0][0][0], swapped.outputs["3"][0][0][0])
    assert torch.equal(image(straight), image(swapped))


def test_fp8_weights_change_the_image(models_dir: Path, registry: NodeRegistry, tmp_path: Path) -> None:
    default = run(separate_files_workflow("sd15"), models_dir, registry, tmp_path / "a")
    document = separate_files_workflow("sd15", weight_dtype="fp8_e4m3fn")
    fp8 = run(document, models_dir, registry, tmp_path / "b")
    assert not torch.equal(image(default), image(fp8))


@pytest.mark.parametrize(("node", "inputs", "type_name"), [
    (CLIP_LOADER, {"clip_name": "tiny-clip-l.safetensors"}, "sd3"),
    (DUAL_CLIP_LOADER, {"clip_name1": "tiny-sdxl-clip-l.safetensors",
                        "clip_name2": "tiny-sdxl-clip-g.safetensors"}, "flux"),
])  # fmt: skip
def test_unsupported_types_fail_naming_the_type(
    context: StoreContext, node, inputs: dict[str, str], type_name: str
) -> None:
    with pytest.raises(ValueError, match=f"type '{type_name}' is not supported: diffsplit's {node.name}"):
        node.function(context, **inputs, type=type_name)


def test_an_unsupported_type_fails_the_run_naming_node_and_type(
    models_dir: Path, registry: NodeRegistry, tmp_path: Path
) -> None:
    document = separate_files_workflow("sd15")
    document["2"]["inputs"]["type"] = "wan"
    with pytest.raises(NodeFailed, match=r"node 2 \(CLIPLoader\) failed: .*type 'wan' is not supported"):
        run(document, models_dir, registry, tmp_path)


@pytest.fixture
def wrong_files(models_dir: Path, tmp_path: Path) -> StoreContext:
    """A store whose diffusion_models/ and text_encoders/ hold files of the wrong kind (links)."""
    root = tmp_path / "wrong"
    for folder, file in (("diffusion_models", "vae/tiny-sd15-vae.safetensors"),
                         ("text_encoders", "diffusion_models/tiny-sd15-unet.safetensors")):  # fmt: skip
        (root / folder).mkdir(parents=True)
        (root / folder / "wrong.safetensors").symlink_to(models_dir / file)
    return StoreContext(ModelStore(root, index_path=tmp_path / "index.json"), node_id="4")


def test_wrong_file_kinds_fail_naming_the_input_and_file(wrong_files: StoreContext) -> None:
    with pytest.raises(ModelFileError, match=r"unet_name 'wrong\.safetensors': .*wrong\.safetensors: .*VAE"):
        UNET_LOADER.function(wrong_files, unet_name="wrong.safetensors", weight_dtype="default")
    with pytest.raises(ModelFileError, match=r"clip_name 'wrong\.safetensors': .* a diffusion model"):
        CLIP_LOADER.function(wrong_files, clip_name="wrong.safetensors", type="stable_diffusion")


def test_legacy_unet_and_clip_folders_and_extra_paths_list_the_same_models(
    models_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "legacy"
    (root / "unet").mkdir(parents=True)
    (root / "clip").mkdir()
    (root / "unet" / "u.safetensors").symlink_to(models_dir / "diffusion_models/tiny-sd15-unet.safetensors")
    (root / "clip" / "c.safetensors").symlink_to(models_dir / "text_encoders/tiny-clip-l.safetensors")
    extra = tmp_path / "elsewhere"
    (extra / "te").mkdir(parents=True)
    (extra / "te" / "g.safetensors").symlink_to(models_dir / "text_encoders/tiny-sdxl-clip-g.safetensors")
    (extra / "dm").mkdir()
    (extra / "dm" / "x.safetensors").symlink_to(models_dir / "diffusion_models/tiny-sdxl-unet.safetensors")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"comfyui:\n    base_path: {extra}\n    text_encoders: te\n    diffusion_models: dm\n")
    store = open_store(root, config)
    assert store.names("diffusion_models") == store.names("unet") == ["u.safetensors", "x.safetensors"]
    assert store.names("text_encoders") == store.names("clip") == ["c.safetensors", "g.safetensors"]
    context = StoreContext(store)
    (model,) = UNET_LOADER.function(context, unet_name="u.safetensors", weight_dtype="default")
    (clip,) = CLIP_LOADER.function(context, clip_name="c.safetensors", type="stable_diffusion")
    assert model.family == "sd15" and clip.family == "sd15"
    assert store.find(name="g.safetensors").name == "g.safetensors"  # one model, though two folders list it


def test_checkpoint_loader_with_the_v1_config_is_checkpoint_loader_simple(
    linked_root: Path, registry: NodeRegistry, tmp_path: Path
) -> None:
    simple = run(separate_files_workflow("sd15", separate=False), linked_root, registry, tmp_path / "a")
    document = separate_files_workflow("sd15", separate=False)
    document["1"] = {"class_type": "CheckpointLoader",
                     "inputs": {"config_name": "v1-inference.yaml", "ckpt_name": "tiny-sd15.safetensors"}}
    legacy = run(document, linked_root, registry, tmp_path / "b")
    assert legacy.outputs["1"][0].sampling == ModelSampling()
    assert torch.equal(image(simple), image(legacy))


def test_a_v_prediction_config_changes_the_models_sampling(
    linked_root: Path, registry: NodeRegistry, tmp_path: Path
) -> None:
    document = yaml.safe_load((linked_root / "configs/v1-inference.yaml").read_text())
    document["model"]["params"]["parameterization"] = "v"
    (linked_root / "configs/v-inference.yaml").write_text(yaml.safe_dump(document))
    workflow = separate_files_workflow("sd15", separate=False)
    eps = run(workflow, linked_root, registry, tmp_path / "eps")
    workflow["1"] = {"class_type": "CheckpointLoader",
                     "inputs": {"config_name": "v-inference.yaml", "ckpt_name": "tiny-sd15.safetensors"}}
    v = run(workflow, linked_root, registry, tmp_path / "v")
    assert v.outputs["1"][0].sampling.prediction_type == "v_prediction"
    assert not torch.equal(image(eps), image(v))


def test_a_config_that_is_not_an_ldm_config_fails_naming_it(linked_root: Path, tmp_path: Path) -> None:
    (linked_root / "configs" / "sdxl.yaml").write_text(
        "model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params: {}\n")
    context = StoreContext(ModelStore(linked_root, index_path=tmp_path / "index.json"))
    with pytest.raises(ModelFileError, match=r"config_name 'sdxl\.yaml': .*sdxl\.yaml: not an LDM config"):
        CHECKPOINT_LOADER.function(context, config_name="sdxl.yaml", ckpt_name="tiny-sd15.safetensors")


def test_configs_lists_yaml_files_only(linked_root: Path, tmp_path: Path) -> None:
    (linked_root / "configs" / "notes.txt").write_text("not a config")
    store = ModelStore(linked_root, index_path=tmp_path / "index.json")
    assert store.names("configs") == ["v1-inference.yaml"]
    assert "tiny-sd15.safetensors" in store.names("checkpoints")


def test_editor_widgets_map_onto_comfyuis_inputs(registry: NodeRegistry) -> None:
    def ui_node(node_id: int, class_type: str, *values: str) -> dict[str, Any]:
        return {"id": node_id, "type": class_type, "widgets_values": list(values),
                "inputs": [], "outputs": []}  # fmt: skip

    document = {"nodes": [
        ui_node(1, "DualCLIPLoader", "g.safetensors", "l.safetensors", "sdxl"),  # saved before 'device'
        ui_node(2, "CLIPLoader", "l.safetensors", "stable_diffusion", "cpu"),
        ui_node(3, "UNETLoader", "u.safetensors", "fp8_e5m2"),
        ui_node(4, "CheckpointLoader", "v1-inference.yaml", "c.safetensors"),
    ], "links": [], "version": 0.4}  # fmt: skip
    nodes = load_workflow(document, registry).nodes
    assert nodes["1"].inputs == {"clip_name1": "g.safetensors", "clip_name2": "l.safetensors", "type": "sdxl",
                                 "device": "default"}  # fmt: skip
    assert nodes["2"].inputs == {"clip_name": "l.safetensors", "type": "stable_diffusion", "device": "cpu"}
    assert nodes["3"].inputs == {"unet_name": "u.safetensors", "weight_dtype": "fp8_e5m2"}
    assert nodes["4"].inputs == {"config_name": "v1-inference.yaml", "ckpt_name": "c.safetensors"}
