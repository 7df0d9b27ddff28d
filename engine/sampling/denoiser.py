"""The denoiser a sampler calls: ComfyUI's CFG sampling function over a diffusers UNet.

``CFGDenoiser.build(model, positive, negative, cfg, latent_shape)`` gives a
callable ``denoiser(x, sigma) -> denoised``:

1. every conditioning entry active at ``sigma`` predicts the denoised latent of
   its area (the whole latent by default); entries that can share a forward
   pass (same area size, same ControlNet hint object, compatible embeddings)
   run as one batch: positive and negative together, and embeddings of
   different lengths (77 vs 154 tokens) padded by repetition up to their
   least common multiple when that is at most 4x the shorter one, else run apart;
   an entry with GLIGEN boxes runs alone, through its fused UNet view (ComfyUI's rule);
2. predictions are averaged per pixel with each entry's weight (area strength,
   mask, feathered edges), separately for positive and negative;
3. ``uncond + (cond - uncond) * cfg``. When ``cfg`` is 1 the negative entries are
   not run at all (ComfyUI's cfg1 shortcut; the result is ``cond * cfg``).

The UNet sees ``x * c_in`` with ``c_in = 1 / sqrt(sigma^2 + 1)`` and the
training timestep nearest to ``sigma``; epsilon outputs become ``x - eps * sigma``,
v outputs ``x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)``. An 8-channel
(InstructPix2Pix) UNet gets each entry's image latent after ``x * c_in`` (:mod:`.concat`).

:class:`InpaintDenoiser` wraps a denoiser like ComfyUI's KSamplerX0Inpaint:
outside the noise mask the latent is held at the original latent noised to the
current sigma, and the prediction there is the original latent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffsplit.engine.sampling.concat import batched_concat
from diffsplit.engine.sampling.condition_scales import ConditionPruner
from diffsplit.engine.sampling.conds import ResolvedCond, resolve_conditioning
from diffsplit.engine.sampling.continuous_time import is_continuous
from diffsplit.engine.sampling.control import AdapterFeatures, UNetInputs, control_residuals
from diffsplit.engine.sampling.samplers import DenoiseFn
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.types import DiffusionModel, ModelSampling

#: Embeddings of lengths whose least common multiple exceeds this many times the shorter are run apart.
MAX_CONTEXT_REPEAT = 4
#: ComfyUI's starting count for pixels no entry covers (their prediction stays 0).
_EMPTY_COUNT = 1e-37


def scaled_input(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The UNet input ``x / sqrt(sigma^2 + 1)``."""
    return x / (sigma**2 + 1.0) ** 0.5


def denoised_from_output(
    sampling: ModelSampling, x: torch.Tensor, output: torch.Tensor, sigma: float
) -> torch.Tensor:
    """The denoised latent from a UNet output (epsilon or v prediction)."""
    if sampling.prediction_type == "v_prediction":
        return x / (sigma**2 + 1.0) - output * (sigma / (sigma**2 + 1.0) ** 0.5)
    return x - output * sigma


def _context_repeat_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    shorter = min(a.shape[1], b.shape[1])
    return math.lcm(a.shape[1], b.shape[1]) // shorter <= MAX_CONTEXT_REPEAT


def _added_match(a: ResolvedCond, b: ResolvedCond) -> bool:
    if a.added is None or b.added is None:
        return a.added is None and b.added is None
    return a.added.keys() == b.added.keys() and all(a.added[k].shape == b.added[k].shape for k in a.added)


def can_batch(a: ResolvedCond, b: ResolvedCond, height: int, width: int) -> bool:
    """Whether two entries can share one UNet forward pass."""
    return (
        a.region(height, width)[:2] == b.region(height, width)[:2]
        and a.control is b.control
        and (a is b or (a.gligen is None and b.gligen is None))
        and _added_match(a, b)
        and _context_repeat_ok(a.context, b.context)
    )


def _batched_context(group: Sequence[ResolvedCond]) -> torch.Tensor:
    length = 1
    for cond in group:
        length = math.lcm(length, cond.context.shape[1])
    return torch.cat([c.context.repeat(1, length // c.context.shape[1], 1) for c in group])


def _batched_added(group: Sequence[ResolvedCond], device: torch.device) -> dict[str, torch.Tensor] | None:
    first = group[0].added
    if first is None:
        return None
    return {
        name: torch.cat([c.added[name] for c in group if c.added is not None]).to(device) for name in first
    }


@dataclass(frozen=True, eq=False)
class CFGDenoiser:
    """``denoiser(x, sigma) -> denoised`` with classifier-free guidance over resolved conditioning."""

    model: DiffusionModel
    schedule: DiscreteSchedule
    conds: tuple[ResolvedCond, ...]
    cfg: float
    #: the conditioning scale estimator of this run (``--conditions auto``), or None
    pruner: ConditionPruner | None = None
    #: this run's T2I-Adapter features, computed once per hint
    adapter_features: AdapterFeatures = field(default_factory=AdapterFeatures)

    @classmethod
    def build(
        cls,
        model: DiffusionModel,
        positive: Sequence[Sequence[Any]],
        negative: Sequence[Sequence[Any]],
        cfg: float,
        latent_shape: Sequence[int],
        *,
        seed: int = 0,
        pruner: Callable[[DiscreteSchedule], ConditionPruner] | None = None,
    ) -> CFGDenoiser:
        """Resolve ``positive``/``negative`` CONDITIONING for latents of ``latent_shape``.

        ``seed`` is the sampler's (unCLIP noise augmentation draws from it); ``pruner(schedule)``
        makes the run's conditioning scale estimator.
        """
        schedule = DiscreteSchedule(model.sampling)
        conds = resolve_conditioning(model, schedule, positive, negative, tuple(latent_shape), seed=seed)
        return cls(model=model, schedule=schedule, conds=conds, cfg=float(cfg),
                   pruner=None if pruner is None else pruner(schedule))

    @property
    def runs_uncond(self) -> bool:
        """False when cfg is 1: negative entries are skipped."""
        return not math.isclose(self.cfg, 1.0)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided denoised latent for ``x`` at ``sigma`` (a scalar or one value per batch row)."""
        sigma_value = float(torch.as_tensor(sigma).reshape(-1)[0])
        # a number (ComfyUI's arithmetic, bit for bit) unless a sampler differentiates in sigma
        sigma_input: float | torch.Tensor = sigma_value
        if is_continuous():
            sigma_input = torch.as_tensor(sigma).reshape(-1)[0]
        height, width = x.shape[-2:]
        pending = [
            c for c in self.conds if c.is_active(sigma_value) and (self.runs_uncond or not c.is_uncond)
        ]
        sums = {False: torch.zeros_like(x), True: torch.zeros_like(x)}
        counts = {False: torch.full_like(x, _EMPTY_COUNT), True: torch.full_like(x, _EMPTY_COUNT)}
        while pending:
            group = [c for c in pending if can_batch(pending[0], c, height, width)]
            pending = [c for c in pending if all(c is not g for g in group)]
            for cond, denoised in zip(group, self._predict(group, x, sigma_input), strict=True):
                h, w, y, x0 = cond.region(height, width)
                weight = cond.weight.to(device=x.device, dtype=x.dtype)
                sums[cond.is_uncond][:, :, y : y + h, x0 : x0 + w] += denoised * weight
                counts[cond.is_uncond][:, :, y : y + h, x0 : x0 + w] += weight
        cond_pred = sums[False] / counts[False]
        uncond_pred = sums[True] / counts[True]
        return uncond_pred + (cond_pred - uncond_pred) * self.cfg

    def _predict(
        self, group: Sequence[ResolvedCond], x: torch.Tensor, sigma: float | torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """One UNet forward for ``group``; the denoised latent of each entry's area."""
        height, width = x.shape[-2:]
        crops = []
        for cond in group:
            h, w, y, x0 = cond.region(height, width)
            crops.append(x[:, :, y : y + h, x0 : x0 + w])
        x_batch = torch.cat(crops)
        unet = self.model.unet
        dtype, device = unet.dtype, x.device
        inputs = UNetInputs(
            x_in=scaled_input(x_batch, sigma),
            timestep=self._timestep(sigma).expand(x_batch.shape[0]).to(device),
            context=_batched_context(group).to(device),
            added=_batched_added(group, device),
            adapter_features=self.adapter_features,
        )
        if self.pruner is not None:
            residuals = self.pruner.residuals(group[0].control, float(sigma), inputs)
        else:
            residuals = control_residuals(group[0].control, self.schedule, float(sigma), inputs)
        extra = {} if residuals is None else residuals.as_unet_kwargs(dtype)
        gligen = group[0].gligen
        if gligen is not None:
            unet = gligen.unet
            extra.update(gligen.unet_kwargs(x_batch.shape))
        added = None if inputs.added is None else {k: v.to(dtype) for k, v in inputs.added.items()}
        x_unet = inputs.x_in
        concat = batched_concat(group, height, width, x_unet)
        if concat is not None:  # an InstructPix2Pix UNet: the image latent after the noisy one
            x_unet = torch.cat([x_unet, concat], dim=1)
        output = unet(
            x_unet.to(dtype),
            inputs.timestep,
            encoder_hidden_states=inputs.context.to(dtype),
            added_cond_kwargs=added,
            return_dict=False,
            **extra,
        )[0].to(x.dtype)
        denoised = denoised_from_output(self.model.sampling, x_batch, output, sigma)
        return denoised.chunk(len(group))


    def _timestep(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The nearest training timestep (ComfyUI), or for a tensor sigma the fractional one (continuous)."""
        if isinstance(sigma, torch.Tensor):
            return self.schedule.continuous_timestep(sigma)
        return self.schedule.timestep(torch.tensor(sigma))


@dataclass(frozen=True, eq=False)
class InpaintDenoiser:
    """Holds the region outside ``denoise_mask`` (mask 0) at the original latent (KSamplerX0Inpaint)."""

    inner: DenoiseFn
    latent_image: torch.Tensor
    noise: torch.Tensor
    #: ``[B, C, h, w]`` in [0, 1]: 1 = regenerate, 0 = keep
    denoise_mask: torch.Tensor

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The inner prediction inside the mask, the original latent outside it."""
        keep = 1.0 - self.denoise_mask
        sigma_value = float(torch.as_tensor(sigma).reshape(-1)[0])
        held = self.latent_image + self.noise * (torch.as_tensor(sigma).reshape(-1)[0] if is_continuous()
                                                 else sigma_value)
        denoised = self.inner(x * self.denoise_mask + held * keep, sigma)
        return denoised * self.denoise_mask + self.latent_image * keep


def prepare_denoise_mask(noise_mask: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """A LATENT ``noise_mask`` (``[B?, 1?, H, W]`` pixels) as ``[B, C, h, w]`` latent weights (bilinear)."""
    batch, channels, height, width = latent_shape
    mask = noise_mask.float().reshape(-1, 1, noise_mask.shape[-2], noise_mask.shape[-1])
    mask = torch.nn.functional.interpolate(mask, size=(height, width), mode="bilinear")
    mask = mask.repeat(1, channels, 1, 1)
    repeats = -(-batch // mask.shape[0])
    return mask.repeat(repeats, 1, 1, 1)[:batch]
