"""DualCFGGuider's denoiser: ComfyUI's ``Guider_DualCFG`` over three conditionings.

With positive ``P`` (``cond1``), middle ``M`` (``cond2``) and negative ``N``
predictions (each averaged over its entries as in :class:`CFGDenoiser`), ``cfg``
(``cfg_conds``) and ``cfg_middle`` (``cfg_cond2_negative``):

- regular: ``N + (M - N) * cfg_middle + (P - M) * cfg``; when ``cfg_middle`` is 1
  the negative entries are not run (their prediction is 0), and when ``cfg`` is
  1 too neither are the middle ones (ComfyUI's cfg1 shortcut);
- nested: ``T = M + (P - M) * cfg``, then ``N + (T - N) * cfg_middle``.

Entries of all three run batched where they can (negative, middle, positive
order, as ComfyUI lists them). The middle entries are resolved as negative
prompts are (ComfyUI marks them ``prompt_type: negative``: the refiner's
aesthetic score default 2.5). ComfyUI's area fix-ups pair the positive with the
negative and with the middle conditioning here (not the middle with the negative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.sampling.conds import resolve_conditioning
from diffsplit.engine.sampling.denoiser import CFGDenoiser, can_batch
from diffsplit.engine.sampling.samplers import DenoiseFn
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.types import DiffusionModel, Guider

NEGATIVE, MIDDLE, POSITIVE = 0, 1, 2
_EMPTY_COUNT = 1e-37

#: Builds a denoiser for latents of a shape, given the sampler's seed.
DenoiserFactory = Callable[[tuple[int, ...], int], DenoiseFn]


@dataclass(frozen=True, eq=False)
class DualCFGDenoiser(CFGDenoiser):
    """``denoiser(x, sigma) -> denoised`` with dual classifier-free guidance (see module doc)."""

    #: which prediction each entry of ``conds`` adds to: NEGATIVE, MIDDLE or POSITIVE
    pools: tuple[int, ...] = ()
    cfg_middle: float = 1.0
    nested: bool = False

    @classmethod
    def build_dual(
        cls,
        model: DiffusionModel,
        positive: Sequence[Sequence[Any]],
        middle: Sequence[Sequence[Any]],
        negative: Sequence[Sequence[Any]],
        latent_shape: Sequence[int],
        *,
        cfg: float,
        cfg_middle: float,
        nested: bool,
        seed: int = 0,
    ) -> DualCFGDenoiser:
        """Resolve the three conditionings for latents of ``latent_shape``."""
        schedule = DiscreteSchedule(model.sampling)
        shape = tuple(latent_shape)
        with_negative = resolve_conditioning(model, schedule, positive, negative, shape, seed=seed)
        with_middle = resolve_conditioning(model, schedule, positive, middle, shape, seed=seed)
        entries = (
            [(NEGATIVE, c) for c in with_negative if c.is_uncond]
            + [(MIDDLE, c) for c in with_middle if c.is_uncond]
            + [(POSITIVE, c) for c in with_negative if not c.is_uncond]
        )
        return cls(
            model=model, schedule=schedule, conds=tuple(c for _, c in entries), cfg=float(cfg),
            pools=tuple(pool for pool, _ in entries), cfg_middle=float(cfg_middle), nested=bool(nested),
        )

    def _skipped(self) -> set[int]:
        if self.nested or not math.isclose(self.cfg_middle, 1.0):
            return set()
        return {NEGATIVE, MIDDLE} if math.isclose(self.cfg, 1.0) else {NEGATIVE}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The dual-guided denoised latent for ``x`` at ``sigma``."""
        sigma_value = float(torch.as_tensor(sigma).reshape(-1)[0])
        height, width = x.shape[-2:]
        skipped = self._skipped()
        pending = [
            (pool, cond) for pool, cond in zip(self.pools, self.conds, strict=True)
            if pool not in skipped and cond.is_active(sigma_value)
        ]
        sums = [torch.zeros_like(x) for _ in range(3)]
        counts = [torch.full_like(x, _EMPTY_COUNT) for _ in range(3)]
        while pending:
            first = pending[0][1]
            group = [(pool, cond) for pool, cond in pending if can_batch(first, cond, height, width)]
            pending = [item for item in pending if all(item[1] is not other for _, other in group)]
            predictions = self._predict([cond for _, cond in group], x, sigma_value)
            for (pool, cond), denoised in zip(group, predictions, strict=True):
                h, w, y, x0 = cond.region(height, width)
                weight = cond.weight.to(device=x.device, dtype=x.dtype)
                sums[pool][:, :, y : y + h, x0 : x0 + w] += denoised * weight
                counts[pool][:, :, y : y + h, x0 : x0 + w] += weight
        negative, middle, positive = (total / count for total, count in zip(sums, counts, strict=True))
        if self.nested:
            text = middle + (positive - middle) * self.cfg
            return negative + (text - negative) * self.cfg_middle
        return negative + (middle - negative) * self.cfg_middle + (positive - middle) * self.cfg


def guider_denoiser(guider: Guider) -> DenoiserFactory | None:
    """The denoiser factory of a guider that is not plain CFG (DualCFGGuider), else None."""
    if guider.middle is None:
        return None

    def build(latent_shape: tuple[int, ...], seed: int) -> DenoiseFn:
        return DualCFGDenoiser.build_dual(
            guider.model, guider.positive, guider.middle, guider.negative, latent_shape,
            cfg=guider.cfg, cfg_middle=guider.cfg_middle, nested=guider.nested, seed=seed,
        )

    return build
