"""UpscaleModelLoader and ImageUpscaleWithModel with the tiny ESRGAN, and the tiled blending they use."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError, WorkflowError
from diffsplit.engine.models.esrgan import to_old_layout
from diffsplit.engine.models.tiny_upscale import TINY_ESRGAN_FILE, write_tiny_esrgan
from diffsplit.engine.models.upscale_models import load_upscale_model, read_upscale_state
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.nodes.tiling import feather_mask, tile_count, tile_starts, tiled_scale
from diffsplit.engine.nodes.upscale_model import (
    IMAGE_UPSCALE_WITH_MODEL,
    UPSCALE_MODEL_LOADER,
    run_upscale_model,
    upscale_image,
)
from diffsplit.engine.store import ModelStore
from diffsplit.engine.types import UpscaleModel
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.owned_memory import is_owned
from safetensors.torch import save_file


@dataclass
class StoreContext:
    """The parts of a NodeContext these nodes use: model files from a real store, progress."""

    store: ModelStore
    node_id: str = "13"
    reports: list[tuple[int, int]] = field(default_factory=list)

    def model_path(self, folder: str, name: str) -> Path:
        return self.store.resolve(folder, name)

    def progress(self, step: int, total: int) -> None:
        self.reports.append((step, total))


@pytest.fixture(autouse=True)
def single_thread(one_torch_thread: None) -> None:
    """Tiny models run fastest on one thread on a shared machine (``one_torch_thread``)."""


@pytest.fixture
def context(models_dir: Path, tmp_path: Path) -> StoreContext:
    return StoreContext(ModelStore(models_dir, index_path=tmp_path / "index.json"))


@pytest.fixture(scope="module")
def upscaler(models_dir: Path) -> UpscaleModel:
    return load_upscale_model(models_dir / "upscale_models" / TINY_ESRGAN_FILE)


def _image(height: int, width: int, batch: int = 1, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, height, width, channels), generator=torch.Generator().manual_seed(seed))


def test_declarations_match_comfyui() -> None:
    registry = default_registry()
    assert registry["UpscaleModelLoader"] is UPSCALE_MODEL_LOADER
    assert registry["ImageUpscaleWithModel"] is IMAGE_UPSCALE_WITH_MODEL
    (model_name,) = UPSCALE_MODEL_LOADER.inputs
    assert (model_name.name, model_name.type) == ("model_name", "COMBO")
    assert model_name.model_folder == "upscale_models"
    assert [(o.name, o.type) for o in UPSCALE_MODEL_LOADER.outputs] == [("UPSCALE_MODEL", "UPSCALE_MODEL")]
    assert UPSCALE_MODEL_LOADER.is_loader and not IMAGE_UPSCALE_WITH_MODEL.is_loader
    assert [(i.name, i.type) for i in IMAGE_UPSCALE_WITH_MODEL.inputs] == [
        ("upscale_model", "UPSCALE_MODEL"), ("image", "IMAGE")]
    assert [o.type for o in IMAGE_UPSCALE_WITH_MODEL.outputs] == ["IMAGE"]


def test_loader_reads_the_tiny_file_as_a_2x_esrgan_with_owned_float32_weights(context: StoreContext) -> None:
    (model,) = UPSCALE_MODEL_LOADER.function(context, model_name=TINY_ESRGAN_FILE)
    assert isinstance(model, UpscaleModel)
    assert (model.architecture, model.scale) == ("ESRGAN", 2)
    assert (model.input_channels, model.output_channels) == (3, 3)
    assert model.tags == ("16nf", "2nb", "unshuffle") and model.size_multiple == 4
    tensors = list(model.model.state_dict().values())
    assert tensors and all(t.dtype == torch.float32 and is_owned(t) for t in tensors)
    assert not model.model.training


def test_tiny_file_is_byte_identical_for_a_seed_and_fingerprinted(
    tmp_path: Path, upscaler: UpscaleModel
) -> None:
    digests = [hashlib.sha256(write_tiny_esrgan(tmp_path / f"{n}.safetensors", seed).read_bytes()).hexdigest()
               for n, seed in enumerate((0, 0, 1))]
    assert digests[0] == digests[1] != digests[2]
    same = load_upscale_model(tmp_path / "0.safetensors")
    other = load_upscale_model(tmp_path / "2.safetensors")
    assert fingerprint(same) == fingerprint(upscaler) != fingerprint(other)


_BSRGAN_NAMES = {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2", "conv_hr": "HRconv"}


def _bsrgan_name(key: str) -> str:
    """The BSRGAN/RealSR name of a Real-ESRGAN (BasicSR) key."""
    if key.startswith("body."):
        return "RRDB_trunk." + key.removeprefix("body.").replace(".rdb", ".RDB")
    layer, _, kind = key.rpartition(".")
    return f"{_BSRGAN_NAMES.get(layer, layer)}.{kind}"


def test_every_esrgan_key_layout_loads_the_same_network(
    models_dir: Path, tmp_path: Path, upscaler: UpscaleModel
) -> None:
    state = read_upscale_state(models_dir / "upscale_models" / TINY_ESRGAN_FILE)
    assert "conv_first.weight" in state and "body.1.rdb3.conv5.weight" in state  # Real-ESRGAN's names
    old = to_old_layout(state)
    bsrgan = {_bsrgan_name(key): value for key, value in state.items()}
    assert "RRDB_trunk.0.RDB1.conv1.weight" in bsrgan and "HRconv.bias" in bsrgan
    # old layout in a Real-ESRGAN style .pth: nested under params_ema, every key prefixed with "module."
    torch.save({"params_ema": {f"module.{key}": value for key, value in old.items()}}, tmp_path / "old.pth")
    save_file(bsrgan, tmp_path / "bsrgan.safetensors")
    image = _image(20, 24).movedim(-1, 1)
    expected = run_upscale_model(upscaler, image)
    for name in ("old.pth", "bsrgan.safetensors"):
        loaded = load_upscale_model(tmp_path / name)
        assert loaded.scale == 2 and loaded.tags == upscaler.tags
        assert torch.equal(run_upscale_model(loaded, image), expected), name


def test_output_is_scale_times_the_input_in_range_and_keeps_alpha(upscaler: UpscaleModel) -> None:
    result = upscale_image(upscaler, _image(37, 29, batch=2))
    assert result.shape == (2, 74, 58, 3)
    assert result.min() >= 0.0 and result.max() <= 1.0 and result.std() > 0.01
    rgba = _image(16, 12, channels=4)
    rgba[..., 3] = torch.linspace(0, 1, 12)
    with_alpha = upscale_image(upscaler, rgba)
    assert with_alpha.shape == (1, 32, 24, 4)
    assert torch.equal(with_alpha[..., :3], upscale_image(upscaler, rgba[..., :3]))
    assert torch.allclose(with_alpha[0, 5, :, 3], torch.linspace(0, 1, 12).repeat_interleave(2), atol=0.05)


def test_an_image_within_one_tile_equals_the_untiled_model(
    upscaler: UpscaleModel, context: StoreContext
) -> None:
    image = _image(40, 52, batch=2)
    (tiled,) = IMAGE_UPSCALE_WITH_MODEL.function(context, upscale_model=upscaler, image=image)
    untiled = torch.cat([run_upscale_model(upscaler, item.movedim(-1, 0)[None]) for item in image])
    assert torch.equal(tiled, untiled.movedim(1, -1))
    assert context.reports[-1] == (2, 2)


def test_a_larger_image_tiled_stays_close_to_untiled(upscaler: UpscaleModel) -> None:
    image = _image(96, 80)
    whole = upscale_image(upscaler, image, tile=512)
    tiled = upscale_image(upscaler, image, tile=48, overlap=16)
    difference = (tiled - whole).abs()
    assert not torch.equal(tiled, whole)  # 6 tiles ran, with seams blended
    assert difference.mean() < 0.005 and difference.max() < 0.1


def test_files_that_are_not_upscale_models_fail_naming_the_file(models_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "upscale_models"
    folder.mkdir(parents=True)
    shutil.copy(models_dir / "vae" / "tiny-vae.safetensors", folder / "tiny-vae.safetensors")
    torch.save({"epoch": torch.tensor(3)}, folder / "notes.pth")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    context = StoreContext(ModelStore(tmp_path / "models", index_path=tmp_path / "index.json"))
    with pytest.raises(ModelFileError, match=r"tiny-vae\.safetensors: not an upscale model .*found 'decoder"):
        UPSCALE_MODEL_LOADER.function(context, model_name="tiny-vae.safetensors")
    with pytest.raises(ModelFileError, match=r"notes\.pth: not an upscale model .* found 'epoch'"):
        UPSCALE_MODEL_LOADER.function(context, model_name="notes.pth")
    with pytest.raises(ModelFileError, match=r"broken\.safetensors: not a readable safetensors file"):
        UPSCALE_MODEL_LOADER.function(context, model_name="broken.safetensors")
    with pytest.raises(ModelFileError, match=r'"RealESRGAN_x2\.pth" not found in upscale_models/'):
        UPSCALE_MODEL_LOADER.function(context, model_name="RealESRGAN_x2.pth")


class _Payload:
    """Something that is not a tensor: torch.load(weights_only=True) must refuse to build it."""


def test_a_pickle_with_code_objects_is_refused(tmp_path: Path) -> None:
    payload = {"params_ema": {"conv_first.weight": torch.zeros(1)}, "extra": _Payload()}
    torch.save(payload, tmp_path / "evil.pth")
    with pytest.raises(ModelFileError, match=r"evil\.pth: not a readable torch weights file"):
        load_upscale_model(tmp_path / "evil.pth")


def test_an_image_with_the_wrong_channel_count_names_the_input(upscaler: UpscaleModel) -> None:
    with pytest.raises(WorkflowError, match=r"input 'image': the upscale model reads 3-channel images; .* 1"):
        upscale_image(upscaler, _image(8, 8, channels=1))


def test_tiled_scale_blends_a_pointwise_function_back_to_the_whole() -> None:
    samples = torch.rand((2, 3, 37, 45), generator=torch.Generator().manual_seed(3))

    def nearest(piece: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(piece * 2.0, scale_factor=2, mode="nearest")

    reports: list[tuple[int, int]] = []
    tiled = tiled_scale(samples, nearest, tile=(16, 20), overlap=4, scale=2, out_channels=3,
                        progress=lambda done, total: reports.append((done, total)))
    assert torch.allclose(tiled, nearest(samples), atol=1e-6, rtol=0)
    assert list(tile_starts(37, 16, 4)) == [0, 12, 24] and list(tile_starts(16, 16, 4)) == [0]
    assert reports[-1] == (2 * tile_count(37, 45, (16, 20), 4), 2 * 9) and len(reports) == 18

    def pool(piece: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(piece, 8, ceil_mode=True)

    images = torch.rand((1, 3, 64, 96), generator=torch.Generator().manual_seed(4))
    down = tiled_scale(images, pool, tile=(32, 32), overlap=16, scale=1 / 8, out_channels=3)
    assert down.shape == (1, 3, 8, 12) and torch.allclose(down, pool(images), atol=1e-6, rtol=0)


def test_feather_masks_ramp_over_the_overlap_at_every_edge() -> None:
    mask = feather_mask(6, 10, 2)[0, 0]
    assert mask.shape == (6, 10)
    assert torch.equal(mask[:, 4], torch.tensor([0.5, 1, 1, 1, 1, 0.5]))
    assert torch.equal(mask[0, :3], torch.tensor([0.25, 0.5, 0.5]))
    assert torch.equal(feather_mask(3, 3, 3), torch.ones(1, 1, 3, 3))  # no ramp on a side not longer than f
