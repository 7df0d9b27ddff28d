"""Distilling a GENIE head: exact curvatures (JVPs) along the model's own trajectories, then regression.

``distill(denoiser, out, settings)`` draws ``trajectories`` DDIM trajectories
of the guided model from seeded noise on a Karras schedule, computes the exact
curvature ``d eps / d sigma`` at every point by JVP
(``genie.Curvature``), and fits a :class:`GenieHead` to it with Adam on a
relative squared error. Every ``checkpoint_every`` iterations the head, the
optimizer's moments and the iteration count go to ``<out>.partial.safetensors``;
a later call with the same settings resumes there (the targets are redrawn
from the same seed, so they are the same). Nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from diffsplit.engine.models.genie_head import GenieHead, GenieHeadConfig, load_genie_head, save_genie_head
from diffsplit.engine.sampling.genie import Curvature
from diffsplit.engine.sampling.samplers import DenoiseFn
from diffsplit.engine.sampling.schedules import karras_sigmas

#: progress(iteration, total, loss)
DistillProgress = Callable[[int, int, float], None]
_RESUME_KEY = "diffsplit.genie_distill"


@dataclass(frozen=True)
class DistillSettings:
    """How many trajectories and training iterations, and of what."""

    iterations: int = 300
    batch_size: int = 16
    trajectories: int = 8
    sampling_steps: int = 10
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    sigma_min: float = 0.03
    sigma_max: float = 14.6
    learning_rate: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 50
    head: GenieHeadConfig = field(default_factory=GenieHeadConfig)

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "trajectories", "sampling_steps", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")


@dataclass(frozen=True)
class CurvatureSamples:
    """Inputs of the head and their exact targets, one row per trajectory point."""

    x_in: torch.Tensor
    eps: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor


@dataclass(frozen=True)
class DistillResult:
    """The trained head, the loss of every iteration run now, where it resumed, and the file written."""

    head: GenieHead
    losses: tuple[float, ...]
    resumed_at: int
    path: Path


def curvature_samples(
    denoise_fn: DenoiseFn | Sequence[DenoiseFn], settings: DistillSettings
) -> CurvatureSamples:
    """Exact curvatures along DDIM trajectories from seeded noise (trajectory k uses denoiser k mod n)."""
    denoisers = list(denoise_fn) if isinstance(denoise_fn, Sequence) else [denoise_fn]
    generator = torch.Generator().manual_seed(settings.seed)
    schedule = karras_sigmas(settings.sampling_steps, settings.sigma_min, settings.sigma_max)[:-1]
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for number in range(settings.trajectories):
            curvature = Curvature(denoisers[number % len(denoisers)], method="jvp")
            x = torch.randn(1, *settings.latent_shape, generator=generator) * schedule[0]
            for i, sigma in enumerate(schedule):
                eps, _ = curvature.epsilon(x, sigma)
                slope = curvature.derivative(x, sigma, eps)
                rows.append((x / (sigma**2 + 1) ** 0.5, eps, sigma.reshape(1), slope))
                if i + 1 < len(schedule):
                    x = x + (schedule[i + 1] - sigma) * eps
    x_in, eps, sigma, target = (torch.cat(column) for column in zip(*rows, strict=True))
    return CurvatureSamples(x_in, eps, sigma, target)


def partial_path(out: Path) -> Path:
    """Where an interrupted distillation keeps its state."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".partial.safetensors")


def distill(
    denoise_fn: DenoiseFn | Sequence[DenoiseFn],
    out: Path,
    settings: DistillSettings = DistillSettings(),
    *,
    progress: DistillProgress | None = None,
    stop_after: int | None = None,
) -> DistillResult:
    """Train a head for ``denoise_fn`` (one or several, e.g. per prompt) and write it to ``out``.

    ``stop_after`` stops early, leaving the resumable checkpoint (tests, time-boxed runs).
    """
    samples = curvature_samples(denoise_fn, settings)
    scale = float(samples.target.pow(2).mean().sqrt().clamp_min(1e-6))
    config = replace(settings.head, channels=settings.latent_shape[0], output_scale=scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # the same starting weights on every run of these settings
        head = GenieHead(config)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.learning_rate)
    start = _resume(partial_path(out), head, optimizer, settings)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    for _ in range(start):  # the same minibatches as an uninterrupted run
        torch.randint(len(samples.sigma), (settings.batch_size,), generator=generator)
    losses = []
    head.train()
    last = settings.iterations if stop_after is None else min(settings.iterations, stop_after)
    for iteration in range(start, last):
        pick = torch.randint(len(samples.sigma), (settings.batch_size,), generator=generator)
        predicted = head(samples.x_in[pick], samples.eps[pick], samples.sigma[pick])
        target = samples.target[pick]
        loss = (predicted - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(iteration + 1, settings.iterations, losses[-1])
        if (iteration + 1) % settings.checkpoint_every == 0 or iteration + 1 == last:
            _checkpoint(partial_path(out), head, optimizer, iteration + 1, settings)
    head.eval().requires_grad_(False)
    if last < settings.iterations:
        return DistillResult(head, tuple(losses), start, partial_path(out))
    save_genie_head(head, out)
    partial_path(out).unlink(missing_ok=True)
    return DistillResult(load_genie_head(out), tuple(losses), start, out)


def _settings_text(settings: DistillSettings) -> str:
    return json.dumps(asdict(settings), sort_keys=True)


def _checkpoint(
    path: Path, head: GenieHead, optimizer: torch.optim.Optimizer, iteration: int, settings: DistillSettings
) -> None:
    from safetensors.torch import save_file

    tensors = {f"head.{name}": value.detach().clone() for name, value in head.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"adam.{index}.{key}"] = torch.as_tensor(value).clone()
    metadata = {_RESUME_KEY: json.dumps({"iteration": iteration, "settings": _settings_text(settings),
                                         "config": asdict(head.config)})}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)


def _resume(path: Path, head: GenieHead, optimizer: torch.optim.Optimizer, settings: DistillSettings) -> int:
    """The iteration to start at: 0, or where the checkpoint at ``path`` stopped (same settings only)."""
    if not path.exists():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        saved = json.loads((handle.metadata() or {}).get(_RESUME_KEY, "{}"))
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if saved.get("settings") != _settings_text(settings):
        raise ValueError(f"{path.name} was written with other distillation settings: delete it to start over")
    weights = {name.removeprefix("head."): t for name, t in tensors.items() if name.startswith("head.")}
    head.load_state_dict(weights, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("adam."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(saved["iteration"])
