"""unCLIP conditioning on SDXL ("revision"): CLIP image embeds in place of the pooled text embedding.

ComfyUI's SDXL (base and refiner) ``encode_adm`` takes, for an entry with
``unclip_conditioning``, the first ``pooled width`` columns of ``unclip_adm``
instead of the entry's ``pooled_output``. What those columns hold:

- every row of every ``clip_vision_output["image_embeds"]`` is noise-augmented
  by ComfyUI's ``CLIPEmbeddingNoiseAugmentation`` at level
  ``round(999 * noise_augmentation)`` and multiplied by the entry's
  ``strength``. The augmentation is ``unscale(q_sample(scale(x)))`` with
  ``scale(x) = (x - mean) / std``; ComfyUI builds SDXL's augmentor without CLIP
  statistics and never loads any from a checkpoint (the buffers are not
  persistent), so mean 0 and std 1 always. ``q_sample`` uses the
  ``squaredcos_cap_v2`` schedule over 1000 steps (numpy float64, then float32)
  and noise ``randn([1, width])`` from a generator seeded with the sampler's
  ``seed - 10``, reseeded for every row;
- with more than one row in all, the rows are summed and augmented once more
  at level ``round(999 * 0.0) = 0``, its noise the next ``randn([1, width])`` of
  the last row's generator (ComfyUI's global generator, which that row's
  ``torch.manual_seed`` had just seeded; on the CPU, as all noise here is drawn).

The time embedding of the noise level ComfyUI appends sits past the pooled
width and is cut off, so it is not computed here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from diffsplit.engine.sampling.noise import seeded_generator

#: ComfyUI's ``max_noise_level`` of the augmentor, and its schedule length.
MAX_NOISE_LEVEL = 1000
#: ComfyUI seeds the augmentation noise with the sampler's seed minus this.
SEED_OFFSET = 10
#: SDXL's ``noise_augment_merge`` (the level at which summed rows are augmented again).
SDXL_MERGE_NOISE_AUGMENT = 0.0
_MAX_BETA = 0.999


def _alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


@lru_cache(maxsize=1)
def _schedule() -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(alphas_cumprod)`` and ``sqrt(1 - alphas_cumprod)`` of squaredcos_cap_v2, float32."""
    steps = MAX_NOISE_LEVEL
    betas = np.array(
        [min(1 - _alpha_bar((i + 1) / steps) / _alpha_bar(i / steps), _MAX_BETA) for i in range(steps)]
    )
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    return (
        torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32),
        torch.tensor(np.sqrt(1.0 - alphas_cumprod), dtype=torch.float32),
    )


def noise_level(noise_augmentation: float) -> int:
    """ComfyUI's level for a noise_augmentation in [0, 1]: ``round(999 * n)``."""
    return round((MAX_NOISE_LEVEL - 1) * float(noise_augmentation))


@dataclass(frozen=True)
class NoiseAugmentor:
    """ComfyUI's CLIPEmbeddingNoiseAugmentation for embeddings ``width`` wide (mean 0, std 1)."""

    width: int

    def augment(self, x: torch.Tensor, level: int, noise: torch.Tensor) -> torch.Tensor:
        """``unscale(sqrt(a_t) * scale(x) + sqrt(1 - a_t) * noise)``, ``x`` ``[1, width]`` or ``[width]``."""
        mean = torch.zeros(1, self.width)
        std = torch.ones(1, self.width)
        scaled = (x - mean) * 1.0 / std
        sqrt_alpha, sqrt_one_minus = _schedule()
        index = torch.tensor([level])
        z = sqrt_alpha.gather(-1, index).reshape(1, 1) * scaled + (
            sqrt_one_minus.gather(-1, index).reshape(1, 1) * noise
        )
        return (z * std) + mean


def unclip_pooled(
    unclip_conditioning: Sequence[Mapping[str, Any]],
    width: int,
    seed: int,
    *,
    merge_noise_augment: float = SDXL_MERGE_NOISE_AUGMENT,
) -> torch.Tensor:
    """The ``[1, width]`` pooled input SDXL takes for ``unclip_conditioning`` (see the module docstring).

    Raises ValueError when the list is empty or the image embeds are not ``width`` wide.
    """
    augmentor = NoiseAugmentor(width)
    rows: list[torch.Tensor] = []
    generator: torch.Generator | None = None
    for number, item in enumerate(unclip_conditioning):
        embeds = _image_embeds(item, number, width)
        strength = float(item["strength"])
        level = noise_level(item["noise_augmentation"])
        for embed in embeds:
            generator = seeded_generator(seed - SEED_OFFSET)
            noise = torch.randn((1, width), dtype=embed.dtype, generator=generator)
            rows.append(augmentor.augment(embed, level, noise) * strength)
    if not rows or generator is None:
        raise ValueError("unclip_conditioning holds no image embeds")
    if len(rows) == 1:
        return rows[0]
    summed = torch.stack(rows).sum(0)
    noise = torch.randn(summed.shape, dtype=summed.dtype, generator=generator)
    return augmentor.augment(summed, noise_level(merge_noise_augment), noise)


def _image_embeds(item: Mapping[str, Any], number: int, width: int) -> torch.Tensor:
    output = item.get("clip_vision_output") if isinstance(item, Mapping) else None
    embeds = output.get("image_embeds") if isinstance(output, Mapping) else None
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2:
        raise ValueError(f"unclip_conditioning[{number}] has no clip_vision_output with image_embeds [B, W]")
    if embeds.shape[1] != width:
        raise ValueError(
            f"unclip_conditioning[{number}]: the CLIP vision image embeds are {embeds.shape[1]} wide, but "
            f"this model's pooled input is {width} wide (SDXL revision needs a CLIP vision model whose "
            "projection matches, e.g. clip_vision_g for SDXL)"
        )
    return embeds.float()
