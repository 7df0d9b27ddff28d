"""A 2D Gaussian mixture with an exact denoiser: ground truth for ODE samplers (GENIE's 2D experiment).

With ``x = x0 + sigma * eps`` and ``x0`` drawn from ``sum_k w_k N(mu_k, s^2 I)``,
``E[x0 | x]`` is known in closed form, so the probability-flow ODE can be solved
to any accuracy and every sampler's error measured against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixture:
    """Components ``means`` (K x 2), ``weights`` (K) and one isotropic variance, in float64."""

    means: torch.Tensor
    weights: torch.Tensor
    variance: float

    @classmethod
    def default(cls) -> GaussianMixture:
        """Three well separated narrow modes (the document's setting: a multimodal 2D distribution)."""
        means = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        return cls(means, torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64), 0.05)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x]`` at noise level ``sigma`` (differentiable, forward mode included)."""
        total = self.variance + sigma**2
        distance = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        responsibility = torch.softmax(self.weights.log()[None] - distance / (2 * total), dim=-1)
        posterior = (self.variance * x[:, None, :] + sigma**2 * self.means[None]) / total
        return (responsibility[..., None] * posterior).sum(1)

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` points of the data distribution."""
        component = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        noise = torch.randn(count, 2, dtype=torch.float64, generator=generator)
        return self.means[component] + self.variance**0.5 * noise

    def noised(self, count: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
        """Points of the marginal at ``sigma`` (data plus ``sigma`` times Gaussian noise)."""
        clean = self.sample(count, generator)
        return clean + sigma * torch.randn(count, 2, dtype=torch.float64, generator=generator)


def ddim_reference(
    mixture: GaussianMixture, x: torch.Tensor, sigma_from: float, sigma_to: float, steps: int = 10_000
) -> torch.Tensor:
    """The ODE's solution from ``sigma_from`` to ``sigma_to`` by ``steps`` DDIM steps (the ground truth)."""
    grid = torch.linspace(sigma_from, sigma_to, steps + 1, dtype=torch.float64)
    for i in range(steps):
        eps = (x - mixture.denoise(x, grid[i])) / grid[i]
        x = x + (grid[i + 1] - grid[i]) * eps
    return x


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """The sliced 1-Wasserstein distance of two equally sized 2D point sets."""
    generator = torch.Generator().manual_seed(seed)
    angles = torch.rand(projections, dtype=torch.float64, generator=generator) * torch.pi
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    pa = (a @ directions.T).sort(dim=0).values
    pb = (b @ directions.T).sort(dim=0).values
    return float((pa - pb).abs().mean())
