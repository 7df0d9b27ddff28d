"""ControlNet residuals for one UNet call, the way ComfyUI's ControlNet.get_control computes them.

A :class:`~diffsplit.engine.types.ControlHint` is active while
``percent_to_sigma(end_percent) <= sigma <= percent_to_sigma(start_percent)``.
Its hint image (IMAGE ``[B, H, W, C]``) is center-cropped to the latent's
aspect ratio, resized with ``nearest-exact`` to 8x the latent size, moved
channels-first and broadcast to the batch. The ControlNetModel sees the same
scaled input, timestep, embeddings and SDXL ``added_cond_kwargs`` as the UNet;
its residuals are multiplied by the hint's strength and added to those of the
hints it was applied on top of (``previous``), each checked on its own range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.types import ControlHint

_LATENT_TO_PIXELS = 8


@dataclass(frozen=True)
class ControlResiduals:
    """What a ControlNet adds to the UNet: one residual per down-block output and one for the middle."""

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        down = tuple(a + b for a, b in zip(self.down, other.down, strict=True))
        return ControlResiduals(down=down, mid=self.mid + other.mid)

    def as_unet_kwargs(self, dtype: torch.dtype) -> dict[str, object]:
        """The keyword arguments of ``UNet2DConditionModel.forward`` that carry these residuals."""
        return {
            "down_block_additional_residuals": tuple(r.to(dtype) for r in self.down),
            "mid_block_additional_residual": self.mid.to(dtype),
        }


@dataclass(frozen=True)
class UNetInputs:
    """The inputs of one (batched) UNet call, shared with the ControlNets."""

    x_in: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    added: Mapping[str, torch.Tensor] | None


def hint_is_active(hint: ControlHint, schedule: DiscreteSchedule, sigma: float) -> bool:
    """Whether ``hint`` steers the step at ``sigma`` (its percent range mapped onto sigmas)."""
    sigma_start = schedule.percent_to_sigma(hint.start_percent)
    sigma_end = schedule.percent_to_sigma(hint.end_percent)
    return sigma_end <= sigma <= sigma_start


def hint_pixels(image: torch.Tensor, height: int, width: int, batch: int) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` → ``[batch, C, 8*height, 8*width]``: center crop, nearest-exact resize."""
    pixels = image.movedim(-1, 1).float()
    target_h, target_w = height * _LATENT_TO_PIXELS, width * _LATENT_TO_PIXELS
    old_h, old_w = pixels.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, target_w / target_h
    if old_aspect > new_aspect:
        cut = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        pixels = pixels[..., :, cut : old_w - cut]
    elif old_aspect < new_aspect:
        cut = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        pixels = pixels[..., cut : old_h - cut, :]
    if pixels.shape[-2:] != (target_h, target_w):
        pixels = torch.nn.functional.interpolate(pixels, size=(target_h, target_w), mode="nearest-exact")
    if pixels.shape[0] == batch:
        return pixels
    if pixels.shape[0] == 1:
        return pixels.expand(batch, -1, -1, -1)
    repeats = -(-batch // pixels.shape[0])
    return pixels.repeat(repeats, 1, 1, 1)[:batch]


def control_residuals(
    hint: ControlHint | None, schedule: DiscreteSchedule, sigma: float, inputs: UNetInputs,
    *, observe: Callable[[ControlHint, ControlResiduals], None] | None = None,
) -> ControlResiduals | None:
    """The summed, strength-scaled residuals of ``hint`` and its chain that are active at ``sigma``.

    ``observe(hint, residuals)`` sees each active hint's own residuals (the conditioning scale
    estimator's probe); the sum is the same with or without it.
    """
    if hint is None:
        return None
    previous = control_residuals(hint.previous, schedule, sigma, inputs, observe=observe)
    if not hint_is_active(hint, schedule, sigma):
        return previous
    own = _run_controlnet(hint, inputs)
    if observe is not None:
        observe(hint, own)
    return own if previous is None else own + previous


def _run_controlnet(hint: ControlHint, inputs: UNetInputs) -> ControlResiduals:
    model = hint.controlnet.model
    dtype = model.dtype
    batch, _, height, width = inputs.x_in.shape
    pixels = hint_pixels(hint.image, height, width, batch).to(device=inputs.x_in.device, dtype=dtype)
    added = None
    if inputs.added is not None:
        added = {name: value.to(dtype) for name, value in inputs.added.items()}
    down, mid = model(
        inputs.x_in.to(dtype),
        inputs.timestep,
        encoder_hidden_states=inputs.context.to(dtype),
        controlnet_cond=pixels,
        conditioning_scale=float(hint.strength),
        added_cond_kwargs=added,
        return_dict=False,
    )
    return ControlResiduals(down=tuple(down), mid=mid)
