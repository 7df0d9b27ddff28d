"""GENIE: the second truncated Taylor method on the DDIM ODE (Dockhorn, Vahdat, Kreis; NeurIPS 2022).

In k-diffusion's variables (``x = x0 + sigma * eps``) DDIM is Euler's method on
``dx/dsigma = eps(x, sigma)`` with ``eps = (x - D(x, sigma)) / sigma``. GENIE adds
the second Taylor term::

    x_next = x + h * eps + h**2 / 2 * d eps / d sigma,      h = sigma_next - sigma

where the total derivative along the trajectory is the Jacobian-vector product
``J_x eps · eps + d eps / d sigma``: one forward-mode pass through the whole
denoiser (classifier-free guidance included) with tangents ``(eps, 1)``. A
discrete-time UNet is differentiated in continuous time (``continuous_time``:
the fractional timestep of sigma); ``eps`` itself is ComfyUI's, from the
nearest training timestep.

How the derivative is computed (:class:`Curvature`):

- ``"jvp"``: ``torch.func.jvp`` through ``denoise_fn``, exact (attention runs on
  torch's math kernel inside it: the fused CPU/CUDA kernels have no forward-mode rule). It costs one plain
  evaluation (for the tangent ``eps``) and one forward-mode evaluation, which
  carries primal and tangent together (about two evaluations' work): 3 NFE per step.
- ``"finite_difference"``: the central difference
  ``(eps(x + delta * eps, sigma + delta) - eps(x - delta * eps, sigma - delta)) / (2 * delta)``
  with ``delta = FD_RELATIVE_STEP * sigma`` (tested against the JVP): 3 NFE per step.
- ``"auto"`` (the ``genie`` sampler): the JVP, and the finite difference for the rest
  of the run when a layer has no forward-mode rule (``RuntimeError`` or
  ``NotImplementedError`` from the JVP; the reason is kept in ``Curvature.fallback_reason``).

:class:`Curvature` counts evaluations (``nfe``) so benchmarks compare samplers honestly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from diffsplit.engine.sampling.continuous_time import continuous_time
from diffsplit.engine.sampling.deterministic import notify
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from diffsplit.engine.sampling.samplers import DenoiseFn, StepCallback

CurvatureMethod = Literal["auto", "jvp", "finite_difference"]
#: The finite-difference step, relative to sigma.
FD_RELATIVE_STEP = 1e-3
#: What one forward-mode evaluation costs, in plain evaluations (primal and tangent together).
JVP_COST_NFE = 2


@dataclass
class Curvature:
    """Computes ``eps`` and its total derivative along the DDIM ODE; counts function evaluations."""

    denoise_fn: DenoiseFn
    method: CurvatureMethod = "auto"
    nfe: int = 0
    fallback_reason: str | None = field(default=None)

    def epsilon(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, denoised) at ``(x, sigma)``: one evaluation."""
        self.nfe += 1
        denoised = self.denoise_fn(x, sigma)
        return (x - denoised) / sigma, denoised

    def derivative(self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``d eps / d sigma`` along the trajectory through ``(x, sigma)`` whose slope is ``eps``."""
        if self.method == "finite_difference" or self.fallback_reason is not None:
            return self._finite_difference(x, sigma, eps)
        try:
            return self._jvp(x, sigma, eps)
        except (RuntimeError, NotImplementedError) as exc:
            if self.method == "jvp":
                raise
            self.fallback_reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            return self._finite_difference(x, sigma, eps)

    def _jvp(self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        def epsilon_of(x_in: torch.Tensor, sigma_in: torch.Tensor) -> torch.Tensor:
            return (x_in - self.denoise_fn(x_in, sigma_in)) / sigma_in

        self.nfe += JVP_COST_NFE
        # the fused attention kernels have no forward-mode rule; the math kernel computes the same function
        with exclusive_jvp(), continuous_time():
            _, tangent = torch.func.jvp(epsilon_of, (x, sigma), (eps, torch.ones_like(sigma)))
        return tangent

    def _finite_difference(self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        delta = sigma * FD_RELATIVE_STEP
        with continuous_time():
            ahead, _ = self.epsilon(x + delta * eps, sigma + delta)
            behind, _ = self.epsilon(x - delta * eps, sigma - delta)
        return (ahead - behind) / (2 * delta)


#: torch's forward-mode AD levels and its SDPA kernel switch are process-wide, not per thread: two
#: threads inside ``torch.func.jvp`` at once break each other's dual levels, and one leaving
#: ``sdpa_kernel`` turns the fused kernels back on under the other. One JVP at a time, then.
_JVP_LOCK = threading.Lock()


@contextmanager
def exclusive_jvp() -> Iterator[None]:
    """This thread alone takes a JVP, with the math attention kernel (fused ones have no forward rule).

    Other threads keep sampling meanwhile; one that runs attention with another sampler while
    a JVP holds the switch gets the math kernel: the same function, rounded differently.
    """
    with _JVP_LOCK, sdpa_kernel([SDPBackend.MATH]):
        yield


def genie_step(
    curvature: Curvature, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GENIE step from ``sigma`` to ``sigma_next``: (x at sigma_next, denoised at sigma)."""
    eps, denoised = curvature.epsilon(x, sigma)
    h = sigma_next - sigma
    slope = curvature.derivative(x, sigma, eps)
    return x + h * eps + 0.5 * h * h * slope, denoised


def run_genie(
    curvature: Curvature,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """GENIE steps along ``sigmas``; the last step to sigma 0 is DDIM's (x0 = denoised), as in the paper."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if float(sigma_next) == 0.0:
            _, denoised = curvature.epsilon(x, sigma)
            notify(callback, i, x, denoised)
            x = denoised
            continue
        x_next, denoised = genie_step(curvature, x, sigma, sigma_next)
        notify(callback, i, x, denoised)
        x = x_next
    return x


def sample_genie(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """The ``genie`` sampler: exact curvature by JVP, finite differences where forward mode is missing."""
    with torch.no_grad():
        return run_genie(Curvature(denoise_fn), x, sigmas, callback=callback)


class MissingGenieHead(ValueError):
    """The ``genie_head`` sampler ran on a MODEL that carries no head."""


def attached_head(denoise_fn: object) -> torch.nn.Module:
    """The GENIE head of the MODEL behind ``denoise_fn`` (through wrappers such as inpainting)."""
    current: object | None = denoise_fn
    for _ in range(8):
        head = getattr(getattr(current, "model", None), "genie_head", None)
        if isinstance(head, torch.nn.Module):
            return head
        current = getattr(current, "inner", None)
        if current is None:
            break
    raise MissingGenieHead(
        "the genie_head sampler needs a MODEL with a GENIE head: load one with GenieHeadLoader "
        "(or train one with `diffsplit genie distill`), or use the genie sampler (exact, by JVP)"
    )


@dataclass
class HeadCurvature(Curvature):
    """The curvature predicted by a distilled head: no extra evaluation of the denoiser."""

    head: torch.nn.Module | None = None

    def derivative(self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise MissingGenieHead("HeadCurvature needs a head")
        scaled = x / (sigma**2 + 1.0) ** 0.5
        return self.head(scaled, eps, sigma)


def sample_genie_head(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """The ``genie_head`` sampler: GENIE steps with the curvature of the MODEL's head (1 NFE per step)."""
    head = attached_head(denoise_fn)
    with torch.no_grad():
        return run_genie(HeadCurvature(denoise_fn, head=head), x, sigmas, callback=callback)
