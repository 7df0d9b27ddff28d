"""Canny, as ComfyUI runs it (kornia's canny, hysteresis output, three channels)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffsplit.engine.nodes.preprocessors import canny

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
