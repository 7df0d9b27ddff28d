"""GENIE against DDIM and the usual ODE samplers: the 2D mixture experiment and the tiny SD UNet.

Run: ``.venv/bin/python -m pytest -q -p no:cacheprovider bench/test_genie_bench.py -s``. Prints the tables
and writes ``out/genie_2d_one_step.png`` (one-step error against step size, log axes). With random weights
the tiny SD part measures ODE accuracy, not image quality.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.sampling.denoiser import CFGDenoiser
from diffsplit.engine.sampling.error_plot import log_log_plot
from diffsplit.engine.sampling.genie import Curvature, HeadCurvature, genie_step, run_genie
from diffsplit.engine.sampling.genie_distill import DistillSettings, distill
from diffsplit.engine.sampling.mixture import GaussianMixture, ddim_reference, sliced_wasserstein
from diffsplit.engine.sampling.samplers import get_sampler
from diffsplit.engine.sampling.schedules import karras_sigmas

MIXTURE = GaussianMixture.default()
OUT = Path(__file__).resolve().parent.parent / "out"
TRAJECTORIES = 1000
REFERENCE_STEPS = 10_000


def _mean_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm(dim=1).mean())


def _ddim_run(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    for i in range(len(grid) - 1):
        if float(grid[i + 1]) == 0.0:
            return MIXTURE.denoise(x, grid[i])
        x = x + (grid[i + 1] - grid[i]) * (x - MIXTURE.denoise(x, grid[i])) / grid[i]
    return x


def _fine_path(x: torch.Tensor, high: float, low: float, marks: list[float]) -> list[torch.Tensor]:
    """The 10,000-step DDIM solution from ``high`` to ``low``, taken at the fractions ``marks`` of the way."""
    grid = torch.linspace(high, low, REFERENCE_STEPS + 1, dtype=torch.float64)
    wanted = {round(mark * REFERENCE_STEPS): number for number, mark in enumerate(marks)}
    found: list[torch.Tensor | None] = [None] * len(marks)
    for i in range(REFERENCE_STEPS):
        x = x + (grid[i + 1] - grid[i]) * (x - MIXTURE.denoise(x, grid[i])) / grid[i]
        if i + 1 in wanted:
            found[wanted[i + 1]] = x
    return [state for state in found if state is not None]


def _grid(steps: int, high: float, low: float) -> torch.Tensor:
    return karras_sigmas(steps, low, high).to(torch.float64)


def test_genie_2d_one_step_and_full_sampling() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = []
    series: dict[str, list[tuple[float, float]]] = {}
    fractions = (0.05, 0.1, 0.2, 0.4, 0.8)
    for start in (0.1, 0.2, 0.5):
        x = MIXTURE.noised(TRAJECTORIES, start, generator)
        truths = _fine_path(x, start, start * (1 - fractions[-1]), [f / fractions[-1] for f in fractions])
        for fraction, truth in zip(fractions, truths, strict=True):
            h = fraction * start
            sigma = torch.tensor(start, dtype=torch.float64)
            curvature = Curvature(MIXTURE.denoise, method="jvp")
            eps, _ = curvature.epsilon(x, sigma)
            ddim = x - h * eps
            genie, _ = genie_step(curvature, x, sigma, sigma - h)
            rows.append((start, h, _mean_error(ddim, truth), _mean_error(genie, truth)))
            series.setdefault(f"DDIM from t={start}", []).append((h, rows[-1][2]))
            series.setdefault(f"GENIE from t={start}", []).append((h, rows[-1][3]))
    print("\n2D mixture, one step: mean L2 error against 10,000-step DDIM")
    print(f"{'start':>6} {'h':>7} {'DDIM':>11} {'GENIE':>11} {'ratio':>7}")
    for start, h, ddim_error, genie_error in rows:
        print(f"{start:6.2f} {h:7.3f} {ddim_error:11.3e} {genie_error:11.3e} {ddim_error / genie_error:7.1f}")
    plot = log_log_plot(OUT / "genie_2d_one_step.png", series, title="2D mixture: one-step error",
                        x_label="step size h", y_label="mean L2 error")
    print(f"plot: {plot}")

    high, low = 20.0, 0.01
    x = MIXTURE.noised(TRAJECTORIES, high, generator)
    data = MIXTURE.sample(TRAJECTORIES, generator)
    truth = MIXTURE.denoise(ddim_reference(MIXTURE, x, high, low, steps=REFERENCE_STEPS), torch.tensor(low))
    print("\n2D mixture, full sampling from sigma 20 (Karras schedule): error against the ODE solution, "
          "sliced Wasserstein to the data")
    print(f"{'N':>3} {'DDIM err':>10} {'GENIE err':>10} {'DDIM 2N err':>12} {'DDIM SW':>9} {'GENIE SW':>9} "
          f"{'GENIE NFE':>9}")
    for steps in (5, 10, 25):
        grid = torch.cat([_grid(steps, high, low)[:-1], torch.zeros(1, dtype=torch.float64)])
        curvature = Curvature(MIXTURE.denoise)
        genie = run_genie(curvature, x, grid)
        ddim = _ddim_run(x, grid)
        double = torch.cat([_grid(2 * steps, high, low)[:-1], torch.zeros(1, dtype=torch.float64)])
        ddim_2n = _ddim_run(x, double)
        print(f"{steps:3d} {_mean_error(ddim, truth):10.3e} {_mean_error(genie, truth):10.3e} "
              f"{_mean_error(ddim_2n, truth):12.3e} {sliced_wasserstein(ddim, data):9.4f} "
              f"{sliced_wasserstein(genie, data):9.4f} {curvature.nfe:9d}")
    print(f"(sliced Wasserstein, exact ODE solution to the data: {sliced_wasserstein(truth, data):.4f})")


def _counting(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[list[int], Callable]:
    count = [0]

    def counted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return denoise(x, sigma)

    return count, counted


@pytest.fixture(scope="module")
def tiny_sd(models_dir: Path) -> CFGDenoiser:
    model = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").model
    width = model.unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, width, generator=generator), {}]]
    negative = [[torch.randn(1, 77, width, generator=generator), {}]]
    return CFGDenoiser.build(model, positive, negative, 5.0, (1, 4, 16, 16), seed=0)


@pytest.fixture(scope="module")
def tiny_sd_head(tiny_sd: CFGDenoiser, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """A head distilled for the bench's guided denoiser (its own trajectories, from other seeds)."""
    settings = DistillSettings(iterations=400, trajectories=12, sampling_steps=12, latent_shape=(4, 16, 16),
                               sigma_min=tiny_sd.schedule.sigma_min, sigma_max=tiny_sd.schedule.sigma_max,
                               seed=11)
    started = time.perf_counter()
    result = distill(tiny_sd, tmp_path_factory.mktemp("head") / "tiny-sd15-genie.safetensors", settings)
    print(f"\nhead distilled in {time.perf_counter() - started:.1f} s; loss first/last 20 iterations "
          f"{sum(result.losses[:20]) / 20:.3f} / {sum(result.losses[-20:]) / 20:.3f}")
    return result.head


def _run(
    name: str, denoiser: CFGDenoiser, x: torch.Tensor, steps: int, head: torch.nn.Module | None = None
) -> tuple[torch.Tensor, int, float]:
    schedule = karras_sigmas(steps, denoiser.schedule.sigma_min, denoiser.schedule.sigma_max)
    count, counted = _counting(denoiser)
    started = time.perf_counter()
    with torch.no_grad():
        if name in ("genie", "genie_head"):
            curvature = Curvature(counted) if name == "genie" else HeadCurvature(counted, head=head)
            sample = run_genie(curvature, x * schedule[0], schedule)
            nfe = curvature.nfe  # a JVP counts as two evaluations, which the call counter cannot see
        else:
            sample = get_sampler(name).function(counted, x * schedule[0], schedule)
            nfe = count[0]
    return sample, nfe, time.perf_counter() - started


def test_genie_on_the_tiny_sd_unet(
    tiny_sd: CFGDenoiser, tiny_sd_head: torch.nn.Module, benchmark: pytest.FixtureRequest
) -> None:
    torch.set_num_threads(1)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    reference, _, reference_s = _run("dpmpp_2m", tiny_sd, x, 1000)
    print(f"\ntiny SD 1.5 UNet (random weights: ODE accuracy, not image quality), CFG 5, 16x16 latent; "
          f"reference: dpmpp_2m, 1000 steps ({reference_s:.1f} s)")
    print(f"{'budget':>6} {'sampler':>9} {'steps':>5} {'NFE':>4} {'max abs err':>12} {'wall s':>7}")
    results = {}
    for budget in (12, 24, 48):
        for name in ("euler", "dpmpp_2m", "uni_pc", "genie", "genie_head"):
            steps = max(2, (budget + 2) // 3) if name == "genie" else budget
            sample, nfe, wall = _run(name, tiny_sd, x, steps, tiny_sd_head)
            error = float((sample - reference).abs().max())
            results[(budget, name)] = (error, wall)
            print(f"{budget:6d} {name:>9} {steps:5d} {nfe:4d} {error:12.4e} {wall:7.3f}")
    print(f"\n{'steps':>5} {'GENIE':>10} {'head':>10} {'head/GENIE':>10} {'DDIM':>10} {'DDIM 2N':>10} "
          f"{'GENIE s':>8} {'head s':>8}")
    for steps in (4, 8, 16):
        genie, _, genie_s = _run("genie", tiny_sd, x, steps)
        head, _, head_s = _run("genie_head", tiny_sd, x, steps, tiny_sd_head)
        errors = [float((sample - reference).abs().max()) for sample in
                  (genie, head, _run("euler", tiny_sd, x, steps)[0], _run("euler", tiny_sd, x, 2 * steps)[0])]
        print(f"{steps:5d} {errors[0]:10.4e} {errors[1]:10.4e} {errors[1] / errors[0]:10.2f} "
              f"{errors[2]:10.4e} {errors[3]:10.4e} {genie_s:8.3f} {head_s:8.3f}")
    _print_local_orders(tiny_sd, x)

    def one_genie_run() -> None:
        _run("genie", tiny_sd, x, 8)

    benchmark.pedantic(one_genie_run, rounds=3, iterations=1)
    euler_s = min(_run("euler", tiny_sd, x, 8)[2] for _ in range(3))
    benchmark.extra_info["genie_over_euler_wall_at_equal_steps"] = benchmark.stats.stats.min / euler_s
    print(f"GENIE/Euler wall time at 8 steps: {benchmark.stats.stats.min / euler_s:.2f}x")


def _print_local_orders(denoiser: CFGDenoiser, x: torch.Tensor) -> None:
    """One step from sigma 3 against a fine Heun solution: the order GENIE's Taylor term needs to pay off."""
    sigma = torch.tensor(3.0)
    with torch.no_grad():
        grid = karras_sigmas(40, float(sigma), denoiser.schedule.sigma_max)[:-1]  # sigma_max down to 3
        state = x * grid[0]
        for i in range(len(grid) - 1):  # DDIM to sigma 3
            state = state + (grid[i + 1] - grid[i]) * (state - denoiser(state, grid[i])) / grid[i]
        curvature = Curvature(denoiser, method="jvp")
        eps, _ = curvature.epsilon(state, sigma)
        slope = curvature.derivative(state, sigma, eps)
        print("\ntiny SD, one step from sigma 3: max abs error against 400 Heun substeps")
        print(f"{'h':>7} {'DDIM':>10} {'GENIE':>10}")
        for fraction in (0.4, 0.2, 0.1, 0.05):
            h = -fraction * sigma
            fine, level, substep = state.clone(), sigma.clone(), h / 400
            for _ in range(400):
                first = (fine - denoiser(fine, level)) / level
                ahead = fine + substep * first
                second = (ahead - denoiser(ahead, level + substep)) / (level + substep)
                fine, level = fine + substep * (first + second) / 2, level + substep
            ddim = float((state + h * eps - fine).abs().max())
            genie = float((state + h * eps + 0.5 * h * h * slope - fine).abs().max())
            print(f"{float(h):7.3f} {ddim:10.3e} {genie:10.3e}")
    print("(GENIE's one-step error shrinks as h**3 only where the denoiser is smooth in sigma at the "
          "scale of h)")
