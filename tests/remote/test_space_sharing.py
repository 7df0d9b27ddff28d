"""Space-sharing on one device: slots run together while their memory fits; the rest wait and say why.

Real in-process workers on loopback (device ``cpu`` in fp16, so the UNet is a
placed copy that the device memory manager counts), real clients, the tiny
seeded models. Nothing is timed: a long sampler (thousands of steps) holds a
slot or the budget until the test has seen what it waits for, then is
cancelled; every wait is bounded.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.device_memory import MIB, DeviceMemory
from diffsplit.engine.device_runner import activation_estimate
from diffsplit.engine.dtypes import DtypePolicy
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.executor import Executor
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.remote.fair_queue import FairQueue
from diffsplit.remote.worker import Worker, WorkerConfig
from diffsplit.transport.errors import RequestCancelled
from diffsplit.transport.sockets import Client

WAIT_S = 120.0
#: Far more steps than any test waits for: the job holds its slot until it is cancelled.
LONG_STEPS = 10_000
SEED = 7
SMALL = (8, 8)  # latent height, width of the jobs that fit


def sampler(models_dir: Path, *, steps: int = 3, seed: int = SEED, latent: tuple[int, int] = SMALL,
            node_id: str = "6") -> dict[str, Any]:
    """A KSampler request on the tiny SD 1.5 UNet."""
    registry = default_registry()
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    recipe = output_recipe_source(workflow, registry, ModelStore(models_dir))("1", 0)
    conditioning = [[torch.zeros(1, 77, 64), {}]]
    return {
        "op": "run_node", "node": {"id": node_id, "class_type": "KSampler"},
        "inputs": {
            "model": {"$ds:model": recipe}, "seed": seed, "steps": steps, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": conditioning,
            "negative": conditioning, "latent_image": {"samples": torch.zeros(1, 4, *latent)},
            "denoise": 1.0,
        },
    }


def samples_of(reply: dict[str, Any]) -> torch.Tensor:
    assert reply["op"] == "result", reply
    samples = reply["outputs"][0]["samples"]
    assert isinstance(samples, torch.Tensor)
    return samples


def fp16_config(models_dir: Path, **changes: Any) -> WorkerConfig:
    return WorkerConfig(models=models_dir, listen="tcp://127.0.0.1:*", device="cpu", dtype="fp16",
                        grace_s=2.0, **changes)


@contextmanager
def serving(config: WorkerConfig) -> Iterator[Worker]:
    """An in-process worker on a loopback port, served by a thread, answering once its slots run."""
    worker = Worker(config)
    thread = threading.Thread(target=worker.serve, name="test-worker-serve", daemon=True)
    thread.start()
    try:
        with Client(worker.endpoint) as client:
            assert client.request({"op": "hello"}, timeout=60)["op"] == "result"
        yield worker
    finally:
        worker.stop()
        thread.join(60)
        assert not thread.is_alive()


def device_stats(address: str) -> dict[str, Any]:
    with Client(address) as client:
        reply = client.request({"op": "stats"}, timeout=30)
    assert reply["op"] == "result", reply
    return reply["device"]


def wait_idle(address: str) -> None:
    """Until no slot is busy (a cancelled job stops at its next step, after its client stopped waiting)."""
    deadline = time.monotonic() + WAIT_S
    with Client(address) as client:
        while True:
            status = client.request({"op": "status"}, timeout=30)["status"]
            if not status["slots"]["busy"]:
                return
            assert time.monotonic() < deadline, f"a slot stayed busy: {status['slots']}"
            time.sleep(0.05)


class Watched:
    """One request awaited on its own thread; its progress messages kept in order as they arrive."""

    def __init__(self, client: Client, header: dict[str, Any]) -> None:
        self.messages: list[dict[str, Any]] = []
        self.reply: dict[str, Any] | None = None
        self.cancelled = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self.request_id = client.submit(header)
        self._thread = threading.Thread(target=self._wait, args=(client,), name="test-watched", daemon=True)
        self._thread.start()

    def _wait(self, client: Client) -> None:
        try:
            reply = client.result(self.request_id, timeout=300, on_progress=self._progress, cancel=self._stop)
        except RequestCancelled:
            reply, self.cancelled = None, True
        with self._changed:
            self.reply = reply
            self._changed.notify_all()

    def _progress(self, message: dict[str, Any]) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The first progress message that ``predicate`` accepts (fails after WAIT_S, or on the reply)."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(predicate(m) for m in self.messages) or not self._thread.is_alive(), WAIT_S)
            match = next((m for m in self.messages if predicate(m)), None)
        assert found and match is not None, f"no {what}; got {self.messages} then {self.reply}"
        return match

    def finish(self) -> dict[str, Any]:
        """The final reply."""
        self._thread.join(300)
        assert not self._thread.is_alive() and self.reply is not None, f"no reply: {self.messages}"
        return self.reply

    def cancel(self) -> None:
        """Cancel it on the worker (it stops at its next step) and stop waiting."""
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


def is_step(message: dict[str, Any]) -> bool:
    return "step" in message


def is_waiting(message: dict[str, Any]) -> bool:
    return "waiting" in message


@dataclass(frozen=True)
class OneJob:
    """What one small KSampler takes on the fp16 CPU device, measured on a worker with no budget."""

    peak_bytes: int  # its weights' copy plus its activation estimate
    activation_bytes: int
    reference: torch.Tensor  # its samples, seed SEED


@pytest.fixture(scope="module")
def one_job(models_dir: Path) -> OneJob:
    with serving(fp16_config(models_dir)) as worker, Client(worker.endpoint) as client:
        reference = samples_of(client.request(sampler(models_dir), timeout=WAIT_S))
        peak = device_stats(worker.endpoint)["peak_bytes"]
    memory = DeviceMemory(torch.device("cpu"), DtypePolicy.choose(torch.device("cpu"), dtype="fp16"))
    activation = activation_estimate(default_registry().get("KSampler"),
                                     {"latent_image": {"samples": torch.zeros(1, 4, *SMALL)}}, memory)
    assert 0 < activation < peak  # the copy of the UNet counts too
    return OneJob(peak, activation, reference)


def tight_budget(job: OneJob) -> int:
    """Room for one job and half another's activations: a second job waits for the first."""
    return job.peak_bytes + job.activation_bytes // 2


# -- the fair queue's places, in isolation ----------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_the_place_put_reports_is_where_the_round_robin_serves_the_item(seed: int) -> None:
    """Replaying every prefix of random puts and gets: ``ahead`` is the item's index in the drain."""
    rng = random.Random(seed)
    ops = [("put", rng.choice("abcd")) if rng.random() < 0.75 else ("get", "") for _ in range(60)]
    for end in range(1, len(ops) + 1):
        if ops[end - 1][0] != "put":
            continue
        queue: FairQueue[int] = FairQueue()
        place = None
        for index, (op, client) in enumerate(ops[:end]):
            if op == "put":
                place = queue.put(client, index)
            else:
                queue.get(timeout=0)
        drained = []
        while (item := queue.get(timeout=0)) is not None:
            drained.append(item)
        assert place is not None and drained.index(end - 1) == place.ahead, (ops[:end], drained, place)


def test_taken_counts_items_handed_out_until_done() -> None:
    queue: FairQueue[str] = FairQueue()
    assert queue.put("a", "a1").taken == 0
    assert queue.get(timeout=1) == "a1"
    place = queue.put("b", "b1")
    assert (place.ahead, place.taken) == (0, 1)
    queue.done()
    assert queue.put("b", "b2").taken == 0  # b1 is still waiting: one ahead, no taker busy
    assert queue.put("c", "c1").ahead == 1  # c's first round comes right after b's first item


# -- a worker's slots on one device -----------------------------------------------------------------


def test_two_jobs_that_fit_run_at_once_on_one_device(models_dir: Path, one_job: OneJob) -> None:
    with serving(fp16_config(models_dir, slots=2, vram_bytes=1 << 30)) as worker, \
            Client(worker.endpoint) as first, Client(worker.endpoint) as second:
        together = [Watched(first, sampler(models_dir)), Watched(second, sampler(models_dir))]
        images = [samples_of(job.finish()) for job in together]
        assert torch.equal(images[0], images[1]) and torch.equal(images[0], one_job.reference)

        wait_idle(worker.endpoint)
        holder = Watched(first, sampler(models_dir, steps=LONG_STEPS, seed=1))
        holder.wait_for(is_step, "step from the long sampler")
        beside = Watched(second, sampler(models_dir))
        image = samples_of(beside.finish())  # while the long sampler still holds the other slot
        assert holder.reply is None
        holder.cancel()
        assert holder.cancelled
        stats = device_stats(worker.endpoint)
    assert torch.equal(image, one_job.reference)
    assert not [m for job in (*together, beside) for m in job.messages if is_waiting(m) or "queued" in m]
    assert stats["device"] == "cpu" and stats["budget_bytes"] == 1 << 30
    assert stats["entries"] == 1 and stats["placed"] == 1 and stats["reused"] >= 3  # one shared fp16 copy
    assert stats["peak_bytes"] >= stats["resident_bytes"] + 2 * one_job.activation_bytes  # both at once


def test_a_job_that_does_not_fit_beside_another_waits_and_says_why(models_dir: Path,
                                                                   one_job: OneJob) -> None:
    budget = tight_budget(one_job)
    with serving(fp16_config(models_dir, slots=2, vram_bytes=budget)) as worker, \
            Client(worker.endpoint) as first, Client(worker.endpoint) as second:
        holder = Watched(first, sampler(models_dir, steps=LONG_STEPS, seed=1))
        holder.wait_for(is_step, "step from the long sampler")
        waiter = Watched(second, sampler(models_dir))
        message = waiter.wait_for(is_waiting, "waiting message from the second sampler")
        assert waiter.reply is None and not any(is_step(m) for m in waiter.messages)  # not started
        holder.cancel()
        image = samples_of(waiter.finish())
        stats = device_stats(worker.endpoint)
    assert message["node"] == "6"
    assert message["waiting"].startswith("waiting for device memory: KSampler needs")
    assert f"budget {budget / MIB:.0f} MiB" in message["waiting"]
    assert "queued" not in message  # a free slot took it: it waited for memory, not for a slot
    assert torch.equal(image, one_job.reference)
    assert stats["budget_bytes"] == budget and stats["peak_bytes"] <= budget


def test_a_job_larger_than_the_budget_fails_clearly_and_the_worker_goes_on(models_dir: Path,
                                                                           one_job: OneJob) -> None:
    budget = tight_budget(one_job)
    with serving(fp16_config(models_dir, slots=2, vram_bytes=budget)) as worker, \
            Client(worker.endpoint) as client:
        failed = client.request(sampler(models_dir, latent=(64, 64)), timeout=WAIT_S)
        image = samples_of(client.request(sampler(models_dir), timeout=WAIT_S))
    assert failed["op"] == "error" and failed["error"]["kind"] == "NodeFailed", failed
    text = failed["error"]["message"]
    assert text.startswith("out of device memory: KSampler needs") and f"is {budget / MIB:.0f} MiB" in text
    assert torch.equal(image, one_job.reference)


def test_a_request_no_slot_takes_is_told_its_place_in_line(models_dir: Path, one_job: OneJob) -> None:
    with serving(fp16_config(models_dir, slots=1)) as worker, Client(worker.endpoint) as first, \
            Client(worker.endpoint) as second, Client(worker.endpoint) as third:
        holder = Watched(first, sampler(models_dir, steps=LONG_STEPS, seed=1))
        holder.wait_for(is_step, "step from the long sampler")
        next_in_line = Watched(second, sampler(models_dir))
        queued = next_in_line.wait_for(lambda m: "queued" in m, "queued message for the second client")
        behind = Watched(third, sampler(models_dir, node_id="9"))
        queued_behind = behind.wait_for(lambda m: "queued" in m, "queued message for the third client")
        holder.cancel()
        images = [samples_of(next_in_line.finish()), samples_of(behind.finish())]
    assert queued == {**queued, "node": "6", "queued": 1,
                      "waiting": "queued: 0 request(s) ahead, all 1 slot(s) busy"}
    assert queued_behind == {**queued_behind, "node": "9", "queued": 2,
                             "waiting": "queued: 1 request(s) ahead, all 1 slot(s) busy"}
    # told its place when it queued and again each time it moved up, always before it ran
    assert [m["queued"] for m in next_in_line.messages if "queued" in m] == [1]
    assert [m["queued"] for m in behind.messages if "queued" in m] == [2, 1]
    for job in (next_in_line, behind):
        first_step = next(n for n, m in enumerate(job.messages) if is_step(m))
        assert all(n < first_step for n, m in enumerate(job.messages) if "queued" in m)
    assert torch.equal(images[0], one_job.reference) and torch.equal(images[1], one_job.reference)


def test_the_client_logs_its_place_in_the_queue(models_dir: Path, tmp_path: Path, inputs_dir: Path,
                                                registry: NodeRegistry,
                                                caplog: pytest.LogCaptureFixture) -> None:
    store = ModelStore(models_dir)
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=tmp_path / "out")
    outcome: list[Any] = []
    with caplog.at_level(logging.WARNING), serving(fp16_config(models_dir, slots=1)) as worker, \
            Client(worker.endpoint) as other:
        holder = Watched(other, sampler(models_dir, steps=LONG_STEPS, seed=1))
        holder.wait_for(is_step, "step from the long sampler")
        runner = RemoteRunner(assign_remotes(workflow, registry, [f"KSampler={worker.endpoint}"]),
                              output_recipe_source(workflow, registry, store), local_store=store)

        def run() -> None:
            with runner:
                outcome.append(executor.run(workflow, node_runner=runner))

        thread = threading.Thread(target=run, name="test-split-run", daemon=True)
        thread.start()
        deadline = time.monotonic() + WAIT_S
        while not [r for r in list(caplog.records) if "queued:" in r.getMessage()]:
            assert time.monotonic() < deadline and thread.is_alive(), "the client never logged its place"
            time.sleep(0.05)
        holder.cancel()
        thread.join(300)
    assert not thread.is_alive() and len(outcome) == 1 and outcome[0].outputs["6"]
    lines = [r.getMessage() for r in caplog.records if "queued:" in r.getMessage()]
    assert lines == ["node 6 (KSampler): the worker says: 'queued: 0 request(s) ahead, all 1 slot(s) busy'"]


def test_a_request_sent_right_after_a_reply_is_never_told_it_waits(models_dir: Path) -> None:
    """One client, one slot, each request sent the moment the last reply lands: the slot is already free.

    The worker frees a slot before it answers, so a client that sends its next node straight away
    (as a split workflow does) never reads a spurious "queued: 0 request(s) ahead, all 1 slot(s) busy".
    """
    with serving(fp16_config(models_dir, slots=1)) as worker, Client(worker.endpoint) as client:
        told: list[dict[str, Any]] = []
        for seed in range(12):
            reply = client.request(sampler(models_dir, steps=1, seed=seed), timeout=WAIT_S,
                                   on_progress=told.append)
            samples_of(reply)
    assert not [m for m in told if "queued" in m or "waiting" in m], told
