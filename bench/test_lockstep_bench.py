"""Cross-client batching on the CPU: 4 KSampler jobs one after another against the 4 in lockstep.

Four jobs on the tiny SD 1.5 checkpoint (different seeds, CFG scales and
random prompt embeddings; euler, ``STEPS`` steps) run as four ``sample_latent``
calls in a row ("sequential") and as one :func:`~diffsplit.engine.sampling.
lockstep.sample_batched` call ("batched": one UNet pass per step for all four).
Rows alternate for ``ROUNDS`` rounds after a warm-up and keep their fastest run,
one torch thread, so load on a shared machine hits both alike; the figure is the
ratio sequential / batched from the same run, per latent size (small latents are
overhead-bound, where sharing passes pays most on a CPU). UNet passes are counted
with a forward pre-hook; the max abs difference of the latents is batched against
sequential. Every figure goes to ``benchmark.extra_info`` and is printed; nothing
asserts a timing.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_lockstep_bench.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.sampling.ksampler import sample_latent
from diffsplit.engine.sampling.lockstep import LockstepGroup, SampleRequest, sample_batched
from diffsplit.engine.types import DiffusionModel

JOBS = 4
STEPS = 8
ROUNDS = 3
SIZES = (8, 16)  # latent side (64 and 128 pixels)


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """One intra-op thread for the whole module (``one_torch_thread``)."""


@pytest.fixture(scope="module")
def model(models_dir: Path) -> DiffusionModel:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").model


def _requests(model: DiffusionModel, side: int) -> list[SampleRequest]:
    width = model.unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(side)
    return [
        SampleRequest(
            model=model, seed=100 + i, steps=STEPS, cfg=(3.0, 5.0, 7.0, 8.0)[i % 4], sampler_name="euler",
            scheduler="normal", positive=[[torch.randn(1, 77, width, generator=generator), {}]],
            negative=[[torch.randn(1, 77, width, generator=generator), {}]],
            latent={"samples": torch.zeros(1, 4, side, side)},
        )
        for i in range(JOBS)
    ]


def _sequential(requests: list[SampleRequest]) -> list[torch.Tensor]:
    return [
        sample_latent(r.model, seed=r.seed, steps=r.steps, cfg=r.cfg, sampler_name=r.sampler_name,
                      scheduler=r.scheduler, positive=r.positive, negative=r.negative,
                      latent=r.latent)["samples"]
        for r in requests
    ]


def _batched(requests: list[SampleRequest]) -> list[torch.Tensor]:
    return [outcome.result()["samples"] for outcome in sample_batched(requests)]


def _passes(model: DiffusionModel, run: Callable[[], Any]) -> int:
    count = [0]
    handle = model.unet.register_forward_pre_hook(lambda module, args: count.__setitem__(0, count[0] + 1))
    try:
        run()
    finally:
        handle.remove()
    return count[0]


def _best_of(rows: dict[str, Callable[[], Any]]) -> dict[str, float]:
    for run in rows.values():
        run()
    best = dict.fromkeys(rows, float("inf"))
    for round_number in range(ROUNDS):
        names = list(rows) if round_number % 2 == 0 else list(reversed(rows))
        for name in names:
            started = time.perf_counter()
            rows[name]()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _measure(model: DiffusionModel, side: int) -> dict[str, Any]:
    requests = _requests(model, side)
    rows: dict[str, Callable[[], list[torch.Tensor]]] = {
        "sequential": lambda: _sequential(requests), "batched": lambda: _batched(requests),
    }
    sequential, batched = rows["sequential"](), rows["batched"]()
    max_abs = max(float((a - b).abs().max()) for a, b in zip(sequential, batched, strict=True))
    passes = {name: _passes(model, run) for name, run in rows.items()}
    best = _best_of(rows)
    return {"sequential_s": best["sequential"], "batched_s": best["batched"],
            "sequential_over_batched": best["sequential"] / best["batched"], "unet_passes": passes,
            "max_abs_diff": max_abs}


def test_four_jobs_sequential_against_batched(model: DiffusionModel, benchmark: Any, capsys: Any) -> None:
    info: dict[str, Any] = {"jobs": JOBS, "steps": STEPS, "rounds": ROUNDS, "sampler": "euler"}
    for side in SIZES:
        info[f"{side}x{side}"] = _measure(model, side)
    group = LockstepGroup(JOBS)
    outcomes = sample_batched(_requests(model, SIZES[0]), group=group)
    assert all(outcome.error is None for outcome in outcomes)
    info["stats"] = vars(group.stats())
    benchmark.pedantic(lambda: _batched(_requests(model, SIZES[0])), rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    with capsys.disabled():
        print(f"\n{JOBS} KSampler jobs, tiny SD 1.5, euler {STEPS} steps, CFG, CPU, 1 torch thread, "
              f"best of {ROUNDS} interleaved")
        print(f"{'latent':>6} {'sequential':>12} {'batched':>11} {'ratio':>8} {'UNet passes':>12} "
              f"{'max |d|':>10}")
        for side in SIZES:
            row = info[f"{side}x{side}"]
            passes = row["unet_passes"]
            times = f"{row['sequential_s'] * 1000:10.1f}ms {row['batched_s'] * 1000:9.1f}ms"
            print(f"{side:>2}x{side:<3} {times} {row['sequential_over_batched']:7.2f}x "
                  f"{passes['sequential']:>5} -> {passes['batched']:<4} {row['max_abs_diff']:10.2e}")
        print(f"group stats ({SIZES[0]}x{SIZES[0]}): {info['stats']}")
