"""LoadImage, LoadImageMask, ImageScale(By), ImageInvert, SaveImage and PreviewImage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.executor import Executor
from diffsplit.engine.format_api import parse_api_format
from diffsplit.engine.nodes.image import (
    IMAGE_INVERT,
    IMAGE_SCALE,
    IMAGE_SCALE_BY,
    LOAD_IMAGE,
    LOAD_IMAGE_MASK,
    NODES,
    PREVIEW_IMAGE,
    SAVE_IMAGE,
)
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.nodes.upscale import common_upscale
from PIL import Image
from PIL.PngImagePlugin import PngInfo

PROMPT_CHUNK = json.dumps({"1": {"class_type": "SaveImage", "inputs": {}}})


class FolderContext:
    """The part of a NodeContext that image nodes use: an inputs folder and PNG saving."""

    node_id = "9"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.saved: list[Path] = []
        (root / "inputs").mkdir(exist_ok=True)

    def input_path(self, name: str) -> Path:
        return self.root / "inputs" / name

    def save_image(self, image: Image.Image, filename_prefix: str, *, temporary: bool) -> Path:
        folder = self.root / ("temp" if temporary else "output")
        folder.mkdir(exist_ok=True)
        path = folder / f"{filename_prefix}_{len(self.saved) + 1:05d}_.png"
        info = PngInfo()
        info.add_text("prompt", PROMPT_CHUNK)
        image.save(path, pnginfo=info)
        self.saved.append(path)
        return path


def _rgba_pixels() -> np.ndarray:
    pixels = np.zeros((6, 10, 4), dtype=np.uint8)
    pixels[..., 0] = 255  # red
    pixels[..., 1] = np.arange(10, dtype=np.uint8)[None, :] * 20
    pixels[..., 3] = 255
    pixels[:, :5, 3] = 0  # left half transparent
    return pixels


def _random_image(seed: int, height: int = 12, width: int = 16) -> torch.Tensor:
    return torch.rand((2, height, width, 3), generator=torch.Generator().manual_seed(seed))


def test_load_image_turns_alpha_into_mask(tmp_path: Path) -> None:
    context = FolderContext(tmp_path)
    Image.fromarray(_rgba_pixels(), mode="RGBA").save(tmp_path / "inputs" / "cut.png")
    image, mask = LOAD_IMAGE.function(context, image="cut.png")
    assert image.shape == (1, 6, 10, 3) and image.dtype == torch.float32
    torch.testing.assert_close(image[0, 0, :, 1], torch.arange(10, dtype=torch.float32) * 20 / 255)
    assert torch.all(image[..., 0] == 1.0)
    assert mask.shape == (1, 6, 10)
    assert torch.all(mask[:, :, :5] == 1.0) and torch.all(mask[:, :, 5:] == 0.0)


def test_load_image_without_alpha_has_an_empty_64_mask(tmp_path: Path) -> None:
    context = FolderContext(tmp_path)
    Image.fromarray(_rgba_pixels()[..., :3], mode="RGB").save(tmp_path / "inputs" / "plain.png")
    image, mask = LOAD_IMAGE.function(context, image="plain.png")
    assert image.shape == (1, 6, 10, 3)
    assert mask.shape == (1, 64, 64) and torch.count_nonzero(mask) == 0


def test_load_image_mask_reads_one_channel(tmp_path: Path) -> None:
    context = FolderContext(tmp_path)
    Image.fromarray(_rgba_pixels(), mode="RGBA").save(tmp_path / "inputs" / "cut.png")
    (alpha,) = LOAD_IMAGE_MASK.function(context, image="cut.png", channel="alpha")
    (green,) = LOAD_IMAGE_MASK.function(context, image="cut.png", channel="green")
    (blue,) = LOAD_IMAGE_MASK.function(context, image="cut.png", channel="blue")
    assert alpha.shape == green.shape == (1, 6, 10)
    assert torch.all(alpha[..., :5] == 1.0) and torch.all(alpha[..., 5:] == 0.0)
    torch.testing.assert_close(green[0, 3], torch.arange(10, dtype=torch.float32) * 20 / 255)
    assert torch.count_nonzero(blue) == 0
    with pytest.raises(WorkflowError, match="mask channel"):
        LOAD_IMAGE_MASK.function(context, image="cut.png", channel="purple")


def test_image_scale_to_size_and_keep_aspect() -> None:
    image = _random_image(0)
    (scaled,) = IMAGE_SCALE.function(
        None, image=image, upscale_method="bilinear", width=32, height=20, crop="disabled"
    )
    assert scaled.shape == (2, 20, 32, 3)
    (by_height,) = IMAGE_SCALE.function(
        None, image=image, upscale_method="area", width=0, height=24, crop="disabled"
    )
    assert by_height.shape == (2, 24, 32, 3)
    (unchanged,) = IMAGE_SCALE.function(
        None, image=image, upscale_method="area", width=0, height=0, crop="disabled"
    )
    assert unchanged is image


def test_image_scale_center_crop_keeps_the_middle() -> None:
    image = torch.zeros((1, 8, 16, 3))
    image[:, :, 4:12] = 1.0  # a bright square in the middle
    (cropped,) = IMAGE_SCALE.function(
        None, image=image, upscale_method="nearest-exact", width=8, height=8, crop="center"
    )
    assert cropped.shape == (1, 8, 8, 3) and torch.all(cropped == 1.0)


def test_image_scale_lanczos_works_on_8_bit_values() -> None:
    image = torch.full((1, 10, 10, 3), 0.5)
    (scaled,) = IMAGE_SCALE_BY.function(None, image=image, upscale_method="lanczos", scale_by=2.0)
    assert scaled.shape == (1, 20, 20, 3)
    torch.testing.assert_close(scaled, torch.full_like(scaled, 127 / 255))


def test_image_scale_by_rounds_the_size() -> None:
    (scaled,) = IMAGE_SCALE_BY.function(None, image=_random_image(1), upscale_method="bicubic", scale_by=1.5)
    assert scaled.shape == (2, 18, 24, 3)


def test_unknown_upscale_method_is_a_workflow_error() -> None:
    with pytest.raises(WorkflowError, match="upscale method"):
        common_upscale(torch.zeros(1, 3, 4, 4), 8, 8, "magic", "disabled")


def test_image_invert() -> None:
    image = _random_image(2)
    original = image.clone()
    (inverted,) = IMAGE_INVERT.function(None, image=image)
    torch.testing.assert_close(inverted, 1.0 - original)
    assert torch.equal(image, original)


def test_save_image_writes_one_png_per_image(tmp_path: Path) -> None:
    context = FolderContext(tmp_path)
    images = _random_image(3)
    assert SAVE_IMAGE.function(context, images=images, filename_prefix="tiny") == ()
    assert [path.name for path in context.saved] == ["tiny_00001_.png", "tiny_00002_.png"]
    assert all(path.parent == tmp_path / "output" for path in context.saved)
    with Image.open(context.saved[1]) as saved:
        assert saved.format == "PNG" and saved.mode == "RGB"
        pixels = np.array(saved)
    expected = np.clip(255.0 * images[1].numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(pixels, expected)


def test_save_image_through_the_executor_embeds_the_prompt(tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    Image.fromarray(_rgba_pixels(), mode="RGBA").save(tmp_path / "inputs" / "cut.png")
    workflow = parse_api_format({
        "1": {"class_type": "LoadImage", "inputs": {"image": "cut.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}},
    })  # fmt: skip
    executor = Executor(
        NodeRegistry.from_nodes(NODES), None, inputs_dir=tmp_path / "inputs", output_dir=tmp_path / "output"
    )
    (path,) = executor.run(workflow).saved_files
    with Image.open(path) as saved:
        prompt = json.loads(saved.text["prompt"])
        pixels = np.array(saved)
    assert prompt["3"]["class_type"] == "SaveImage"
    expected = 255 - _rgba_pixels()[..., :3].astype(np.int16)
    assert np.abs(pixels.astype(np.int16) - expected).max() <= 1  # bytes are truncated, not rounded


def test_preview_image_writes_temporary_files(tmp_path: Path) -> None:
    context = FolderContext(tmp_path)
    assert PREVIEW_IMAGE.function(context, images=_random_image(4)[:1]) == ()
    (path,) = context.saved
    assert path.parent == tmp_path / "temp" and path.suffix == ".png"
    assert not (tmp_path / "output").exists()


def test_declarations() -> None:
    assert SAVE_IMAGE.output_node and PREVIEW_IMAGE.output_node and SAVE_IMAGE.outputs == ()
    assert SAVE_IMAGE.input("filename_prefix").default == "ComfyUI"
    image_input = LOAD_IMAGE.input("image")
    assert image_input.type == "COMBO" and image_input.choices is None and image_input.model_folder is None
    assert [spec.name for spec in IMAGE_SCALE.widget_inputs] == ["upscale_method", "width", "height", "crop"]
    assert "lanczos" in IMAGE_SCALE.input("upscale_method").choices
