"""LineArtPreprocessor: the generator's layout from its keys (safetensors and the pack's .pth), the
hint it makes, and the files and settings it refuses."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import ModelFileError, WorkflowError
from diffsplit.engine.models.lineart_model import LineartGenerator, load_lineart_model
from diffsplit.engine.nodes.lineart import FINE_MODEL, lineart, lineart_map
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore


def context(models_dir: Path) -> Any:
    return SimpleNamespace(node_id="30", model_path=ModelStore(models_dir).resolve)


def photo(seed: int) -> torch.Tensor:
    return torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(seed))


def test_the_hint_is_white_lines_on_black_of_the_input_size(models_dir: Path) -> None:
    (hint,) = lineart(context(models_dir), image=photo(1), resolution=64)
    assert hint.shape == (1, 40, 56, 3) and float(hint.min()) >= 0.0 and float(hint.max()) <= 1.0
    assert torch.equal(hint[..., 0], hint[..., 1])
    network = load_lineart_model(models_dir / "preprocessors" / FINE_MODEL)
    with torch.no_grad():
        pixels = torch.nn.functional.interpolate(photo(1).movedim(-1, 1), size=(64, 88), mode="bilinear")
        raw = network(pixels)
    # the generator draws dark lines on white; the hint is its inverse
    assert float((1 - raw).mean()) == pytest.approx(float(hint.mean()), abs=0.05)
    (other,) = lineart(context(models_dir), image=photo(2), resolution=64)
    assert not torch.equal(hint, other)


def test_a_pth_of_the_pack_layout_loads_weights_only(tmp_path: Path) -> None:
    network = LineartGenerator(width=8, blocks=3)
    path = tmp_path / "sk_model.pth"
    torch.save(network.state_dict(), path)
    loaded = load_lineart_model(path)
    assert (loaded.width, loaded.blocks) == (8, 3)
    image = torch.rand(1, 32, 32, 3)
    assert torch.equal(lineart_map(image, loaded, 32), lineart_map(image, network.eval(), 32))


def test_what_is_not_a_generator_is_refused(models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not a line-art generator"):
        load_lineart_model(models_dir / "controlnet" / "tiny-sd15-controlnet.safetensors")
    state = LineartGenerator(width=8, blocks=2).state_dict()
    del state["model4.1.weight"]
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(ModelFileError, match="do not fit a line-art generator of width 8 with 2 blocks"):
        load_lineart_model(path)
    # a first conv that would make a network of terabytes: refused from its shape, nothing allocated
    wide = {"model0.1.weight": torch.zeros(257, 3, 7, 7)}
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(ModelFileError, match="width 257 with 0 blocks is over the limits"):
        load_lineart_model(tmp_path / "wide.pth")
    claimed = {"model0.1.weight": torch.zeros(1).expand(100_000, 3, 7, 7)}  # one stored element
    torch.save(claimed, tmp_path / "claimed.pth")
    with pytest.raises(ModelFileError, match="not a plain dense tensor"):
        load_lineart_model(tmp_path / "claimed.pth")
    narrow = {"model0.1.weight": torch.zeros(8, 3, 7, 7)}
    torch.save(narrow, tmp_path / "narrow.pth")
    with pytest.raises(ModelFileError, match=r"model0\.1\.bias is None in the file"):
        load_lineart_model(tmp_path / "narrow.pth")


def test_coarse_asks_for_the_coarse_file(models_dir: Path) -> None:
    with pytest.raises(WorkflowError, match="coarse line art reads the coarse model"):
        lineart(context(models_dir), image=photo(1), coarse="enable", resolution=64)


def test_the_pack_widget_order_with_the_file_last() -> None:
    node = default_registry()["LineArtPreprocessor"]
    assert [spec.name for spec in node.inputs] == ["image", "coarse", "resolution", "ckpt_name"]
    assert node.category == "image/preprocessors"
