"""Cross-client batching on a real worker (``--batch-max``): compatible queued samplers share UNet passes.

A long sampler of another shape of work holds the single slot until three
requests of three clients are queued (each told its place), then is cancelled;
the slot takes the first and gathers the others. Each result is compared with
the same request run alone on the same worker (nothing queued then, so no
batch). Measured on the tiny SD 1.5 UNet, fp32 CPU: batched vs alone differ by
fp32 rounding of the shared passes, max abs difference 0 to 1.2e-4 on the
latents (the engine's lockstep tests measure the same); the bound is ``ATOL``.
With batching off the same queue gives results equal bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.remote.worker import WorkerConfig
from diffsplit.transport.sockets import Client

from .test_space_sharing import LONG_STEPS, WAIT_S, Watched, is_step, sampler, samples_of, serving

ATOL = 1e-3
STEPS = 3


def config(models_dir: Path, **changes: Any) -> WorkerConfig:
    return WorkerConfig(models=models_dir, listen="tcp://127.0.0.1:*", device="cpu", grace_s=2.0, **changes)


def request(models_dir: Path, n: int, **changes: Any) -> dict[str, Any]:
    """Client ``n``'s sampler: its own seed, CFG scale and prompt embedding."""
    header = sampler(models_dir, steps=changes.pop("steps", STEPS), seed=100 + n,
                     latent=changes.pop("latent", (8, 8)), node_id=str(6 + n))
    prompt = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(n))
    header["inputs"].update(cfg=3.0 + n, positive=[[prompt, {}]], **changes)
    return header


def batching_stats(address: str) -> dict[str, Any]:
    with Client(address) as client:
        reply = client.request({"op": "stats"}, timeout=30)
    assert reply["op"] == "result", reply
    return reply["batching"]


@contextmanager
def queued_behind_a_holder(models_dir: Path, address: str,
                           headers: list[dict[str, Any]]) -> Iterator[list[Watched]]:
    """Hold the one slot with a long sampler (another signature: never batched with the others), queue
    ``headers`` from one client each until each is told its place, then cancel the holder."""
    with ExitStack() as stack:
        holder = Watched(stack.enter_context(Client(address)),
                         sampler(models_dir, steps=LONG_STEPS, seed=1, node_id="99"))
        holder.wait_for(is_step, "step from the holder")
        jobs = []
        for header in headers:
            job = Watched(stack.enter_context(Client(address)), header)
            job.wait_for(lambda m: "queued" in m, "its place in the queue")
            jobs.append(job)
        holder.cancel()
        yield jobs


def alone(address: str, headers: list[dict[str, Any]]) -> list[torch.Tensor]:
    with Client(address) as client:
        return [samples_of(client.request(header, timeout=WAIT_S)) for header in headers]


def test_three_clients_compatible_samplers_run_as_one_batch(models_dir: Path) -> None:
    headers = [request(models_dir, n) for n in range(3)]
    with serving(config(models_dir, batch_max=4, batch_wait_ms=50)) as worker:
        with queued_behind_a_holder(models_dir, worker.endpoint, headers) as jobs:
            batched = [samples_of(job.finish()) for job in jobs]
        stats = batching_stats(worker.endpoint)
        solo = alone(worker.endpoint, headers)
        after = batching_stats(worker.endpoint)
    assert stats["batches"] == 1 and stats["batched_requests"] == 3
    assert stats["unet_calls_asked"] == 3 * STEPS and stats["unet_passes"] == STEPS  # one pass per step
    assert after == stats, "a request alone in the queue is never batched"
    differences = [float((b - s).abs().max()) for b, s in zip(batched, solo, strict=True)]
    assert max(differences) < ATOL, differences
    assert not torch.equal(solo[0], solo[1]), "each kept its own seed, CFG and prompt"


@pytest.mark.parametrize("batch_max", [1, 4])
def test_requests_that_differ_in_steps_or_shape_are_not_batched(models_dir: Path, batch_max: int) -> None:
    headers = [request(models_dir, 0), request(models_dir, 1, steps=STEPS + 1),
               request(models_dir, 2, latent=(8, 16))]
    with serving(config(models_dir, batch_max=batch_max, batch_wait_ms=20)) as worker:
        with queued_behind_a_holder(models_dir, worker.endpoint, headers) as jobs:
            together = [samples_of(job.finish()) for job in jobs]
        stats = batching_stats(worker.endpoint)
        solo = alone(worker.endpoint, headers)
    assert stats["batches"] == 0 and stats["max"] == batch_max
    for got, expected in zip(together, solo, strict=True):
        assert torch.equal(got, expected)  # nothing shared: bit for bit


def test_a_member_cancelled_mid_batch_leaves_and_the_others_finish(models_dir: Path) -> None:
    steps = 40
    headers = [request(models_dir, n, steps=steps) for n in range(3)]
    with serving(config(models_dir, batch_max=3, batch_wait_ms=50)) as worker:
        with queued_behind_a_holder(models_dir, worker.endpoint, headers) as jobs:
            jobs[1].wait_for(lambda m: m.get("step", 0) >= 2, "the batch under way")
            jobs[1].cancel()
            finished = [samples_of(jobs[0].finish()), samples_of(jobs[2].finish())]
        stats = batching_stats(worker.endpoint)
        solo = alone(worker.endpoint, [headers[0], headers[2]])
    assert jobs[1].cancelled and stats["batches"] == 1
    assert stats["unet_passes"] < stats["unet_calls_asked"]
    differences = [float((b - s).abs().max()) for b, s in zip(finished, solo, strict=True)]
    assert max(differences) < ATOL, differences
