"""CPU thread counts: a worker runs each job with its client's count, so split == local on any core count."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.transport.compute_threads import BadThreadCount, intra_op_threads, requested_threads
from diffsplit.transport.sockets import Client

from .test_split_runs import assert_same_outputs, run_workflow
from .test_worker_protocol import sampler_request


@pytest.fixture
def other_thread_count() -> Iterator[int]:
    """This process computes with a thread count other than a fresh worker's default (the core count)."""
    before = torch.get_num_threads()
    count = 1 if (os.cpu_count() or 1) > 1 else 2
    torch.set_num_threads(count)
    yield count
    torch.set_num_threads(before)


def test_split_equals_local_when_the_client_uses_another_thread_count(
    other_thread_count: int, worker_address: str, models_dir: Path, tmp_path: Path, registry: NodeRegistry,
    inputs_dir: Path,
) -> None:
    document = sd15_workflow(lora=True)
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    remote = [f"KSampler={worker_address}", f"VAEDecode={worker_address}"]
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=remote)
    offloaded = sorted(runner.stats)
    assert offloaded
    assert_same_outputs(local, split, offloaded)


def test_a_malformed_thread_count_is_refused_naming_the_field(worker_address: str, models_dir: Path) -> None:
    request = {**sampler_request(models_dir, steps=1), "threads": 0}
    with Client(worker_address) as client:
        reply = client.request(request, timeout=60)
    assert reply["op"] == "error" and reply["error"]["kind"] == "BadRequest"
    assert "'threads'" in reply["error"]["message"]


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True, 10_000])
def test_requested_threads_accepts_only_small_positive_ints(value: object) -> None:
    with pytest.raises(BadThreadCount):
        requested_threads({"threads": value})


def test_requested_threads_of_a_request_that_states_none_is_none() -> None:
    assert requested_threads({}) is None and requested_threads({"threads": 3}) == 3


def test_the_count_is_set_for_the_running_thread_only_and_restored() -> None:
    main_before = torch.get_num_threads()
    seen: dict[str, int] = {}

    def job() -> None:
        before = torch.get_num_threads()
        with intra_op_threads(main_before + 1):
            seen["inside"] = torch.get_num_threads()
        seen["after"] = torch.get_num_threads() - before

    worker = threading.Thread(target=job)
    worker.start()
    worker.join()
    assert seen == {"inside": main_before + 1, "after": 0}
    assert torch.get_num_threads() == main_before
