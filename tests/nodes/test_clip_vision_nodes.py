"""CLIPVisionLoader, CLIPVisionEncode, unCLIPConditioning, unCLIPCheckpointLoader on the tiny set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import ModelFileError, NodeFailed
from diffsplit.engine.executor import Executor
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.models.clip_vision import vision_metadata, vision_tensors
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.engine.models.tiny_clip_vision import TINY_CLIP_VISION_FILE
from diffsplit.engine.nodes.clip_vision import (
    CLIP_VISION_ENCODE,
    CLIP_VISION_LOADER,
    UNCLIP_CHECKPOINT_LOADER,
    UNCLIP_CONDITIONING,
)
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.nodes.sampling import KSAMPLER, KSAMPLER_ADVANCED
from diffsplit.engine.rebuild import build, store_resolver
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.engine.types import ClipVision, DiffusionModel
from diffsplit.tracer.recipe import Recipe
from PIL import Image
from safetensors import safe_open


@dataclass
class StoreContext:
    """The parts of a NodeContext these nodes use."""

    store: ModelStore
    node_id: str = "1"

    def model_path(self, folder: str, name: str) -> Path:
        return self.store.resolve(folder, name)

    def progress(self, step: int, total: int) -> None:
        pass


@pytest.fixture(autouse=True)
def single_thread(one_torch_thread: None) -> None:
    """Tiny models run fastest on one thread on a shared machine (``one_torch_thread``)."""


@pytest.fixture(scope="module")
def context(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> StoreContext:
    index = tmp_path_factory.mktemp("clip-vision-index") / "index.json"
    return StoreContext(ModelStore(models_dir, index_path=index))


@pytest.fixture(scope="module")
def clip_vision(context: StoreContext) -> ClipVision:
    (loaded,) = CLIP_VISION_LOADER.function(context, clip_name=TINY_CLIP_VISION_FILE)
    return loaded


@pytest.fixture(scope="module")
def vision_output(context: StoreContext, clip_vision: ClipVision) -> dict[str, torch.Tensor]:
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(4))
    (output,) = CLIP_VISION_ENCODE.function(context, clip_vision=clip_vision, image=image, crop="center")
    return output


def _model(models_dir: Path, family: str) -> DiffusionModel:
    name = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl", "sdxl_refiner": "tiny-sdxl-refiner"}[family]
    return load_checkpoint(models_dir / "checkpoints" / f"{name}.safetensors").model


def _conditioning(model: DiffusionModel, seed: int) -> list[list[Any]]:
    generator = torch.Generator().manual_seed(seed)
    config = model.unet.config
    cond = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    if model.family == "sd15":
        return [[cond, {}]]
    return [[cond, {"pooled_output": torch.randn(1, 128, generator=generator)}]]


def _sample(model: DiffusionModel, positive: Any, negative: Any, seed: int = 11) -> torch.Tensor:
    (latent,) = KSAMPLER.function(
        StoreContext(store=None), model=model, seed=seed, steps=2, cfg=4.0, sampler_name="euler",
        scheduler="normal", positive=positive, negative=negative,
        latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0,
    )  # fmt: skip
    return latent["samples"]


def _unclip(conditioning: Any, output: dict, strength: float, noise_augmentation: float = 0.0) -> Any:
    (applied,) = UNCLIP_CONDITIONING.function(
        None, conditioning=conditioning, clip_vision_output=output, strength=strength,
        noise_augmentation=noise_augmentation,
    )  # fmt: skip
    return applied


def test_unclip_conditioning_appends_to_copies_of_each_entry(vision_output: dict) -> None:
    earlier = {"clip_vision_output": vision_output, "strength": 0.5, "noise_augmentation": 0.1}
    conditioning = [
        [torch.zeros(1, 2, 3), {"unclip_conditioning": [earlier]}],
        [torch.ones(1, 2, 3), {"x": 1}],
    ]
    applied = _unclip(conditioning, vision_output, 0.75, 0.25)
    added = {"clip_vision_output": vision_output, "strength": 0.75, "noise_augmentation": 0.25}
    assert applied[0][1]["unclip_conditioning"] == [earlier, added]
    assert applied[1][1] == {"x": 1, "unclip_conditioning": [added]}
    assert applied[0][0] is conditioning[0][0]
    assert conditioning[0][1] == {"unclip_conditioning": [earlier]} and conditioning[1][1] == {"x": 1}
    assert _unclip(conditioning, vision_output, 0.0) is conditioning


@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_unclip_steers_sdxl_and_strength_zero_equals_none(
    family: str, models_dir: Path, vision_output: dict
) -> None:
    model = _model(models_dir, family)
    positive, negative = _conditioning(model, 1), _conditioning(model, 2)
    plain = _sample(model, positive, negative)
    revision = _sample(model, _unclip(positive, vision_output, 0.75), negative)
    assert not torch.equal(revision, plain)
    assert torch.equal(_sample(model, _unclip(positive, vision_output, 0.0), negative), plain)
    noisy = _sample(model, _unclip(positive, vision_output, 0.75, 0.6), negative)
    assert not torch.equal(noisy, revision)
    # the augmentation noise comes from the sampler's seed (ComfyUI: seed - 10)
    noisy_again = _sample(model, _unclip(positive, vision_output, 0.75, 0.6), negative)
    assert torch.equal(noisy, noisy_again)
    # the text's pooled output is replaced: another pooled output changes nothing
    other = [[positive[0][0], {"pooled_output": torch.zeros(1, 128)}]]
    assert torch.equal(_sample(model, _unclip(other, vision_output, 0.75), negative), revision)


def test_sd15_ignores_unclip_as_comfyui_does(models_dir: Path, vision_output: dict) -> None:
    model = _model(models_dir, "sd15")
    positive, negative = _conditioning(model, 1), _conditioning(model, 2)
    assert torch.equal(_sample(model, _unclip(positive, vision_output, 1.0), negative),
                       _sample(model, positive, negative))


def test_encode_checks_its_inputs(context: StoreContext, clip_vision: ClipVision) -> None:
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match="input 'clip_vision' is nothing"):
        CLIP_VISION_ENCODE.function(context, clip_vision=None, image=image, crop="center")
    with pytest.raises(ValueError, match="input 'crop' is 'left'"):
        CLIP_VISION_ENCODE.function(context, clip_vision=clip_vision, image=image, crop="left")
    with pytest.raises(ValueError, match="input 'image': expected an IMAGE"):
        CLIP_VISION_ENCODE.function(context, clip_vision=clip_vision, image=image[..., 0], crop="none")
    with pytest.raises(ValueError, match="input 'clip_vision_output' holds no image_embeds"):
        _unclip([[torch.zeros(1, 2, 3), {}]], {}, 1.0)


def _with_vision(source: Path, dest: Path, clip_vision: ClipVision, *, open_clip: bool, prefix: str) -> None:
    with safe_open(str(source), "pt") as opened:
        tensors = {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118
        metadata = dict(opened.metadata() or {})
    tensors.update(vision_tensors(clip_vision, open_clip=open_clip, prefix=prefix))
    metadata.update(vision_metadata(clip_vision, open_clip=open_clip))
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file_sorted(tensors, dest, metadata=metadata)


@pytest.fixture(scope="module")
def unclip_store(models_dir: Path, clip_vision: ClipVision, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unclip-models")
    sdxl = models_dir / "checkpoints" / "tiny-sdxl.safetensors"
    checkpoints = root / "checkpoints"
    _with_vision(sdxl, checkpoints / "sdxl-open-clip-vision.safetensors", clip_vision,
                 open_clip=True, prefix="embedder.model.visual.")
    _with_vision(sdxl, checkpoints / "sdxl-hf-vision.safetensors", clip_vision, open_clip=False, prefix="")
    (checkpoints / "plain-sdxl.safetensors").symlink_to(sdxl)
    with safe_open(str(models_dir / "checkpoints" / "tiny-sd15.safetensors"), "pt") as opened:
        sd2_like = {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118
    sd2_like["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(128, 2048)
    save_file_sorted(sd2_like, checkpoints / "sd21-unclip-like.safetensors")
    (root / "clip_vision").mkdir()
    (root / "clip_vision" / "a-vae.safetensors").symlink_to(models_dir / "vae" / "tiny-vae.safetensors")
    return root


@pytest.mark.parametrize("name", ["sdxl-open-clip-vision.safetensors", "sdxl-hf-vision.safetensors"])
def test_unclip_checkpoint_loader_gives_the_embedded_clip_vision(
    name: str, unclip_store: Path, clip_vision: ClipVision
) -> None:
    ctx = StoreContext(ModelStore(unclip_store, index_path=unclip_store / "index.json"))
    model, clip, vae, embedded = UNCLIP_CHECKPOINT_LOADER.function(ctx, ckpt_name=name)
    assert model.family == "sdxl" and clip.family == "sdxl" and vae.scaling_factor == pytest.approx(0.13025)
    assert isinstance(embedded, ClipVision)
    expected = clip_vision.model.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in embedded.model.state_dict().items())


def test_unclip_checkpoint_loader_without_vision_gives_none_and_encode_says_so(
    unclip_store: Path, tmp_path: Path
) -> None:
    store = ModelStore(unclip_store, index_path=tmp_path / "index.json")
    *_, embedded = UNCLIP_CHECKPOINT_LOADER.function(StoreContext(store), ckpt_name="plain-sdxl.safetensors")
    assert embedded is None
    document = {
        "1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "plain-sdxl.safetensors"}},
        "3": {"class_type": "CLIPVisionEncode",
              "inputs": {"clip_vision": ["1", 3], "image": ["4", 0], "crop": "center"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "picture.png"}},
    }
    inputs = tmp_path / "input"
    inputs.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 90)).save(inputs / "picture.png")
    registry = default_registry()
    executor = Executor(registry, store, inputs_dir=inputs, output_dir=tmp_path / "out", max_workers=1)
    expected = r"node 3 \(CLIPVisionEncode\) failed: .*input 'clip_vision' is nothing"
    with pytest.raises(NodeFailed, match=expected):
        executor.run(load_workflow(document, registry), targets=["3"])


def test_sd2_unclip_checkpoints_and_non_vision_files_fail_clearly(unclip_store: Path, tmp_path: Path) -> None:
    ctx = StoreContext(ModelStore(unclip_store, index_path=tmp_path / "index.json"))
    with pytest.raises(ModelFileError, match=r"input 'ckpt_name'.*SD 2\.x unCLIP checkpoint.*not supported"):
        UNCLIP_CHECKPOINT_LOADER.function(ctx, ckpt_name="sd21-unclip-like.safetensors")
    expected = r"input 'clip_name' \('a-vae.safetensors'\): .*a-vae.safetensors: not a CLIP vision file"
    with pytest.raises(ModelFileError, match=expected):
        CLIP_VISION_LOADER.function(ctx, clip_name="a-vae.safetensors")


def test_unclip_checkpoint_loader_outputs_rebuild_from_their_recipes(
    unclip_store: Path, clip_vision: ClipVision, tmp_path: Path
) -> None:
    registry = default_registry()
    store = ModelStore(unclip_store, index_path=tmp_path / "index.json")
    document = {"1": {"class_type": "unCLIPCheckpointLoader",
                      "inputs": {"ckpt_name": "sdxl-open-clip-vision.safetensors"}}}
    recipe_for = output_recipe_source(load_workflow(document, registry), registry, store)
    rebuilt = build(Recipe.from_dict(recipe_for("1", 3)), store_resolver(store), registry=registry)
    assert isinstance(rebuilt, ClipVision)
    expected = clip_vision.model.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in rebuilt.model.state_dict().items())
    model = build(Recipe.from_dict(recipe_for("1", 0)), store_resolver(store), registry=registry)
    assert isinstance(model, DiffusionModel) and model.family == "sdxl"


def test_the_augmentation_noise_follows_the_sampler_seed(models_dir: Path, vision_output: dict) -> None:
    """With no start noise and a deterministic sampler, only unCLIP's seeded noise depends on the seed."""
    model = _model(models_dir, "sdxl")
    positive, negative = _conditioning(model, 1), _conditioning(model, 2)

    def sample(conditioning: Any, seed: int) -> torch.Tensor:
        (latent,) = KSAMPLER_ADVANCED.function(
            StoreContext(store=None), model=model, add_noise="disable", noise_seed=seed, steps=2, cfg=4.0,
            sampler_name="euler", scheduler="normal", positive=conditioning, negative=negative,
            latent_image={"samples": torch.ones(1, 4, 8, 8)}, start_at_step=0, end_at_step=10000,
            return_with_leftover_noise="disable",
        )  # fmt: skip
        return latent["samples"]

    assert torch.equal(sample(positive, 1), sample(positive, 2))
    noisy = _unclip(positive, vision_output, 1.0, 0.5)
    assert not torch.equal(sample(noisy, 1), sample(noisy, 2))
    clean = _unclip(positive, vision_output, 1.0, 0.0)  # level 0 still draws noise, scaled by sqrt(beta_0)
    assert not torch.equal(sample(clean, 1), sample(clean, 2))
