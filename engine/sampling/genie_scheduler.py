"""GENIE for diffusers pipelines: a scheduler-like object that takes second truncated Taylor steps.

::

    pipe.scheduler = diffsplit.samplers.genie(pipe)
    image = pipe(prompt, num_inference_steps=8).images[0]

Each step is ``x + h * eps + h**2 / 2 * d eps / d sigma`` (``sampling.genie``).
The pipeline's own UNet call gives ``eps``; the curvature needs the *guided*
denoiser as a function of ``(x, sigma)``, which a scheduler never sees. So the
scheduler watches the UNet: a forward hook keeps the last call's arguments
(text embeddings, SDXL's added conditions, ...) and its output, and the
curvature replays that call on new latents and a new sigma:

- the UNet's input must be the scheduler's own ``scale_model_input`` result,
  the step's latents repeated ``k`` times (``k = 2`` with classifier-free
  guidance); a pipeline that changes it (an inpainting UNet's extra channels)
  or adds inputs that depend on the latents (ControlNet residuals) is refused
  by name, and ``curvature="head"`` still works there;
- the guided output is ``u + g * (c - u)`` of the ``k`` outputs: ``g`` is
  solved from the pipeline's result and the fit checked, so a pipeline whose
  guidance is not of that form (``guidance_rescale``) is refused, never
  differentiated wrongly.

Timesteps are continuous: each sigma's fractional training timestep,
interpolated in log-sigma as diffusers' Karras Euler does, so the function the
JVP differentiates is the one the pipeline evaluates. Sigmas follow the Karras
schedule over the model's training range (or the pipeline's ``sigmas=``); the
step to sigma 0 is DDIM's, as in the paper.

``curvature``: ``"auto"`` (the JVP, finite differences where forward mode is
missing, and for a UNet offloaded with ``diffsplit.offload``: forward-mode
tangents do not cross the wire), ``"jvp"``, ``"finite_difference"``, or
``"head"`` (a distilled GENIE head: no extra UNet call). ``nfe`` counts
evaluations honestly: the pipeline's own call per step plus the curvature's (a
JVP costs two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffsplit.engine.call_offload import is_offloaded
from diffsplit.engine.sampling.genie import Curvature, HeadCurvature
from diffsplit.engine.sampling.schedules import continuous_timestep, karras_sigmas
from torch.utils.hooks import RemovableHandle

CurvatureChoice = Literal["auto", "jvp", "finite_difference", "head"]
CURVATURE_CHOICES: tuple[str, ...] = ("auto", "jvp", "finite_difference", "head")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
#: Why ``"auto"`` takes finite differences for an offloaded UNet.
OFFLOADED_REASON = "the UNet runs on a worker: forward-mode tangents do not cross the wire"


class GenieSchedulerError(ValueError):
    """The GENIE scheduler cannot take this pipeline's steps (the message says why and what works)."""


@dataclass(frozen=True)
class GenieStepOutput:
    """What ``step`` returns with ``return_dict=True`` (diffusers' field names)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


@dataclass(frozen=True)
class _UNetCall:
    """The pipeline's last UNet call: its arguments and its output (the noise prediction, all k rows)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor


@dataclass(frozen=True)
class _Replay:
    """How to evaluate the guided denoiser the pipeline evaluated at this step, on other (x, sigma)."""

    call: _UNetCall
    repeats: int
    guidance: float


#: UNet keywords that carry values computed from the latents: replaying them unchanged would be wrong.
_LATENT_DEPENDENT_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual",
                            "down_intrablock_additional_residuals")


def _unet_output(result: Any) -> torch.Tensor:
    if isinstance(result, tuple):
        return result[0]
    sample = getattr(result, "sample", None)
    if not isinstance(sample, torch.Tensor):
        raise GenieSchedulerError(f"the UNet returned {type(result).__name__}, not a noise prediction")
    return sample


def _check_fit(name: str, fitted: torch.Tensor, actual: torch.Tensor) -> None:
    tolerance = 2e-2 if actual.dtype in (torch.float16, torch.bfloat16) else 1e-3
    scale = float(actual.float().abs().max().clamp_min(1e-6))
    if float((fitted - actual.float()).abs().max()) > tolerance * scale:
        raise GenieSchedulerError(
            f"{name}: the pipeline's noise prediction is not u + g * (c - u) of its UNet outputs (a "
            "guidance_rescale, or another transform of the guided output?); GENIE's curvature would "
            'differentiate a different function. Turn that option off, or use curvature="head"'
        )


class GenieScheduler:
    """A diffusers-style scheduler that takes GENIE steps; build it with ``diffsplit.samplers.genie``."""

    order = 1

    def __init__(
        self,
        unet: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        *,
        prediction_type: str = "epsilon",
        curvature: CurvatureChoice = "auto",
        head: torch.nn.Module | None = None,
        rho: float = 7.0,
        config: Any = None,
    ) -> None:
        if curvature not in CURVATURE_CHOICES:
            raise GenieSchedulerError(f"curvature must be one of {', '.join(CURVATURE_CHOICES)}, "
                                      f"got {curvature!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise GenieSchedulerError(f"prediction_type {prediction_type!r} is not supported "
                                      f"(supported: {', '.join(PREDICTION_TYPES)})")
        if (curvature == "head") != (head is not None):
            raise GenieSchedulerError('give a head exactly when curvature="head"')
        if curvature == "jvp" and is_offloaded(unet):
            raise GenieSchedulerError(
                "the UNet runs on a worker: forward-mode tangents do not cross the wire; use "
                'curvature="finite_difference" (or "auto", which does), or "head"'
            )
        if not isinstance(rho, int | float) or not 0 < rho <= 100:
            raise GenieSchedulerError(f"rho must be in (0, 100], got {rho!r}")
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if len(table) < 2 or not bool(((table > 0) & (table < 1)).all()):
            raise GenieSchedulerError("alphas_cumprod must hold at least two values in (0, 1)")
        training_sigmas = ((1 - table) / table).sqrt().float()
        self.alphas_cumprod = table.float()
        self.unet = unet
        self.prediction_type = prediction_type
        self.curvature = curvature
        self.head = head
        self.rho = float(rho)
        self.config = config
        self.log_sigmas = training_sigmas.log()
        self.sigma_min = float(training_sigmas.min())
        self.sigma_max = float(training_sigmas.max())
        self.sigmas = torch.zeros(0)
        self.timesteps = torch.zeros(0)
        self.num_inference_steps = 0
        self.fallback_reason: str | None = None
        self._pipeline_nfe = 0
        self._curvature: Curvature | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._scaled: torch.Tensor | None = None
        self._last_call: _UNetCall | None = None
        self._replay: _Replay | None = None
        self._replaying = False
        self._hook: RemovableHandle | None = unet.register_forward_hook(self._record, with_kwargs=True)

    # ---- the diffusers scheduler surface ------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
    ) -> None:
        """Karras sigmas for ``num_inference_steps`` steps ending in 0, or the given ``sigmas``."""
        if (num_inference_steps is None) == (sigmas is None):
            raise GenieSchedulerError("give exactly one of num_inference_steps and sigmas")
        if sigmas is None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                    or num_inference_steps < 1:
                raise GenieSchedulerError(
                    f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
            ramp = karras_sigmas(num_inference_steps, self.sigma_min, self.sigma_max, self.rho)
            schedule = torch.cat([ramp[:-1], torch.zeros(1)])
        else:
            schedule = self._checked_sigmas(sigmas)
        self.sigmas = schedule.to(torch.float32).to(device)
        self.timesteps = continuous_timestep(self.log_sigmas, self.sigmas[:-1].cpu()).to(device)
        self.num_inference_steps = len(self.timesteps)
        self._curvature = self._new_curvature()
        self.fallback_reason = None
        self._pipeline_nfe = 0
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def _checked_sigmas(sigmas: list[float] | torch.Tensor) -> torch.Tensor:
        try:
            schedule = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise GenieSchedulerError(f"sigmas must be a list of numbers: {exc}") from exc
        if len(schedule) < 2 or not bool(torch.isfinite(schedule).all()):
            raise GenieSchedulerError("sigmas must hold at least two finite values (the last may be 0)")
        if not bool((schedule[:-1] > 0).all()) or float(schedule[-1]) < 0:
            raise GenieSchedulerError("sigmas must be positive (the last may be 0)")
        if not bool((schedule[1:] < schedule[:-1]).all()):
            raise GenieSchedulerError("sigmas must be strictly decreasing")
        return schedule

    @property
    def init_noise_sigma(self) -> float:
        """The noise scale of the first latents (sigma_max; x = x0 + sigma * noise)."""
        return float(self.sigmas[0]) if len(self.sigmas) else self.sigma_max

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at step ``begin_index`` (image-to-image pipelines skip the first steps)."""
        if not 0 <= begin_index < max(1, self.num_inference_steps):
            raise GenieSchedulerError(
                f"begin_index {begin_index} is outside 0..{self.num_inference_steps - 1}")
        self._begin_index = begin_index

    def __len__(self) -> int:
        return len(self.log_sigmas)

    def scale_model_input(
        self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The UNet's input, ``sample / sqrt(sigma**2 + 1)``; the result is what the UNet must be given."""
        sigma = self.sigmas[self._current_index(timestep)]
        self._scaled = sample / ((sigma**2 + 1) ** 0.5).to(sample.dtype)
        return self._scaled

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """``x0 + sigma * noise`` at each timestep of this schedule (image-to-image starts)."""
        steps = torch.as_tensor(timesteps).flatten()
        sigma = torch.stack([self.sigmas[self._index_of(t)] for t in steps]).to(original_samples.device)
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        return original_samples + noise * sigma.to(original_samples.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> GenieStepOutput | tuple[torch.Tensor, torch.Tensor]:
        """One GENIE step from this timestep's sigma to the next (``generator`` is unused: no noise)."""
        if self._curvature is None:
            raise GenieSchedulerError("call set_timesteps before step")
        index = self._current_index(timestep)
        sigma, sigma_next = self.sigmas[index].float(), self.sigmas[index + 1].float()
        x = sample.float()
        denoised = self._denoised(model_output.float(), x, sigma)
        eps = (x - denoised) / sigma
        self._pipeline_nfe += 1
        if float(sigma_next) == 0.0:
            prev = denoised
        else:
            h = sigma_next - sigma
            prev = x + h * eps + 0.5 * h * h * self._slope(x, sigma, eps, model_output, sample)
        self._step_index = index + 1
        self._scaled = None
        prev = prev.to(model_output.dtype)
        denoised = denoised.to(model_output.dtype)
        if not return_dict:
            return prev, denoised
        return GenieStepOutput(prev, denoised)

    # ---- bookkeeping --------------------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        """Denoiser evaluations so far: the pipeline's (one per step) and the curvature's (a JVP is two)."""
        return self._pipeline_nfe + (self._curvature.nfe if self._curvature is not None else 0)

    @property
    def watching(self) -> bool:
        """Whether the scheduler still watches the UNet's calls (until :meth:`detach`)."""
        return self._hook is not None

    def detach(self) -> None:
        """Stop watching the UNet (the scheduler cannot take exact GENIE steps after this)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _index_of(self, timestep: float | torch.Tensor) -> int:
        if not len(self.timesteps):
            raise GenieSchedulerError("call set_timesteps first")
        distance = (self.timesteps.cpu() - float(torch.as_tensor(timestep))).abs()
        index = int(distance.argmin())
        if float(distance[index]) > 1e-3:
            raise GenieSchedulerError(
                f"timestep {float(torch.as_tensor(timestep))} is not one of this schedule's")
        return index

    def _current_index(self, timestep: float | torch.Tensor | None) -> int:
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            elif timestep is not None:
                self._step_index = self._index_of(timestep)
            else:
                self._step_index = 0
        if self._step_index >= self.num_inference_steps:
            raise GenieSchedulerError(
                f"all {self.num_inference_steps} steps are taken: call set_timesteps again")
        return self._step_index

    def _denoised(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return x - sigma * output
        if self.prediction_type == "v_prediction":
            return x / (sigma**2 + 1) - output * sigma / (sigma**2 + 1) ** 0.5
        return output

    def _new_curvature(self) -> Curvature:
        if self.curvature == "head":
            return HeadCurvature(self._no_denoiser, method="jvp", head=self.head)
        if self.curvature == "auto" and is_offloaded(self.unet):
            curvature = Curvature(self._replayed_denoiser, method="finite_difference")
            curvature.fallback_reason = OFFLOADED_REASON
            return curvature
        return Curvature(self._replayed_denoiser, method=self.curvature)

    @staticmethod
    def _no_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise GenieSchedulerError("a head curvature evaluates no denoiser")

    # ---- watching and replaying the UNet ------------------------------------------------------------
    def _record(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        if not self._replaying:
            self._last_call = _UNetCall(args, dict(kwargs), _unet_output(result).detach())

    def _slope(
        self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, model_output: torch.Tensor,
        sample: torch.Tensor,
    ) -> torch.Tensor:
        assert self._curvature is not None
        if self.curvature != "head":
            self._replay = self._replay_for(model_output, sample, sigma)
        slope = self._curvature.derivative(x, sigma, eps)
        self.fallback_reason = self._curvature.fallback_reason
        return slope.float()

    def _replay_for(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> _Replay:
        call, scaled = self._last_call, self._scaled
        if not self.watching:
            raise GenieSchedulerError(
                "this scheduler was detached from the UNet: build a new one with genie(pipe)")
        if call is None or scaled is None:
            raise GenieSchedulerError(
                "no UNet call was seen for this step: the pipeline must call the scheduler's "
                "scale_model_input and then the UNet it was built with"
            )
        given = call.args[0] if call.args else call.kwargs.get("sample")
        if given is not scaled:
            raise GenieSchedulerError(
                "the UNet was not given the scheduler's scaled latents (an inpainting UNet's extra "
                "channels, or another change after scale_model_input): exact GENIE needs to replay it; "
                'use curvature="head"'
            )
        dependent = [name for name in _LATENT_DEPENDENT_KWARGS if call.kwargs.get(name) is not None]
        if dependent:
            raise GenieSchedulerError(
                f"the UNet call carries {', '.join(dependent)}, computed from the latents by another "
                "model (ControlNet): replaying them unchanged would differentiate the wrong function; "
                'use curvature="head"'
            )
        if given.shape[0] % sample.shape[0]:
            raise GenieSchedulerError(f"the UNet batch ({given.shape[0]}) is not a multiple of the latents' "
                                      f"({sample.shape[0]})")
        repeats = given.shape[0] // sample.shape[0]
        if repeats not in (1, 2):
            raise GenieSchedulerError(f"the UNet saw the latents {repeats} times; GENIE replays 1 "
                                      "(no guidance) or 2 (classifier-free guidance)")
        rows = given.chunk(repeats)
        expected = sample / ((sigma**2 + 1) ** 0.5).to(sample.dtype)
        if any(not torch.equal(row, rows[0]) for row in rows) or not torch.allclose(
                rows[0].float(), expected.float(), rtol=1e-3, atol=1e-5):
            raise GenieSchedulerError("the UNet's input is not this step's latents, repeated: exact GENIE "
                                      'cannot replay it; use curvature="head"')
        guidance = self._guidance(call.output.float(), model_output, repeats)
        return _Replay(call, repeats, guidance)

    @staticmethod
    def _guidance(output: torch.Tensor, model_output: torch.Tensor, repeats: int) -> float:
        if repeats == 1:
            _check_fit("no guidance", output, model_output)
            return 1.0
        uncond, cond = output.chunk(2)
        difference = cond - uncond
        norm = float(difference.pow(2).sum())
        scale = float(((model_output.float() - uncond) * difference).sum()) / norm if norm > 0 else 1.0
        if not math.isfinite(scale):
            raise GenieSchedulerError("the guidance scale could not be recovered from the UNet outputs")
        _check_fit("classifier-free guidance", uncond + scale * difference, model_output)
        return _exact_scale(scale, uncond, difference, model_output)

    def _replayed_denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        replay = self._replay
        if replay is None:
            raise GenieSchedulerError("no UNet call to replay")
        call = replay.call
        given = call.args[0] if call.args else call.kwargs["sample"]
        scaled = (x / (sigma**2 + 1) ** 0.5).to(given.dtype)
        timestep = continuous_timestep(self.log_sigmas.to(sigma.device), sigma)
        batch = torch.cat([scaled] * replay.repeats)
        args, kwargs = _with_inputs(call, batch, timestep)
        self._replaying = True
        try:
            output = _unet_output(self.unet(*args, **kwargs)).float()
        finally:
            self._replaying = False
        if replay.repeats == 2:
            uncond, cond = output.chunk(2)
            output = uncond + replay.guidance * (cond - uncond)
        return self._denoised(output, x, sigma)


def _exact_scale(
    fitted: float, uncond: torch.Tensor, difference: torch.Tensor, guided: torch.Tensor
) -> float:
    """The guidance scale the pipeline used, where a short decimal near the fitted one reproduces its output.

    The least-squares fit is off in its last digits, by amounts that depend on the CPU's kernels; finite
    differences magnify that into visibly different steps. Users write scales such as 7.5: the shortest
    decimal within 1e-4 of the fit whose guided output equals the pipeline's bit for bit is that scale, the
    same on every machine. Where none does (another guidance formula), the fit stands.
    """
    target = guided.to(uncond.dtype)
    for digits in range(1, 8):
        candidate = float(f"{fitted:.{digits}g}")
        if abs(candidate - fitted) <= 1e-4 * max(1.0, abs(fitted)) and torch.equal(
                uncond + candidate * difference, target):
            return candidate
    return fitted


def _with_inputs(
    call: _UNetCall, sample: torch.Tensor, timestep: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The recorded call's arguments with the latents and the timestep replaced."""
    args = list(call.args)
    kwargs = dict(call.kwargs)
    for position, name, value in ((0, "sample", sample), (1, "timestep", timestep)):
        if len(args) > position:
            args[position] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs

