"""Seeded noise, ComfyUI-compatible and always drawn on the CPU.

- :func:`prepare_noise` is ComfyUI's ``prepare_noise``: a CPU generator seeded
  with the seed draws ``randn(latent.shape)`` (or, with ``batch_index``, one
  latent-sized draw per index up to the largest, keeping the ones asked for).
- Samplers that add noise while sampling take a :class:`NoiseSampler`, a
  callable ``(sigma, sigma_next) -> Tensor`` shaped like the latent.
  :class:`GaussianNoiseSampler` draws ``randn`` from a CPU generator, the stream
  ComfyUI's ``default_noise_sampler`` uses when it is given the seed (it is
  seeded with the same seed as the start noise). :class:`BrownianTreeNoiseSampler`
  returns normalised increments ``(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|``
  of one Brownian path over sigma from torchsde's ``BrownianTree``, built and
  seeded as ComfyUI builds it, so SDE samplers match ComfyUI seed for seed.

Drawing on the CPU makes the numbers independent of the device that samples,
so a step run on a remote GPU sees the same noise as the local run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Protocol

import torch


class NoiseSampler(Protocol):
    """Fresh standard-normal noise for the step from ``sigma`` to ``sigma_next``."""

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor: ...


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded like ``torch.manual_seed(seed)`` (seeds up to 2**64 - 1)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """ComfyUI's start noise for ``latent``: CPU ``randn`` from a generator seeded with ``seed``.

    With ``batch_index`` (from LatentFromBatch and friends), noise is drawn per
    index so that latent ``i`` of a batch gets the same noise as when it is
    sampled alone.
    """
    generator = seeded_generator(seed)
    if batch_index is None:
        return torch.randn(
            latent.shape, dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu"
        )
    wanted = sorted(set(batch_index))
    single_shape = (1, *latent.shape[1:])
    draws: dict[int, torch.Tensor] = {}
    for index in range(wanted[-1] + 1):
        draw = torch.randn(single_shape, dtype=latent.dtype, generator=generator, device="cpu")
        if index in wanted:
            draws[index] = draw
    return torch.cat([draws[index] for index in batch_index], dim=0)


class GaussianNoiseSampler:
    """Independent ``randn`` draws shaped like ``like`` from a CPU generator (ComfyUI's default)."""

    def __init__(self, like: torch.Tensor, generator: torch.Generator) -> None:
        self._shape = like.shape
        self._dtype = like.dtype
        self._device = like.device
        self._generator = generator

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The next draw; the sigmas do not matter."""
        noise = torch.randn(self._shape, dtype=self._dtype, generator=self._generator, device="cpu")
        return noise.to(self._device)


class BrownianTreeNoiseSampler:
    """k-diffusion's (and so ComfyUI's) Brownian-tree noise: torchsde's ``BrownianTree`` over sigma.

    As ComfyUI builds it for ``dpmpp_sde``, ``dpmpp_2m_sde`` and
    ``dpmpp_3m_sde``: one tree on the CPU from ``sigma_min`` (the smallest
    sigma above 0) to ``sigma_max``, ``w0`` zeros like the latent, entropy the
    sampling seed. A query returns ``(W(sigma_next) - W(sigma)) / sqrt|sigma_next
    - sigma|``, the same numbers ComfyUI draws for that seed.
    """

    def __init__(self, like: torch.Tensor, sigma_min: float, sigma_max: float, seed: int) -> None:
        import torchsde

        # torchsde warns when a query lands a float32 rounding past the tree's end (ComfyUI logs the same)
        warnings.filterwarnings("ignore", message="Should have t[ab][<>]=t[01]", module="torchsde")
        self._device, self._dtype = like.device, like.dtype
        low, high = sorted((float(sigma_min), float(sigma_max)))
        start = torch.zeros(like.shape, dtype=like.dtype, device="cpu")
        self._tree = torchsde.BrownianTree(torch.tensor(low), start, torch.tensor(high), entropy=seed)

    @classmethod
    def for_run(
        cls, like: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator
    ) -> BrownianTreeNoiseSampler:
        """The tree of one sampling run over ``sigmas``, seeded with the generator's seed."""
        positive = sigmas[sigmas > 0]
        return cls(like, float(positive.min()), float(sigmas.max()), int(generator.initial_seed()))

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The normalised increment between the two sigmas (a standard normal sample)."""
        start = torch.as_tensor(sigma).detach().cpu().float()
        end = torch.as_tensor(sigma_next).detach().cpu().float()
        sign = 1.0 if start < end else -1.0
        low, high = (start, end) if start < end else (end, start)
        increment = self._tree(low, high) * sign
        return (increment / (end - start).abs().sqrt()).to(device=self._device, dtype=self._dtype)
