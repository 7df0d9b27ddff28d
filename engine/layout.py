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


def contiguous_value(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples C-contiguous.

    Containers are rebuilt only where a tensor inside changed, and one tensor
    met twice becomes one copy, so identities the caller relies on survive.
    """
    memo = {} if memo is None else memo
    key = id(value)
    if key in memo:
        return memo[key]
    result = value
    if isinstance(value, torch.Tensor):
        result = value if value.is_contiguous() else value.contiguous()
    elif type(value) is dict:  # not subclasses (library result classes keep their own type)
        items = {name: contiguous_value(item, memo) for name, item in value.items()}
        if any(items[name] is not item for name, item in value.items()):
            result = items
    elif type(value) in (list, tuple):
        items_list = [contiguous_value(item, memo) for item in value]
        if any(new is not old for new, old in zip(items_list, value, strict=True)):
            result = items_list if isinstance(value, list) else tuple(items_list)
    memo[key] = result
    return result
