"""ControlNet residuals for one UNet call, the way ComfyUI's ControlNet.get_control computes them.

A :class:`~diffsplit.engine.types.ControlHint` is active while
``percent_to_sigma(end_percent) <= sigma <= percent_to_sigma(start_percent)``.
Its hint image (IMAGE ``[B, H, W, C]``) is center-cropped to the latent's
aspect ratio, resized with ``nearest-exact`` to 8x the latent size, moved
channels-first and broadcast to the batch. The ControlNetModel sees the same
scaled input, timestep, embeddings and SDXL ``added_cond_kwargs`` as the UNet;
its residuals are multiplied by the hint's strength and added to those of the
hints it was applied on top of (``previous``), each checked on its own range.

A T2I-Adapter (loaded by ControlNetLoader too) sees only the hint: its feature maps,
times the strength, are added inside the UNet's down blocks; they are computed once
per hint and batch shape and reused at every step it is active (:class:`AdapterFeatures`, one per
sampler run).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.types import ControlHint
from diffusers import T2IAdapter

_LATENT_TO_PIXELS = 8


def _sum(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    if not a or not b:
        return a or b
    return tuple(x + y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class ControlResiduals:
    """What ControlNets and T2I-Adapters add to the UNet.

    A ControlNet: one residual per down-block output (``down``) and one for the middle
    (``mid``). A T2I-Adapter: one feature map per down block, added inside it
    (``intrablock``: diffusers' ``down_intrablock_additional_residuals``).
    """

    down: tuple[torch.Tensor, ...] = ()
    mid: torch.Tensor | None = None
    intrablock: tuple[torch.Tensor, ...] = ()

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        if self.mid is None or other.mid is None:
            mid = self.mid if other.mid is None else other.mid
        else:
            mid = self.mid + other.mid
        return ControlResiduals(down=_sum(self.down, other.down), mid=mid,
                                intrablock=_sum(self.intrablock, other.intrablock))

    def as_unet_kwargs(self, dtype: torch.dtype) -> dict[str, object]:
        """The keyword arguments of ``UNet2DConditionModel.forward`` that carry these residuals."""
        kwargs: dict[str, object] = {}
        if self.down and self.mid is not None:
            kwargs["down_block_additional_residuals"] = tuple(r.to(dtype) for r in self.down)
            kwargs["mid_block_additional_residual"] = self.mid.to(dtype)
        if self.intrablock:
            kwargs["down_intrablock_additional_residuals"] = [r.to(dtype) for r in self.intrablock]
        return kwargs


@dataclass(frozen=True)
class UNetInputs:
    """The inputs of one (batched) UNet call, shared with the ControlNets."""

    x_in: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    added: Mapping[str, torch.Tensor] | None
    #: the run's T2I-Adapter feature cache (None: features are computed at every call)
    adapter_features: AdapterFeatures | None = None


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


def is_adapter(hint: ControlHint) -> bool:
    """Whether ``hint`` steers through a T2I-Adapter (features from the hint alone) not a ControlNet."""
    return isinstance(hint.controlnet.model, T2IAdapter)


class AdapterFeatures:
    """One sampler run's T2I-Adapter features: an adapter's features depend on the hint image only,
    so they are computed once per hint and batch shape and reused at every step (as ComfyUI does).
    Owned by the run's denoiser, so nothing outlives the run or is shared between runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # id(hint) → (the hint, kept alive so its id stays its own; the batch's shape; the features)
        self._entries: dict[int, tuple[ControlHint, tuple[Any, ...], tuple[torch.Tensor, ...]]] = {}

    def get(self, hint: ControlHint, key: tuple[Any, ...]) -> tuple[torch.Tensor, ...] | None:
        """The features of ``hint`` for a batch of shape ``key``, if computed before."""
        with self._lock:
            entry = self._entries.get(id(hint))
        return entry[2] if entry is not None and entry[0] is hint and entry[1] == key else None

    def put(self, hint: ControlHint, key: tuple[Any, ...], features: tuple[torch.Tensor, ...]) -> None:
        with self._lock:
            self._entries[id(hint)] = (hint, key, features)


def _run_adapter(hint: ControlHint, inputs: UNetInputs) -> ControlResiduals:
    model = hint.controlnet.model
    batch, _, height, width = inputs.x_in.shape
    key = (batch, height, width, str(inputs.x_in.device), inputs.x_in.dtype)
    cache = inputs.adapter_features
    cached = None if cache is None else cache.get(hint, key)
    if cached is not None:
        return ControlResiduals(intrablock=cached)
    parameter = next(model.parameters())
    pixels = hint_pixels(hint.image, height, width, batch).to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        # on the UNet's device: an adapter may sit elsewhere (kept on the CPU beside a GPU UNet)
        features = tuple((feature * float(hint.strength)).to(inputs.x_in.device) for feature in model(pixels))
    if cache is not None:
        cache.put(hint, key, features)
    return ControlResiduals(intrablock=features)


def _run_controlnet(hint: ControlHint, inputs: UNetInputs) -> ControlResiduals:
    if is_adapter(hint):
        return _run_adapter(hint, inputs)
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
