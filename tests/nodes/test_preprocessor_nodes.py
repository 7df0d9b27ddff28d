"""Canny, as ComfyUI runs it (kornia's canny, hysteresis output, three channels)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.nodes.preprocessors import canny
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore

CTX = SimpleNamespace(node_id="5")


def _step_image() -> torch.Tensor:
    image = torch.zeros((1, 32, 32, 3))
    image[:, :, 16:, :] = 1.0  # one vertical edge at column 16
    return image


def test_canny_finds_the_edge_and_only_the_edge() -> None:
    (edges,) = canny(CTX, image=_step_image(), low_threshold=0.4, high_threshold=0.8)
    assert edges.shape == (1, 32, 32, 3)
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(edges[..., 0], edges[..., 2])
    columns = edges[0, 4:-4, :, 0].sum(dim=0).nonzero().flatten().tolist()
    assert columns and all(14 <= c <= 17 for c in columns)
    (flat,) = canny(CTX, image=torch.full((1, 32, 32, 3), 0.5), low_threshold=0.4, high_threshold=0.8)
    assert float(flat.sum()) == 0.0


def test_canny_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="low_threshold"):
        canny(CTX, image=_step_image(), low_threshold=0.9, high_threshold=0.2)


@pytest.mark.parametrize("class_type", ["DepthAnythingPreprocessor", "LineArtPreprocessor",
                                        "OpenposePreprocessor", "SemSegPreprocessor"])
def test_a_network_input_over_the_limit_is_refused_before_it_is_made(models_dir: Path, class_type: str
                                                                      ) -> None:
    node = default_registry()[class_type]
    ctx = SimpleNamespace(node_id="9", model_path=ModelStore(models_dir).resolve)
    # the pack's UniFormer file fits its input into 2048 x 512 whatever the resolution: the ConvNeXt one
    # follows the resolution
    names = {"DepthAnythingPreprocessor": {"ckpt_name": "tiny-depth-anything.safetensors"},
             "SemSegPreprocessor": {"ckpt_name": "upernet.safetensors"}}.get(class_type, {})
    strip = torch.zeros(1, 8, 64, 3)  # a thin strip: its short side at 4096 makes the long side 32768
    with pytest.raises(WorkflowError, match=r"8x64 image at resolution 4096 makes a 4\d+x327\d+ network"):
        node.function(ctx, image=strip, resolution=4096, **names)
