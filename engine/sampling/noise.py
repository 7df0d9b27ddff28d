"""Seeded noise, ComfyUI-compatible and always drawn on the CPU.

- :func:`prepare_noise` is ComfyUI's ``prepare_noise``: a CPU generator seeded
  with the seed draws ``randn(latent.shape)`` (or, with ``batch_index``, one
  latent-sized draw per index up to the largest, keeping the ones asked for).
- Samplers that add noise while sampling take a :class:`NoiseSampler`, a
  callable ``(sigma, sigma_next) -> Tensor`` shaped like the latent.
  :class:`GaussianNoiseSampler` draws ``randn`` from a CPU generator, the stream
  ComfyUI's ``default_noise_sampler`` uses when it is given the seed (it is
  seeded with the same seed as the start noise). :class:`BrownianNoiseSampler`
  returns normalised increments ``(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|``
  of one Brownian path over sigma, sampled lazily with Brownian bridges, so
  nested and adjacent intervals are consistent as with k-diffusion's
  ``BrownianTreeNoiseSampler`` (same law, not the same numbers: that one uses
  torchsde's tree).

Drawing on the CPU makes the numbers independent of the device that samples,
so a step run on a remote GPU sees the same noise as the local run.
"""

from __future__ import annotations

import bisect
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


class BrownianNoiseSampler:
    """Normalised increments of one Brownian path W over sigma (W(0) = 0), sampled lazily.

    The first query at a time beyond every known point extends the path with an
    independent increment; a query between two known points draws from the
    Brownian bridge between them. All draws come from ``generator`` on the CPU,
    so a run is reproducible from the seed.
    """

    def __init__(self, like: torch.Tensor, generator: torch.Generator) -> None:
        self._shape = like.shape
        self._device = like.device
        self._dtype = like.dtype
        self._generator = generator
        self._times: list[float] = [0.0]
        self._values: list[torch.Tensor] = [torch.zeros(like.shape, dtype=torch.float64)]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``: a standard normal sample."""
        start, end = float(sigma), float(sigma_next)
        if start == end:
            return torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        increment = self._value_at(end) - self._value_at(start)
        normalised = increment / abs(end - start) ** 0.5
        return normalised.to(dtype=self._dtype, device=self._device)

    def _value_at(self, time: float) -> torch.Tensor:
        if time < 0:
            raise ValueError(f"Brownian noise is defined for sigma >= 0, got {time}")
        position = bisect.bisect_left(self._times, time)
        if position < len(self._times) and self._times[position] == time:
            return self._values[position]
        left_time, left_value = self._times[position - 1], self._values[position - 1]
        draw = torch.randn(self._shape, dtype=torch.float64, generator=self._generator, device="cpu")
        if position == len(self._times):
            value = left_value + (time - left_time) ** 0.5 * draw
        else:
            right_time, right_value = self._times[position], self._values[position]
            fraction = (time - left_time) / (right_time - left_time)
            mean = left_value + fraction * (right_value - left_value)
            std = ((time - left_time) * (right_time - time) / (right_time - left_time)) ** 0.5
            value = mean + std * draw
        self._times.insert(position, time)
        self._values.insert(position, value)
        return value
