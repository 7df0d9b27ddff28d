"""Tiled processing with feathered blending, ComfyUI's ``tiled_scale`` (2-D).

``tiled_scale(samples, function, tile=(h, w), overlap, scale, out_channels)``
runs ``function`` (``[1, C, h, w]`` → ``[1, out_channels, h*scale, w*scale]``)
over overlapping tiles of each batch item and blends the results:

- an item no larger than one tile is processed whole;
- otherwise tiles start every ``tile - overlap`` along each axis (``range(0,
  size - overlap, tile - overlap)``); the last tile is what remains;
- each result is weighted by a mask that ramps ``1/f, 2/f, … 1`` over
  ``f = round(overlap * scale)`` output pixels at every edge (no ramp on an
  axis shorter than ``f``), summed into the output at ``round(start * scale)``
  (cut at its border), and the sum divided by the summed weights.

The output is float32 on the CPU. Scales below 1 (a VAE encoder's 1/8) work
the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TileFunction = Callable[[torch.Tensor], torch.Tensor]
ProgressFunction = Callable[[int, int], None]


def tile_starts(size: int, tile: int, overlap: int) -> range:
    """Where tiles start along an axis of ``size``: ``[0]`` if one tile covers it."""
    if size <= tile:
        return range(0, 1)
    if tile <= overlap:
        raise ValueError(f"a tile of {tile} must be larger than its overlap of {overlap}")
    return range(0, size - overlap, tile - overlap)


def tile_count(height: int, width: int, tile: tuple[int, int], overlap: int) -> int:
    """How many tiles cover a ``height`` x ``width`` item (ComfyUI's ``get_tiled_scale_steps``)."""
    return len(tile_starts(height, tile[0], overlap)) * len(tile_starts(width, tile[1], overlap))


def _ramp(length: int, feather: int) -> torch.Tensor:
    """Edge weights along one axis: ``(t + 1) / feather`` for the ``t``-th pixel from either edge."""
    ramp = torch.ones(length)
    if feather >= length:
        return ramp
    for step in range(feather):
        weight = (step + 1) / feather
        ramp[step] *= weight
        ramp[length - 1 - step] *= weight
    return ramp


def feather_mask(height: int, width: int, feather: int) -> torch.Tensor:
    """The ``[1, 1, height, width]`` blending weights of one tile's result."""
    return (_ramp(height, feather)[:, None] * _ramp(width, feather)[None, :])[None, None]


def tiled_scale(
    samples: torch.Tensor,
    function: TileFunction,
    *,
    tile: tuple[int, int],
    overlap: int,
    scale: float,
    out_channels: int,
    progress: ProgressFunction | None = None,
) -> torch.Tensor:
    """``function`` over ``samples`` ``[B, C, H, W]`` tile by tile, blended (see the module docstring)."""
    batch, _, height, width = samples.shape
    out_height, out_width = round(height * scale), round(width * scale)
    output = torch.empty((batch, out_channels, out_height, out_width))
    per_item = tile_count(height, width, tile, overlap)
    done = 0
    for index in range(batch):
        item = samples[index : index + 1]
        if height <= tile[0] and width <= tile[1]:
            output[index : index + 1] = function(item).cpu()
            done += 1
            if progress is not None:
                progress(done, batch * per_item)
            continue
        total = output[index : index + 1].zero_()
        weights = torch.zeros((1, 1, out_height, out_width))
        feather = round(overlap * scale)
        for top in tile_starts(height, tile[0], overlap):
            for left in tile_starts(width, tile[1], overlap):
                piece = item[:, :, top : top + tile[0], left : left + tile[1]]
                result = function(piece).cpu()
                mask = feather_mask(result.shape[2], result.shape[3], feather)
                out_top, out_left = round(top * scale), round(left * scale)
                rows = min(result.shape[2], out_height - out_top)
                cols = min(result.shape[3], out_width - out_left)
                mask = mask[:, :, :rows, :cols]
                total[:, :, out_top : out_top + rows, out_left : out_left + cols] += (
                    result[:, :, :rows, :cols] * mask
                )
                weights[:, :, out_top : out_top + rows, out_left : out_left + cols] += mask
                done += 1
                if progress is not None:
                    progress(done, batch * per_item)
        total /= weights
    return output
