"""Noise schedules the ComfyUI way: sigma tables, sigma <-> timestep, and the named schedulers.

A :class:`DiscreteSchedule` is ComfyUI's ``ModelSamplingDiscrete`` for one
:class:`~diffsplit.engine.types.ModelSampling`: the model's 1000 training
sigmas, the timestep of a sigma (the nearest training sigma, in log space) and
the sigma of a fractional timestep (log-sigmas interpolated linearly).

``sigmas(model_sampling, scheduler_name, steps)`` returns the descending sigmas
of one sampling run, ending in 0, like ComfyUI's ``calculate_sigmas``. Every
scheduler gives ``steps + 1`` values except ``ddim_uniform``, which (exactly as
ComfyUI) walks the training table with a stride of ``1000 // steps`` and so
may give a few more when ``steps`` does not divide 1000, and ``beta``, which
drops repeated timesteps and so may give fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffsplit.engine.types import ModelSampling

#: ComfyUI's scheduler names, in ComfyUI's order.
SCHEDULER_NAMES: tuple[str, ...] = (
    "normal",
    "karras",
    "exponential",
    "sgm_uniform",
    "simple",
    "ddim_uniform",
    "beta",
    "linear_quadratic",
    "kl_optimal",
)

#: sigma used for "no lower bound" by percent_to_sigma(0.0) (ComfyUI's constant).
_SIGMA_INFINITY = 999999999.9


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The training sigmas of a discrete-time model and conversions between sigma and timestep."""

    model_sampling: ModelSampling
    sigmas: torch.Tensor = field(init=False)
    log_sigmas: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        table = self.model_sampling.sigmas()
        object.__setattr__(self, "sigmas", table)
        object.__setattr__(self, "log_sigmas", table.log())

    @property
    def sigma_min(self) -> float:
        """The smallest training sigma (timestep 0)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """The largest training sigma (the last timestep)."""
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep whose sigma is nearest to ``sigma`` (in log space), as float32."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        distances = sigma.log().reshape(1, -1) - self.log_sigmas.reshape(-1, 1)
        return distances.abs().argmin(dim=0).reshape(sigma.shape).to(torch.float32)

    def continuous_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep of ``sigma``, interpolated in log-sigma: smooth and differentiable."""
        return continuous_timestep(self.log_sigmas, sigma)

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """The sigma of a (fractional) timestep: log-sigmas interpolated linearly, float32."""
        t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, len(self.sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        weight = t.frac()
        log_sigma = (1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]
        return log_sigma.exp()

    def percent_to_sigma(self, percent: float) -> float:
        """The sigma at ``percent`` of the way through sampling (0 = start, 1 = end), like ComfyUI."""
        if percent <= 0.0:
            return _SIGMA_INFINITY
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))


def continuous_timestep(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of ``sigma`` in an ascending table of training log-sigmas.

    k-diffusion's unquantized ``sigma_to_t``: linear in log-sigma between neighbours, smooth and
    differentiable in sigma.
    """
    log_sigma = torch.as_tensor(sigma, dtype=torch.float32).log()
    table = log_sigmas.to(log_sigma.device)
    below = (log_sigma.reshape(1, -1) >= table.reshape(-1, 1)).sum(dim=0) - 1
    low = below.clamp(0, len(table) - 2).reshape(log_sigma.shape)
    high = low + 1
    weight = ((log_sigma - table[low]) / (table[high] - table[low])).clamp(0, 1)
    return low.to(torch.float32) + weight


def sigmas(model_sampling: ModelSampling, scheduler_name: str, steps: int) -> torch.Tensor:
    """The descending float32 sigmas of ``scheduler_name`` for ``steps`` steps, ending in 0.

    Raises ValueError for an unknown scheduler name or ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    schedule = DiscreteSchedule(model_sampling)
    if scheduler_name == "normal":
        return _normal(schedule, steps, sgm=False)
    if scheduler_name == "sgm_uniform":
        return _normal(schedule, steps, sgm=True)
    if scheduler_name == "karras":
        return karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
    if scheduler_name == "exponential":
        return exponential_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
    if scheduler_name == "simple":
        return _simple(schedule, steps)
    if scheduler_name == "ddim_uniform":
        return _ddim_uniform(schedule, steps)
    if scheduler_name == "beta":
        return beta_sigmas(schedule, steps)
    if scheduler_name == "linear_quadratic":
        return linear_quadratic_sigmas(schedule, steps)
    if scheduler_name == "kl_optimal":
        return kl_optimal_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
    raise ValueError(f"unknown scheduler {scheduler_name!r}; known: {', '.join(SCHEDULER_NAMES)}")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) sigmas: uniform in sigma**(1/rho), then a final 0."""
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    values = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return _append_zero(values)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas uniform in log space from sigma_max to sigma_min, then a final 0."""
    values = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp()
    return _append_zero(values)


def beta_sigmas(
    schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6
) -> torch.Tensor:
    """ComfyUI's "beta" scheduler: training timesteps at the quantiles of a Beta(alpha, beta).

    Timesteps ``rint(ppf(1 - i/steps) * 999)``; a timestep equal to the one
    before it is dropped (so short runs may have fewer steps, as in ComfyUI).
    """
    from scipy.stats import beta as beta_distribution

    last_index = len(schedule.sigmas) - 1
    quantiles = 1 - torch.linspace(0, 1, steps + 1, dtype=torch.float64)[:-1].numpy()
    timesteps = [round(float(t)) for t in beta_distribution.ppf(quantiles, alpha, beta) * last_index]
    values: list[float] = []
    previous = None
    for timestep in timesteps:
        if timestep != previous:
            values.append(float(schedule.sigmas[int(timestep)]))
        previous = timestep
    return torch.tensor([*values, 0.0], dtype=torch.float32)


def linear_quadratic_sigmas(
    schedule: DiscreteSchedule, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> torch.Tensor:
    """ComfyUI's "linear_quadratic" scheduler (from Mochi): linear, then quadratic, times sigma_max."""
    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        linear = steps // 2 if linear_steps is None else linear_steps
        ramp = [i * threshold_noise / linear for i in range(linear)]
        step_diff = linear - threshold_noise * steps
        quadratic = steps - linear
        quadratic_coef = step_diff / (linear * quadratic**2)
        linear_coef = threshold_noise / linear - 2 * step_diff / quadratic**2
        const = quadratic_coef * linear**2
        curve = [quadratic_coef * i**2 + linear_coef * i + const for i in range(linear, steps)]
        fractions = [1.0 - x for x in [*ramp, *curve, 1.0]]
    sigma_max = torch.tensor(schedule.sigma_max, dtype=torch.float32)
    return torch.tensor(fractions, dtype=torch.float32) * sigma_max


def kl_optimal_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """ComfyUI's "kl_optimal" scheduler (Align Your Steps): uniform in arctan(sigma), then a final 0."""
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float32)
    fraction = torch.arange(steps, dtype=torch.float32).div_(steps - 1)
    values = (fraction * math.atan(sigma_min) + (1 - fraction) * math.atan(sigma_max)).tan_()
    return _append_zero(values)


def _normal(schedule: DiscreteSchedule, steps: int, *, sgm: bool) -> torch.Tensor:
    start = float(schedule.timestep(torch.tensor(schedule.sigma_max)))
    end = float(schedule.timestep(torch.tensor(schedule.sigma_min)))
    timesteps = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    values = [float(schedule.sigma(t)) for t in timesteps]
    return torch.tensor([*values, 0.0], dtype=torch.float32)


def _simple(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    stride = len(schedule.sigmas) / steps
    values = [float(schedule.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor([*values, 0.0], dtype=torch.float32)


def _ddim_uniform(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    stride = max(len(schedule.sigmas) // steps, 1)
    values = [float(schedule.sigmas[index]) for index in range(1, len(schedule.sigmas), stride)]
    return torch.tensor([*reversed(values), 0.0], dtype=torch.float32)


def _append_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.to(torch.float32), values.new_zeros(1, dtype=torch.float32)])
