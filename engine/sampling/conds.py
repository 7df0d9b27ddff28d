"""CONDITIONING entries resolved for one sampling run, the way ComfyUI prepares them.

:func:`resolve_conditioning` turns the positive and negative CONDITIONING lists
into :class:`ResolvedCond` records for latents of a known shape:

- embeddings repeated to the latent batch; for SDXL the pooled output and the
  size/crop (base) or size/aesthetic-score (refiner) ``time_ids``, with
  ComfyUI's defaults (size = latent size * 8, crop 0, target = size, aesthetic
  score 6 for positive and 2.5 for negative entries);
- ``area`` (latent units, or ComfyUI's ``("percentage", h, w, y, x)``) and
  ``strength``; ``mask``/``mask_strength``/``set_area_to_bounds``; the weight of
  an area without a mask fades in over 8 latent pixels at edges inside the
  latent, as in ComfyUI;
- ``start_percent``/``end_percent`` (ConditioningSetTimestepRange) as a sigma range;
- ``concat_latent_image`` (InstructPixToPixConditioning) for 8-channel UNets (:mod:`.concat`);
- ``gligen`` (GLIGENTextBoxApply): the boxes and a fused view of the UNet (:mod:`.gligen`);
- ``unclip_conditioning`` (unCLIPConditioning) on SDXL: noise-augmented CLIP image embeds
  replace the pooled output (:mod:`.unclip`; seeded from the sampler's ``seed``);
- ComfyUI's two fix-ups: every area entry gets an opposite entry with the same
  area (embeddings of the smallest enclosing entry on the other side), and
  ControlNetApply's hints (``control_apply_to_uncond``) are copied onto the
  negative entries when none of them has its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.sampling.concat import ip2p_concat
from diffsplit.engine.sampling.gligen import GligenPatch, gligen_patch
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.sampling.unclip import unclip_pooled
from diffsplit.engine.types import ControlHint, DiffusionModel

Area = tuple[int, int, int, int]

_FEATHER = 8
_MIN_BOUNDS_SIZE = 8


@dataclass(frozen=True, eq=False)
class ResolvedCond:
    """One conditioning entry ready for the UNet on latents ``[B, C, H, W]``."""

    is_uncond: bool
    #: token embeddings ``[B, L, D]``
    context: torch.Tensor
    #: SDXL ``added_cond_kwargs`` (``text_embeds [B, P]``, ``time_ids [B, k]``), else None
    added: Mapping[str, torch.Tensor] | None
    #: ``(h, w, y, x)`` in latent pixels; None for the whole latent
    area: Area | None
    #: per-pixel weight of this entry's prediction, ``[B, C, h, w]`` of its area
    weight: torch.Tensor
    #: the entry is used while ``sigma_end <= sigma <= sigma_start``
    sigma_start: float | None = None
    sigma_end: float | None = None
    control: ControlHint | None = None
    #: GLIGEN boxes and the UNet view that runs them; such entries never share a UNet call
    gligen: GligenPatch | None = None
    #: the image latent an 8-channel (InstructPix2Pix) UNet takes beside the noisy one, ``[B, C, H, W]``
    concat: torch.Tensor | None = None

    def region(self, height: int, width: int) -> Area:
        """The area as ``(h, w, y, x)``, the whole latent when the entry has none."""
        return self.area if self.area is not None else (height, width, 0, 0)

    def is_active(self, sigma: float) -> bool:
        """Whether the entry takes part at ``sigma``."""
        if self.sigma_start is not None and sigma > self.sigma_start:
            return False
        return not (self.sigma_end is not None and sigma < self.sigma_end)


def repeat_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """``tensor`` cut or tiled along dim 0 to ``batch`` rows (ComfyUI's repeat_to_batch_size)."""
    if tensor.shape[0] > batch:
        return tensor[:batch]
    if tensor.shape[0] < batch:
        repeats = -(-batch // tensor.shape[0])
        return tensor.repeat(repeats, *([1] * (tensor.ndim - 1)))[:batch]
    return tensor


def resolve_conditioning(
    model: DiffusionModel,
    schedule: DiscreteSchedule,
    positive: Sequence[Sequence[Any]],
    negative: Sequence[Sequence[Any]],
    latent_shape: Sequence[int],
    *,
    seed: int = 0,
) -> tuple[ResolvedCond, ...]:
    """Positive then negative entries (plus ComfyUI's added opposites), resolved for ``latent_shape``.

    ``seed`` is the sampler's seed (unCLIP noise augmentation draws from it).
    """
    resolved = [
        _resolve_entry(model, schedule, entry, latent_shape, is_uncond=is_uncond, seed=seed)
        for entries, is_uncond in ((positive, False), (negative, True))
        for entry in entries
    ]
    resolved = _add_opposite_areas(resolved)
    apply_to_uncond = [
        cond
        for cond, entry in zip(resolved, positive, strict=False)
        if entry[1].get("control_apply_to_uncond", False)
    ]
    return tuple(_share_controls_with_uncond(resolved, apply_to_uncond))


def _resolve_entry(
    model: DiffusionModel,
    schedule: DiscreteSchedule,
    entry: Sequence[Any],
    latent_shape: Sequence[int],
    *,
    is_uncond: bool,
    seed: int = 0,
) -> ResolvedCond:
    tensor, extras = entry[0], entry[1]
    batch, channels, height, width = latent_shape
    area = _area(extras, height, width)
    mask = _mask(extras, batch, height, width)
    if mask is not None and extras.get("set_area_to_bounds", False):
        area = _mask_bounds(mask)
    region = area if area is not None else (height, width, 0, 0)
    h, w, y, x = region
    if mask is not None:
        weight = mask[:, y : y + h, x : x + w] * float(extras.get("mask_strength", 1.0))
        weight = weight.unsqueeze(1).repeat(batch // weight.shape[0], channels, 1, 1)
    else:
        weight = torch.ones(batch, channels, h, w)
        if area is not None:
            weight = weight * _feather(region, height, width)
    weight = weight * float(extras.get("strength", 1.0))
    return ResolvedCond(
        is_uncond=is_uncond,
        context=repeat_to_batch(tensor, batch),
        added=_added_conds(model, extras, latent_shape, is_uncond, seed),
        area=area,
        weight=weight,
        sigma_start=schedule.percent_to_sigma(extras["start_percent"]) if "start_percent" in extras else None,
        sigma_end=schedule.percent_to_sigma(extras["end_percent"]) if "end_percent" in extras else None,
        control=extras.get("control"),
        gligen=gligen_patch(model, extras.get("gligen")),
        concat=ip2p_concat(model, extras, latent_shape),
    )


def _area(extras: Mapping[str, Any], height: int, width: int) -> Area | None:
    area = extras.get("area")
    if area is None:
        return None
    if area[0] == "percentage":
        _, h, w, y, x = area
        return (max(1, round(h * height)), max(1, round(w * width)), round(y * height), round(x * width))
    return tuple(int(v) for v in area)  # type: ignore[return-value]


def _mask(extras: Mapping[str, Any], batch: int, height: int, width: int) -> torch.Tensor | None:
    mask = extras.get("mask")
    if mask is None:
        return None
    mask = mask.float()
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.shape[-2:] != (height, width):
        mask = torch.nn.functional.interpolate(
            mask.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False
        ).squeeze(1)
    return mask


def _mask_bounds(mask: torch.Tensor) -> Area:
    """ComfyUI's set_area_to_bounds: the box around the mask's non-zero pixels, at least 8x8."""
    nonzero = torch.nonzero(mask.abs().amax(dim=0))
    if nonzero.numel() == 0:
        return (_MIN_BOUNDS_SIZE, _MIN_BOUNDS_SIZE, 0, 0)
    top, left = (int(v) for v in nonzero.min(dim=0).values)
    bottom, right = (int(v) for v in nonzero.max(dim=0).values)
    return (max(_MIN_BOUNDS_SIZE, bottom - top + 1), max(_MIN_BOUNDS_SIZE, right - left + 1), top, left)


def _feather(area: Area, height: int, width: int) -> torch.Tensor:
    """Weights ramping 1/8, 2/8, ... 1 over 8 pixels at each area edge that lies inside the latent."""
    h, w, y, x = area
    rows = _edge_ramp(h, fade_start=y != 0, fade_end=y + h < height)
    cols = _edge_ramp(w, fade_start=x != 0, fade_end=x + w < width)
    return rows.reshape(h, 1) * cols.reshape(1, w)


def _edge_ramp(length: int, *, fade_start: bool, fade_end: bool) -> torch.Tensor:
    ramp = torch.ones(length)
    steps = torch.arange(1, min(_FEATHER, length) + 1, dtype=torch.float32) / _FEATHER
    if fade_start:
        ramp[: len(steps)] *= steps
    if fade_end:
        ramp[length - len(steps) :] *= steps.flip(0)
    return ramp


def _added_conds(
    model: DiffusionModel, extras: Mapping[str, Any], latent_shape: Sequence[int], is_uncond: bool, seed: int
) -> dict[str, torch.Tensor] | None:
    if model.family == "sd15":
        return None
    batch, _, height, width = latent_shape
    size_w = extras.get("width", width * 8)
    size_h = extras.get("height", height * 8)
    crop_w, crop_h = extras.get("crop_w", 0), extras.get("crop_h", 0)
    if model.family == "sdxl":
        target = (extras.get("target_height", size_h), extras.get("target_width", size_w))
        values = [size_h, size_w, crop_h, crop_w, *target]
    else:
        values = [size_h, size_w, crop_h, crop_w, extras.get("aesthetic_score", 2.5 if is_uncond else 6.0)]
    time_ids = torch.tensor([[float(v) for v in values]]).repeat(batch, 1)
    config = model.unet.config
    pooled_dim = config.projection_class_embeddings_input_dim - len(values) * config.addition_time_embed_dim
    pooled = extras.get("pooled_output")
    if "unclip_conditioning" in extras:
        pooled = unclip_pooled(extras["unclip_conditioning"], pooled_dim, seed)
    elif pooled is None:
        pooled = torch.zeros(1, pooled_dim)
    return {"text_embeds": repeat_to_batch(pooled.reshape(pooled.shape[0], -1), batch), "time_ids": time_ids}


def _encloses(outer: Area, inner: Area) -> bool:
    return (
        inner[2] >= outer[2]
        and inner[3] >= outer[3]
        and outer[0] + outer[2] >= inner[0] + inner[2]
        and outer[1] + outer[3] >= inner[1] + inner[3]
    )


def _add_opposite_areas(conds: list[ResolvedCond]) -> list[ResolvedCond]:
    """For each area entry, an entry with the same area on the other side (ComfyUI's rule)."""
    conds = list(conds)
    for source_is_uncond in (False, True):
        for cond in [c for c in conds if c.is_uncond == source_is_uncond and c.area is not None]:
            opposite = [c for c in conds if c.is_uncond != source_is_uncond]
            smallest = _smallest_enclosing(opposite, cond.area)  # type: ignore[arg-type]
            if smallest is None or smallest.area == cond.area:
                continue
            conds.append(
                dataclasses.replace(
                    cond, is_uncond=not source_is_uncond, context=smallest.context, added=smallest.added
                )
            )
    return conds


def _smallest_enclosing(candidates: Sequence[ResolvedCond], area: Area) -> ResolvedCond | None:
    smallest = None
    for candidate in candidates:
        if candidate.area is None:
            if smallest is None:
                smallest = candidate
        elif _encloses(candidate.area, area) and (
            smallest is None
            or smallest.area is None
            or smallest.area[0] * smallest.area[1] > candidate.area[0] * candidate.area[1]
        ):
            smallest = candidate
    return smallest


def _share_controls_with_uncond(
    conds: list[ResolvedCond], apply_to_uncond: Sequence[ResolvedCond]
) -> list[ResolvedCond]:
    """ControlNetApply hints also steer the negative prompt (ComfyUI's apply_empty_x_to_equal_area)."""
    hints = [c.control for c in apply_to_uncond if c.area is None and c.control is not None]
    targets = [i for i, c in enumerate(conds) if c.is_uncond and c.area is None and c.control is None]
    has_own = any(c.is_uncond and c.area is None and c.control is not None for c in conds)
    if not hints or not targets or has_own:
        return conds
    conds = list(conds)
    for index, hint in enumerate(hints):
        target = targets[index % len(targets)]
        conds[target] = dataclasses.replace(conds[target], control=hint)
    return conds
