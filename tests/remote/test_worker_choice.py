"""Many workers from one client: a node goes to the worker that holds its model, else the least loaded.

The ordering itself is checked as a pure function (``order_workers``) and
with the status cache on an explicit clock. The rest uses real parts: two
in-process workers on loopback (fresh per test, so which one is warm is what
the test made it), the tiny seeded SD 1.5 models, split runs compared bit for
bit with the all-local run. A busy worker is made busy by a sampler of
thousands of steps, cancelled once the split run is done; every wait is bounded
and nothing is timed.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.executor import Executor, RunResult
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.rebuild import build_key
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.engine.wire_values import CONTROL, MODEL
from diffsplit.engine.worker_choice import (
    UNANSWERED,
    WorkerLoad,
    WorkerPicture,
    WorkerStatusCache,
    order_workers,
    recipe_digests,
)
from diffsplit.remote.request_log import OPS_LOGGER
from diffsplit.remote.worker import Worker, WorkerConfig
from diffsplit.tracer.recipe import Recipe
from diffsplit.transport.sockets import Client

from .test_space_sharing import serving as serving_config

WAIT_S = 120.0
#: Far more steps than the test waits for: the job holds its worker's only slot until it is cancelled.
LONG_STEPS = 10_000
#: Status answers from a live loopback worker always come well within this (no test waits on it).
ROOMY_STATUS_S = 30.0
PLAIN = sd15_workflow(lora=False, steps=2)
LORA = sd15_workflow(lora=True, steps=2)
UNET = "u" * 64  # stand-ins for build digests in the pure tests
CLIP = "c" * 64


def picture(busy: int, slots: int, queued: int = 0, holds: tuple[str, ...] = ()) -> WorkerPicture:
    return WorkerPicture(WorkerLoad(busy=busy, queued=queued, slots=slots), frozenset(holds))


def order(addresses: list[str], pictures: dict[str, WorkerPicture], digests: tuple[str, ...]) -> list[str]:
    return [choice.address for choice in order_workers(addresses, pictures, digests)]


# -- the ordering, as a pure function ------------------------------------------------------------------


def test_the_worker_holding_the_model_comes_first_even_when_busier_while_it_has_a_free_slot() -> None:
    pictures = {"a": picture(0, 2), "b": picture(2, 3, holds=(UNET,)), "c": picture(0, 1)}
    choices = order_workers(["a", "b", "c"], pictures, [UNET])
    assert [c.address for c in choices] == ["b", "a", "c"]
    assert choices[0].reason == "holds the model (2 of 3 slots busy, 0 queued)"
    assert choices[1].reason == "least loaded: 0 of 2 slots busy, 0 queued"
    assert choices[2].reason == "next by load: 0 of 1 slot busy, 0 queued"


def test_a_worker_with_a_free_slot_comes_before_a_holder_where_the_node_would_wait() -> None:
    pictures = {"a": picture(0, 2), "b": picture(2, 2, queued=3, holds=(UNET,)),
                "c": picture(1, 1, holds=(UNET,))}
    assert order(["b", "c", "a"], pictures, (UNET,)) == ["a", "c", "b"]  # then the holders, by load


def test_holding_more_of_the_models_comes_before_holding_fewer() -> None:
    pictures = {"a": picture(0, 1, holds=(CLIP,)), "b": picture(1, 2, holds=(UNET, CLIP)), "c": picture(0, 1)}
    choices = order_workers(["a", "b", "c"], pictures, [UNET, CLIP])
    assert [c.address for c in choices] == ["b", "a", "c"]
    assert choices[0].reason.startswith("holds the models")
    assert choices[1].reason.startswith("holds 1 of 2 models")
    # a model the node does not need attracts nothing
    assert order(["a", "b"], {"a": picture(1, 1, holds=(CLIP,)), "b": picture(0, 1)}, (UNET,)) == ["b", "a"]


def test_without_a_holder_the_least_loaded_share_goes_first() -> None:
    pictures = {
        "full": picture(1, 1),  # share 1
        "queued": picture(0, 2, queued=3),  # share 1.5: queued requests count like busy slots
        "half": picture(1, 2),  # share 0.5
        "idle": picture(0, 4),
    }
    assert order(["full", "queued", "half", "idle"], pictures, (UNET,)) == ["idle", "half", "full", "queued"]
    assert order(["full", "queued", "half", "idle"], pictures, ()) == ["idle", "half", "full", "queued"]


@pytest.mark.parametrize("given", list(itertools.permutations(["a", "b", "c"])))
def test_ties_keep_the_users_order(given: tuple[str, ...]) -> None:
    idle = {address: picture(0, 2) for address in given}
    assert order(list(given), idle, (UNET,)) == list(given)
    holding = {address: picture(1, 2, holds=(UNET,)) for address in given}
    assert order(list(given), holding, (UNET,)) == list(given)


def test_a_worker_that_did_not_answer_goes_last_in_the_users_order() -> None:
    pictures = {"busy": picture(4, 1, queued=9), "silent": UNANSWERED}  # "gone" has no picture at all
    choices = order_workers(["silent", "gone", "busy"], pictures, [UNET])
    assert [c.address for c in choices] == ["busy", "silent", "gone"]
    assert choices[1].reason == choices[2].reason == "it did not answer status"
    # nobody answered: the user's order, every worker still in it
    assert order(["x", "y", "z"], {}, (UNET,)) == ["x", "y", "z"]


def test_a_status_reply_is_read_strictly() -> None:
    status = {"queue": {"length": 2, "max": 16}, "slots": {"busy": 1, "total": 2},
              "models": [{"digest": UNET, "name": "n", "bytes": 1, "idle_s": 0.0, "in_use": False}, "junk"]}
    assert WorkerPicture.from_status(status) == picture(1, 2, queued=2, holds=(UNET,))
    for broken in ({**status, "slots": {"busy": True, "total": 2}}, {**status, "queue": {"length": -1}},
                   {**status, "models": None}, {"slots": {"busy": 0, "total": 1}}, ["not", "a", "map"]):
        with pytest.raises(ValueError):
            WorkerPicture.from_status(broken)


def test_the_status_cache_keeps_answers_for_its_ttl_and_learns_what_ran() -> None:
    now = [100.0]
    cache = WorkerStatusCache(ttl_s=3.0, clock=lambda: now[0])
    cache.put("a", picture(0, 1))
    cache.put("b", UNANSWERED)
    cache.note_holds("a", {UNET})  # a node needing UNET just ran on a
    assert cache.get("a") == picture(0, 1, holds=(UNET,))
    cache.note_holds("b", {UNET})  # b ran a node after all: its silence is forgotten, it is asked again
    assert cache.get("b") is None
    cache.note_holds("c", {UNET})  # never asked: nothing to learn
    assert cache.get("c") is None
    now[0] = 103.0
    assert cache.get("a") == picture(0, 1, holds=(UNET,))  # learning did not make the answer younger
    now[0] = 103.5
    assert cache.get("a") is None
    cache.put("a", picture(1, 1))
    cache.forget("a")
    assert cache.get("a") is None


def test_nodes_sent_since_a_picture_count_as_queued_until_they_finish() -> None:
    cache = WorkerStatusCache(ttl_s=60.0)
    cache.put("a", picture(0, 1))
    cache.put("b", picture(0, 1))
    cache.note_sent("a")  # within one TTL the next node must not also pick a as idle
    assert cache.get("a") == picture(0, 1, queued=1)
    assert order(["a", "b"], {"a": cache.get("a"), "b": cache.get("b")}, ()) == ["b", "a"]
    cache.note_finished("a")
    assert cache.get("a") == picture(0, 1)
    cache.note_sent("b")
    cache.put("b", picture(1, 1))  # a fresh answer already counts it: not twice
    assert cache.get("b") == picture(1, 1)
    cache.note_finished("b")
    assert cache.get("b") == picture(1, 1)


def test_a_silent_worker_is_remembered_longer_than_an_answer() -> None:
    now = [0.0]
    cache = WorkerStatusCache(ttl_s=3.0, silent_ttl_s=30.0, clock=lambda: now[0])
    cache.put("answered", picture(0, 1))
    cache.put("silent", UNANSWERED)
    now[0] = 10.0
    assert cache.get("answered") is None  # asked again: its load has changed by now
    assert cache.get("silent") == UNANSWERED  # a dead worker is not asked (and waited on) every 3 s
    now[0] = 30.5
    assert cache.get("silent") is None


def test_the_status_cache_is_safe_across_threads() -> None:
    cache = WorkerStatusCache(ttl_s=60.0)
    digests = [f"{i:064x}" for i in range(200)]
    cache.put("a", picture(0, 1))

    def learn(part: list[str]) -> None:
        for digest in part:
            cache.note_holds("a", {digest})

    threads = [threading.Thread(target=learn, args=(digests[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    known = cache.get("a")
    assert known is not None and known.digests == frozenset(digests)


def test_recipe_digests_finds_models_and_control_hints_and_skips_junk(models_dir: Path,
                                                                       registry: NodeRegistry) -> None:
    store = ModelStore(models_dir)
    recipes = output_recipe_source(load_workflow(LORA, registry), registry, store)
    unet, lora_unet, vae = recipes("1", 0), recipes("2", 0), recipes("1", 2)
    assert unet is not None and lora_unet is not None and vae is not None
    built = build_key(Recipe.from_dict(unet), registry)
    # UNet and VAE of one checkpoint are two builds (each part alone); a fingerprint changes neither
    assert built == Recipe.from_dict(unet).build_digest() + ":0"
    digest_of_vae = Recipe.from_dict(vae).build_digest() + ":2"
    assert recipe_digests({"vae": {MODEL: {**vae, "fingerprint": "f" * 64}}}) == {digest_of_vae}
    hint = {"controlnet": lora_unet, "previous": {"controlnet": unet, "previous": None}}
    wire = {"model": {MODEL: unet}, "positive": [[torch.zeros(1), {"control": {CONTROL: hint}}]],
            "bad": {MODEL: {"v": 99, "steps": []}}, "worse": {MODEL: "text"}}
    assert recipe_digests(wire) == {built, build_key(Recipe.from_dict(lora_unet), registry)}
    assert len(recipe_digests(wire)) == 2  # the LoRA'd UNet is another build


# -- real workers ------------------------------------------------------------------------------------


def dead_address() -> str:
    """A loopback port that nothing listens on (bound once, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


@contextmanager
def serving(models_dir: Path) -> Iterator[Worker]:
    """An in-process CPU worker (one slot) on a loopback port, answering once up."""
    with serving_config(WorkerConfig(models=models_dir, listen="tcp://127.0.0.1:*", device="cpu",
                                     grace_s=2.0)) as worker:
        yield worker


def status_of(address: str) -> dict[str, Any]:
    with Client(address) as client:
        reply = client.request({"op": "status"}, timeout=30)
    assert reply["op"] == "result", reply
    return reply["status"]


def wait_for_busy_slots(address: str, busy: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while status_of(address)["slots"]["busy"] != busy:
        assert time.monotonic() < deadline, f"{address} never had {busy} busy slot(s)"
        time.sleep(0.05)


def sampler_request(models_dir: Path, registry: NodeRegistry, steps: int) -> dict[str, Any]:
    """A KSampler request on the tiny plain SD 1.5 UNet, as a client of its own sends it."""
    recipe = output_recipe_source(load_workflow(PLAIN, registry), registry, ModelStore(models_dir))("1", 0)
    conditioning = [[torch.zeros(1, 77, 64), {}]]
    return {
        "op": "run_node", "node": {"id": "6", "class_type": "KSampler"},
        "inputs": {
            "model": {MODEL: recipe}, "seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": conditioning, "negative": conditioning,
            "latent_image": {"samples": torch.zeros(1, 4, 8, 8)}, "denoise": 1.0,
        },
    }


def run(models_dir: Path, out: Path, registry: NodeRegistry, document: dict[str, Any],
        remote: list[str] | None = None, **options: Any) -> tuple[RunResult, RemoteRunner | None]:
    store = ModelStore(models_dir)
    workflow = load_workflow(document, registry)
    executor = Executor(registry, store, output_dir=out, max_workers=1)
    if remote is None:
        return executor.run(workflow), None
    assigned = assign_remotes(workflow, registry, remote)
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store,
                      **options) as runner:
        return executor.run(workflow, node_runner=runner), runner


class OpsSeen(logging.Handler):
    """The ``op`` of each request record the in-process workers log (``remote.request_log``).

    ``hello`` is left out: ``serving()`` probes a worker with one, and a worker logs a request just
    after its reply has left, so the probe's record can land after ``serving()`` has returned.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ops: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        ops = getattr(record, "ops", None)
        if isinstance(ops, dict) and ops.get("op") != "hello":
            self.ops.append(str(ops.get("op")))


def wait_for_ops(seen: OpsSeen, count: int) -> list[str]:
    """The ops once ``count`` are logged (a worker logs a request just after its reply has left)."""
    deadline = time.monotonic() + WAIT_S
    while len(seen.ops) < count:
        assert time.monotonic() < deadline, f"only {seen.ops} logged"
        time.sleep(0.01)
    return list(seen.ops)


@contextmanager
def ops_seen() -> Iterator[OpsSeen]:
    logger = logging.getLogger(OPS_LOGGER)
    handler, level = OpsSeen(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def chosen(caplog: pytest.LogCaptureFixture, node_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "diffsplit.engine.offload" and r.getMessage().startswith(f"node {node_id} ")
            and " chosen: " in r.getMessage()]


@pytest.fixture(scope="module")
def plain_image(models_dir: Path, registry: NodeRegistry, tmp_path_factory: pytest.TempPathFactory):
    result, _ = run(models_dir, tmp_path_factory.mktemp("plain"), registry, PLAIN)
    return result.outputs["7"][0]


@pytest.fixture(scope="module")
def lora_image(models_dir: Path, registry: NodeRegistry, tmp_path_factory: pytest.TempPathFactory):
    result, _ = run(models_dir, tmp_path_factory.mktemp("lora"), registry, LORA)
    return result.outputs["7"][0]


def test_a_workers_status_lists_the_build_key_of_the_recipe_it_was_sent(
    models_dir: Path, registry: NodeRegistry
) -> None:
    request = sampler_request(models_dir, registry, steps=1)
    with serving(models_dir) as worker:
        with Client(worker.endpoint) as client:
            assert client.request(request, timeout=WAIT_S)["op"] == "result"
        status = status_of(worker.endpoint)
    expected = build_key(Recipe.from_dict(request["inputs"]["model"][MODEL]), registry)
    assert [model["digest"] for model in status["models"]] == [expected]
    assert recipe_digests(request["inputs"]) == {expected}
    assert WorkerPicture.from_status(status) == picture(0, 1, holds=(expected,))


def test_a_node_goes_to_the_second_worker_when_it_holds_the_model(
    models_dir: Path, registry: NodeRegistry, plain_image: torch.Tensor, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with serving(models_dir) as a, serving(models_dir) as b:
        warm_up = sampler_request(models_dir, registry, steps=1)
        with Client(b.endpoint) as client:  # b builds the UNet's checkpoint; a holds nothing
            assert client.request(warm_up, timeout=WAIT_S)["op"] == "result"
        with caplog.at_level(logging.INFO, logger="diffsplit.engine.offload"):
            result, runner = run(models_dir, tmp_path, registry, PLAIN,
                                 [f"KSampler={a.endpoint},{b.endpoint}"], status_timeout_s=ROOMY_STATUS_S)
        a_models = status_of(a.endpoint)["models"]
    assert runner is not None and runner.placement("6") == b.endpoint
    stats = runner.stats["6"]
    assert stats.address == b.endpoint
    assert stats.cache_misses == 0 and stats.cache_hits >= 1  # nothing was rebuilt
    assert a_models == []  # a never saw the node
    assert chosen(caplog, "6") == [
        f"node 6 (KSampler): worker {b.endpoint} chosen: holds the model (0 of 1 slot busy, 0 queued)"]
    assert torch.equal(result.outputs["7"][0], plain_image)


def test_with_neither_warm_a_node_goes_to_the_idle_worker_not_the_busy_first_one(
    models_dir: Path, registry: NodeRegistry, lora_image: torch.Tensor, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a samples the plain UNet for a long time; the run needs the LoRA'd UNet, which neither holds
    with serving(models_dir) as a, serving(models_dir) as b, Client(a.endpoint) as holder:
        long_job = holder.submit(sampler_request(models_dir, registry, steps=LONG_STEPS))
        try:
            wait_for_busy_slots(a.endpoint, 1)
            with caplog.at_level(logging.INFO, logger="diffsplit.engine.offload"):
                result, runner = run(models_dir, tmp_path, registry, LORA,
                                     [f"KSampler={a.endpoint},{b.endpoint}"], status_timeout_s=ROOMY_STATUS_S)
        finally:
            holder.cancel(long_job)  # it stops at its next step
            wait_for_busy_slots(a.endpoint, 0)
    assert runner is not None and runner.placement("6") == b.endpoint
    assert chosen(caplog, "6") == [
        f"node 6 (KSampler): worker {b.endpoint} chosen: least loaded: 0 of 1 slot busy, 0 queued"]
    assert torch.equal(result.outputs["7"][0], lora_image)


def test_a_worker_that_does_not_answer_status_goes_last_and_is_not_tried(
    models_dir: Path, registry: NodeRegistry, plain_image: torch.Tensor, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = dead_address()
    with serving(models_dir) as b, caplog.at_level(logging.INFO, logger="diffsplit.engine"):
        result, runner = run(models_dir, tmp_path, registry, PLAIN, [f"KSampler={dead},{b.endpoint}"],
                             status_timeout_s=ROOMY_STATUS_S)
    assert runner is not None and runner.placement("6") == b.endpoint
    about_dead = [r.getMessage() for r in caplog.records if dead in r.getMessage()]
    assert len(about_dead) == 1 and "did not answer status" in about_dead[0], about_dead
    assert "unavailable" in about_dead[0]
    assert chosen(caplog, "6") == [
        f"node 6 (KSampler): worker {b.endpoint} chosen: least loaded: 0 of 1 slot busy, 0 queued"]
    assert torch.equal(result.outputs["7"][0], plain_image)


def test_one_worker_is_asked_no_status_and_several_are(
    models_dir: Path, registry: NodeRegistry, plain_image: torch.Tensor, tmp_path: Path
) -> None:
    with serving(models_dir) as b:
        with ops_seen() as seen:
            result, runner = run(models_dir, tmp_path / "one", registry, PLAIN, [f"KSampler={b.endpoint}"])
        assert runner is not None and runner.placement("6") == b.endpoint
        assert torch.equal(result.outputs["7"][0], plain_image)
        assert wait_for_ops(seen, 1) == ["run_node"]  # a status would have been logged before it
        with serving(models_dir) as a, ops_seen() as seen:
            result, runner = run(models_dir, tmp_path / "two", registry, PLAIN,
                                 [f"KSampler={a.endpoint},{b.endpoint}"], status_timeout_s=ROOMY_STATUS_S)
        assert runner is not None and runner.placement("6") == b.endpoint  # it holds the model now
        assert sorted(wait_for_ops(seen, 3)) == ["run_node", "status", "status"]
        assert torch.equal(result.outputs["7"][0], plain_image)
