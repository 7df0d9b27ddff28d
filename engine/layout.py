"""Node outputs in one memory layout, so a node computes the same bits locally and on a worker.

The wire always delivers C-contiguous tensors. A tensor a node leaves in
another layout (a VAE's ``channels_last`` latent, a transposed view) would
reach the next node in that layout only when both run locally, and
convolution kernels pick other algorithms for other layouts: measured, an
img2img KSampler gave latents 1e-4 apart split and local. The executor passes
every node output through :func:`contiguous_value`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffsplit.engine.value_walk import DESCEND, map_value


def contiguous_value(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples C-contiguous.

    Containers are rebuilt only where a tensor inside changed, and one tensor
    met twice becomes one copy, so identities the caller relies on survive.
    """
    return map_value(value, _contiguous, memo)


def _contiguous(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.is_contiguous() else value.contiguous()
    return DESCEND
