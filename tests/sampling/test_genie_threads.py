"""GENIE beside other threads: one JVP at a time in the process (``exclusive_jvp``).

torch's forward-mode AD levels and SDPA kernel switch are process-wide. Two
genie samplers in two threads, each JVP on the exact path (``method="jvp"``
raises instead of falling back): without the lock, one thread's JVP broke the
other's dual level ("no level exists") or turned the fused kernels back on under
it, which then fell back to the finite difference (results ~190 away from solo).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from diffsplit.engine.sampling.denoiser import CFGDenoiser
from diffsplit.engine.sampling.genie import Curvature, exclusive_jvp
from diffsplit.engine.sampling.ksampler import sample_latent
from diffsplit.engine.types import DiffusionModel

ROUNDS = 6


def _flash_enabled() -> bool:
    return bool(torch.backends.cuda.flash_sdp_enabled())


def test_the_math_kernel_is_on_inside_and_the_previous_choice_comes_back() -> None:
    before = _flash_enabled()
    with exclusive_jvp():
        assert not _flash_enabled()
    assert _flash_enabled() == before


def test_two_threads_taking_exact_jvps_at_once_never_fall_back(
    sd15: DiffusionModel, make_cond: Callable[..., list[list[Any]]],
) -> None:
    denoiser = CFGDenoiser.build(sd15, make_cond(1), make_cond(2), 4.0, (1, 4, 8, 8))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 8.0
    sigma = torch.tensor(8.0)
    with torch.no_grad():
        eps, _ = Curvature(denoiser, method="jvp").epsilon(x, sigma)
        solo = Curvature(denoiser, method="jvp").derivative(x, sigma, eps)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work() -> None:
        try:
            start.wait(30)
            for _ in range(ROUNDS):
                with torch.no_grad():
                    results.append(Curvature(denoiser, method="jvp").derivative(x, sigma, eps))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, name=f"test-genie-{n}") for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(results) == 2 * ROUNDS
    for result in results:  # same kernel (math) in every JVP: the same numbers as alone
        assert torch.equal(result, solo)


def test_genie_samplers_in_two_threads_match_their_solo_runs(
    sd15: DiffusionModel, make_cond: Callable[..., list[list[Any]]],
) -> None:
    def arguments(seed: int) -> dict[str, Any]:
        return {"seed": seed, "steps": 3, "cfg": 4.0, "sampler_name": "genie", "scheduler": "karras",
                "positive": make_cond(1), "negative": make_cond(2),
                "latent": {"samples": torch.zeros(1, 4, 8, 8)}}

    solo = {seed: sample_latent(sd15, **arguments(seed))["samples"] for seed in (1, 2)}
    together: dict[int, torch.Tensor] = {}
    start = threading.Barrier(2)

    def run(seed: int) -> None:
        start.wait(30)
        together[seed] = sample_latent(sd15, **arguments(seed))["samples"]

    threads = [threading.Thread(target=run, args=(seed,), name=f"test-genie-run-{seed}") for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for seed in (1, 2):
        # a plain (non-JVP) pass of one run may meet the math kernel the other's JVP holds: same
        # function, other rounding; a run that fell back to the finite difference would be far off
        assert float((together[seed] - solo[seed]).abs().max()) < 1e-3, seed
