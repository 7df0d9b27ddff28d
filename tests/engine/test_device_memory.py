"""DeviceMemory on the CPU: placed copies under a byte budget, LRU out, pins, admission, OOM retry.

On the CPU a float16 or bfloat16 policy makes real copies, so every rule of the
manager (budget, eviction order, pins, one copy per master, copies dying with
their masters, admission of concurrent jobs) runs here exactly as on a GPU.
The modules are bias-free ``nn.Linear(32, n)``: ``64 * n`` bytes in a 16-bit dtype,
so each size names its module in ``resident()``.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.device_memory import (
    DeviceMemory,
    DeviceOutOfMemory,
    is_placed,
    placed_copy,
    target_bytes,
)
from diffsplit.engine.device_runner import (
    UNET_BYTES_PER_LATENT_PIXEL,
    VAE_DECODE_BYTES_PER_LATENT_PIXEL,
    activation_estimate,
    computes_on_device,
    is_out_of_memory,
    run_on_device,
)
from diffsplit.engine.dtypes import DtypePolicy
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.nodes.base import InputSpec, NodeClass, OutputSpec
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.types import DiffusionModel
from torch import nn

CPU = torch.device("cpu")
FP16 = DtypePolicy(*(torch.float16,) * 5)
BF16 = DtypePolicy(*(torch.bfloat16,) * 5)
#: Bounded waits for the threads of admission tests (never reached when the code is right).
JOIN_S = 20.0


def linear(n: int) -> nn.Linear:
    """A float32 master of ``64 * n`` bytes in 16 bits."""
    return nn.Linear(32, n, bias=False)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert after[name].device == tensor.device, name
        assert torch.equal(after[name], tensor), name


def sizes(memory: DeviceMemory) -> list[int]:
    """Resident copies' bytes, least recently used first."""
    return [size for _name, size, _pins in memory.resident()]


# -- copies -----------------------------------------------------------------------------------------


def test_fp32_on_the_cpu_is_the_master_itself() -> None:
    memory = DeviceMemory(CPU, DtypePolicy(), budget_bytes=10)  # a budget it would exceed if it copied
    master = linear(32)
    assert memory.place(master, "unet") is master
    assert memory.place_as(master, None) is master
    stats = memory.stats()
    assert (stats.entries, stats.placed, stats.reused, stats.resident_bytes) == (0, 0, 0, 0)


@pytest.mark.parametrize("policy", [FP16, BF16], ids=["fp16", "bf16"])
def test_a_copy_is_in_the_policy_dtype_and_the_master_is_untouched(policy: DtypePolicy) -> None:
    master = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    master[0].weight.requires_grad_(False)
    before = snapshot(master)
    memory = DeviceMemory(CPU, policy)
    placed = memory.place(master, "vae")
    assert placed is not master
    assert all(tensor.dtype == policy.vae for tensor in placed.state_dict().values())
    assert not placed[0].weight.requires_grad and placed[0].bias.requires_grad
    assert isinstance(placed[0].weight, nn.Parameter)
    for name, tensor in placed.state_dict().items():
        assert torch.equal(tensor, before[name].to(policy.vae)), name
        assert tensor.data_ptr() != master.state_dict()[name].data_ptr(), name
    assert_unchanged(master, before)
    with torch.no_grad():
        placed[0].weight.add_(1.0)
    assert_unchanged(master, before)
    assert memory.stats().resident_bytes == target_bytes(master, policy.vae) == (8 * 16 + 16 + 16 + 16) * 2


def test_placing_twice_gives_the_one_copy() -> None:
    memory = DeviceMemory(CPU, FP16)
    master = linear(32)
    first = memory.place(master, "unet")
    assert memory.place(master, "text_encoder") is first  # the same dtype: the same copy
    stats = memory.stats()
    assert (stats.entries, stats.placed, stats.reused) == (1, 1, 1)
    assert stats.resident_bytes == 2048


def test_another_dtype_replaces_the_copy_instead_of_adding_one() -> None:
    memory = DeviceMemory(CPU, FP16)
    master = linear(32)
    half = memory.place_as(master, torch.float16)
    brain = memory.place_as(master, torch.bfloat16)
    assert brain is not half and brain.weight.dtype == torch.bfloat16
    stats = memory.stats()
    assert (stats.entries, stats.placed, stats.resident_bytes) == (1, 2, 2048)
    assert memory.place_as(master, torch.bfloat16) is brain


def test_tied_weights_stay_tied_and_integer_buffers_keep_their_dtype() -> None:
    master = nn.Module()
    master.a = nn.Linear(4, 4, bias=False)
    master.b = nn.Linear(4, 4, bias=False)
    master.b.weight = master.a.weight
    master.register_buffer("steps", torch.arange(10, dtype=torch.int64))
    assert target_bytes(master, torch.float16) == 16 * 2 + 10 * 8  # shared weight once, int64 as it is
    copy = placed_copy(master, CPU, torch.float16)
    assert copy.a.weight is copy.b.weight
    assert copy.a.weight.dtype == torch.float16
    assert copy.steps.dtype == torch.int64 and torch.equal(copy.steps, master.steps)
    assert master.a.weight.dtype == torch.float32
    assert is_placed(copy, CPU, torch.float16)
    assert not is_placed(master, CPU, torch.float16)
    assert is_placed(master, CPU, torch.float32)


def test_budget_none_never_evicts() -> None:
    memory = DeviceMemory(CPU, FP16)
    masters = [linear(32 + n) for n in range(5)]
    for master in masters:
        memory.place(master, "unet")
    stats = memory.stats()
    assert (stats.entries, stats.evicted, stats.budget_bytes) == (5, 0, None)


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        DeviceMemory(CPU, FP16, budget_bytes=-1)


# -- budget and eviction ----------------------------------------------------------------------------


def test_least_recently_used_copies_leave_first() -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=4400)
    a, b, c = linear(32), linear(33), linear(34)  # 2048, 2112, 2176 bytes
    copy_a = memory.place(a, "unet")
    memory.place(b, "unet")
    assert sizes(memory) == [2048, 2112]
    assert memory.place(a, "unet") is copy_a  # a is now the most recently used
    assert sizes(memory) == [2112, 2048]
    memory.place(c, "unet")  # room for c: b goes (least recently used), a stays
    assert sizes(memory) == [2048, 2176]
    assert memory.stats().evicted == 1
    assert memory.place(a, "unet") is copy_a
    copy_b = memory.place(b, "unet")  # b comes back as a new copy; c is now the oldest
    assert sizes(memory) == [2048, 2112]
    assert memory.place(b, "unet") is copy_b
    stats = memory.stats()
    assert (stats.placed, stats.evicted, stats.entries) == (4, 2, 2)
    assert stats.resident_bytes == 2048 + 2112 <= 4400
    assert stats.peak_bytes == 2048 + 2176


def test_eviction_stops_as_soon_as_the_new_copy_fits() -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=3 * 2048)
    masters = [linear(32) for _ in range(3)]
    for master in masters:
        memory.place(master, "unet")
    memory.place(linear(64), "unet")  # 4096 bytes: exactly two of the three go
    assert sizes(memory) == [2048, 4096]
    assert memory.stats().evicted == 2


def test_free_unpinned_drops_only_what_no_job_pins() -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=100_000)
    loose, held = linear(32), linear(33)
    memory.place(loose, "unet")
    with memory.job():
        held_copy = memory.place(held, "unet")
        assert memory.free_unpinned() == 2048
        assert sizes(memory) == [2112]
        assert memory.place(held, "unet") is held_copy
    assert memory.free_unpinned() == 2112
    assert memory.stats().entries == 0


def test_pinned_copies_are_never_evicted() -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=4200)
    a, b, c = linear(32), linear(33), linear(34)
    with memory.job(what="the pinning job"):
        memory.place(a, "unet")
        memory.place(b, "unet")
        assert [pins for _name, _size, pins in memory.resident()] == [1, 1]
        with pytest.raises(DeviceOutOfMemory) as caught:
            memory.place(c, "unet")
        assert caught.value.need_bytes == 2176
        assert caught.value.pinned_bytes == 2048 + 2112
        assert caught.value.budget_bytes == 4200
        assert "held by running jobs" in str(caught.value)
        assert sizes(memory) == [2048, 2112]
        assert memory.stats().evicted == 0
    assert [pins for _name, _size, pins in memory.resident()] == [0, 0]
    memory.place(c, "unet")  # the job ended: a and b (oldest first) make room, 2112 + 2176 > 4200
    assert sizes(memory) == [2176]
    assert memory.stats().evicted == 2


def test_a_module_larger_than_the_budget_fails_and_evicts_nothing() -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=3000)
    small = linear(32)
    small_copy = memory.place(small, "unet")
    big = linear(100)  # 6400 bytes
    before = snapshot(big)
    with pytest.raises(DeviceOutOfMemory) as caught:
        memory.place(big, "unet")
    assert caught.value.need_bytes == 6400
    assert caught.value.budget_bytes == 3000
    assert "out of device memory" in str(caught.value) and "Linear in fp16" in str(caught.value)
    assert memory.place(small, "unet") is small_copy  # the copy that was there stayed
    stats = memory.stats()
    assert (stats.evicted, stats.entries, stats.placed) == (0, 1, 1)
    assert_unchanged(big, before)


def test_a_job_that_could_never_fit_fails_at_once() -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=5000)
    big = linear(100)
    job = memory.job(modules=[(big, torch.float16)], what="BigNode")
    with pytest.raises(DeviceOutOfMemory) as caught, job:
        pytest.fail("the job ran")
    assert "BigNode needs" in str(caught.value)
    assert caught.value.need_bytes == 6400
    with pytest.raises(DeviceOutOfMemory, match="ActivationsNode"), memory.job(6000, what="ActivationsNode"):
        pytest.fail("the job ran")
    # a module that is at home (float32 on the CPU) needs no room
    with memory.job(4000, modules=[(big, torch.float32)]):
        pass
    assert memory.stats().placed == 0


def test_a_job_alone_evicts_unpinned_copies_to_fit() -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=5000)
    old = [linear(32), linear(32)]
    for master in old:
        memory.place(master, "unet")
    new = linear(33)
    with memory.job(2000, modules=[(new, torch.float16)]):
        memory.place(new, "unet")
        assert sizes(memory) == [2112]
        assert memory.stats().peak_bytes == 2112 + 2000
    assert memory.stats().evicted == 2


def test_nested_jobs_join_the_outer_one() -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=5000)
    master = linear(32)
    with memory.job(what="outer"):
        with memory.job(10**9, what="inner"):  # joins: no admission of its own
            memory.place(master, "unet")
        assert [pins for _name, _size, pins in memory.resident()] == [1]
    assert [pins for _name, _size, pins in memory.resident()] == [0]


# -- copies go with their masters -------------------------------------------------------------------


def test_a_copy_goes_when_its_master_is_collected() -> None:
    memory = DeviceMemory(CPU, FP16)
    master, kept = linear(32), linear(33)
    copy = weakref.ref(memory.place(master, "unet"))
    memory.place(kept, "unet")
    assert memory.stats().entries == 2
    del master
    gc.collect()
    stats = memory.stats()
    assert (stats.entries, stats.resident_bytes) == (1, 2112)
    assert copy() is None


def test_a_copy_whose_master_dies_during_a_job_goes_after_the_job() -> None:
    memory = DeviceMemory(CPU, FP16)
    master = linear(32)
    with memory.job():
        memory.place(master, "unet")
        del master
        gc.collect()
        assert memory.stats().entries == 1  # pinned: the running job may still use it
    assert memory.stats().entries == 0


def test_a_new_master_at_a_dead_masters_address_gets_its_own_copy() -> None:
    memory = DeviceMemory(CPU, FP16)
    for n in range(20):  # ids of collected modules get reused: never serve the dead one's copy
        master = linear(32 + n % 3)
        copy = memory.place(master, "unet")
        assert copy.weight.shape == master.weight.shape
        assert torch.equal(copy.weight, master.weight.to(torch.float16))
        del master, copy
        gc.collect()
    assert memory.stats().entries == 0


# -- admission of concurrent jobs -------------------------------------------------------------------


def _in_thread(target: Callable[[], None], errors: list[BaseException], name: str) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("placed_first", [True, False], ids=["placed", "declared-only"])
def test_a_job_that_does_not_fit_beside_a_running_one_waits_for_it(placed_first: bool) -> None:
    """``declared-only``: the running job has not placed its module yet; its declaration still counts."""
    memory = DeviceMemory(CPU, FP16, budget_bytes=6000)
    a, b = linear(32), linear(33)
    first_in, release, waiting, second_in = (threading.Event() for _ in range(4))
    events: list[str] = []
    messages: list[str] = []
    errors: list[BaseException] = []

    def first() -> None:
        with memory.job(2000, modules=[(a, torch.float16)], what="FirstNode"):
            if placed_first:
                memory.place(a, "unet")
            first_in.set()
            assert release.wait(JOIN_S)
            if not placed_first:
                memory.place(a, "unet")
            events.append("first out")

    def on_wait(message: str) -> None:
        messages.append(message)
        waiting.set()

    def second() -> None:
        with memory.job(2000, modules=[(b, torch.float16)], what="SecondNode", on_wait=on_wait):
            events.append("second in")
            second_in.set()
            memory.place(b, "unet")

    one = _in_thread(first, errors, "test-first-job")
    assert first_in.wait(JOIN_S)
    two = _in_thread(second, errors, "test-second-job")
    try:
        assert waiting.wait(JOIN_S), "the second job did not wait"
        assert not second_in.is_set()
    finally:
        release.set()
        one.join(JOIN_S)
        two.join(JOIN_S)
    assert not errors
    assert not one.is_alive() and not two.is_alive()
    assert events == ["first out", "second in"]
    assert len(messages) == 1
    assert messages[0].startswith("waiting for device memory: SecondNode needs")
    assert "1 running job(s)" in messages[0]
    stats = memory.stats()
    assert stats.evicted == 1  # a's copy (unpinned once the first job ended) made room for b and 2000 bytes
    assert sizes(memory) == [2112]
    assert stats.peak_bytes <= 6000


def test_jobs_that_fit_together_run_together() -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=10_000)
    a, b = linear(32), linear(33)
    both_in = threading.Barrier(2, timeout=JOIN_S)
    messages: list[str] = []
    errors: list[BaseException] = []

    def job(master: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with memory.job(2000, modules=[(master, torch.float16)], on_wait=messages.append):
                memory.place(master, "unet")
                both_in.wait()  # both inside at once, or the barrier times out

        return run

    threads = [_in_thread(job(a), errors, "test-job-a"), _in_thread(job(b), errors, "test-job-b")]
    for thread in threads:
        thread.join(JOIN_S)
    assert not errors and not messages
    assert memory.stats().peak_bytes == 2048 + 2112 + 4000


# -- running a node on the device: one retry after out-of-memory ------------------------------------


@pytest.fixture(scope="module")
def tiny_model(models_dir: Path) -> DiffusionModel:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").model


class Flaky:
    """A sampler-like node function that fails with ``error`` on its first ``failures`` calls."""

    def __init__(self, failures: int, error: Callable[[], Exception]) -> None:
        self.failures = failures
        self.error = error
        self.seen: list[nn.Module] = []

    def __call__(self, ctx: Any, *, model: DiffusionModel, latent_image: dict[str, Any]) -> tuple[Any, ...]:
        self.seen.append(model.unet)
        if len(self.seen) <= self.failures:
            raise self.error()
        dtype = next(model.unet.parameters()).dtype
        return ({"samples": latent_image["samples"] + torch.ones((), dtype=dtype).float()},)


def flaky_class(function: Flaky) -> NodeClass:
    return NodeClass("FlakySampler", (InputSpec("model", "MODEL"), InputSpec("latent_image", "LATENT")),
                     (OutputSpec("LATENT", "LATENT"),), function)


def run_flaky(memory: DeviceMemory, function: Flaky, model: DiffusionModel) -> tuple[Any, ...]:
    node_class = flaky_class(function)
    inputs = {"model": model, "latent_image": {"samples": torch.zeros(1, 4, 8, 8)}}
    return run_on_device(memory, node_class, inputs, lambda placed: node_class.function(None, **placed))


def cuda_oom() -> Exception:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_once_is_retried_and_the_run_returns(tiny_model: DiffusionModel) -> None:
    before = snapshot(tiny_model.unet)
    memory = DeviceMemory(CPU, FP16, budget_bytes=1 << 30)
    bystander = linear(32)
    memory.place(bystander, "unet")  # a copy no job pins: dropped to make room for the retry
    function = Flaky(1, cuda_oom)
    (latent,) = run_flaky(memory, function, tiny_model)
    assert torch.equal(latent["samples"], torch.ones(1, 4, 8, 8))
    assert latent["samples"].device.type == "cpu"
    assert len(function.seen) == 2
    assert all(unet is not tiny_model.unet and next(unet.parameters()).dtype == torch.float16
               for unet in function.seen)
    stats = memory.stats()
    assert stats.oom_retries == 1
    assert stats.entries == 1  # the UNet's copy; the bystander's went
    assert sizes(memory) == [target_bytes(tiny_model.unet, torch.float16)]
    assert_unchanged(tiny_model.unet, before)


def test_out_of_memory_twice_raises_naming_the_node(tiny_model: DiffusionModel) -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=1 << 30)
    function = Flaky(2, cuda_oom)
    with pytest.raises(DeviceOutOfMemory) as caught:
        run_flaky(memory, function, tiny_model)
    assert "FlakySampler (retried once" in str(caught.value)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert len(function.seen) == 2
    assert memory.stats().oom_retries == 1
    assert [pins for _name, _size, pins in memory.resident()] == [0]  # the job ended: nothing stays pinned


def test_a_runtime_error_saying_out_of_memory_is_retried(tiny_model: DiffusionModel) -> None:
    memory = DeviceMemory(CPU, FP16)
    function = Flaky(1, lambda: RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    run_flaky(memory, function, tiny_model)
    assert memory.stats().oom_retries == 1
    assert is_out_of_memory(cuda_oom())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(MemoryError())


def test_other_errors_are_not_retried(tiny_model: DiffusionModel) -> None:
    memory = DeviceMemory(CPU, FP16)
    function = Flaky(1, lambda: ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input"):
        run_flaky(memory, function, tiny_model)
    assert len(function.seen) == 1
    assert memory.stats().oom_retries == 0


def test_a_node_whose_activations_exceed_the_budget_fails_before_running(tiny_model: DiffusionModel) -> None:
    memory = DeviceMemory(CPU, FP16, budget_bytes=1 << 20)
    function = Flaky(0, cuda_oom)
    with pytest.raises(DeviceOutOfMemory, match="FlakySampler needs"):
        run_flaky(memory, function, tiny_model)
    assert function.seen == []
    assert memory.stats().placed == 0


def test_activation_estimates_follow_latent_size_batch_and_dtype(tiny_model: DiffusionModel) -> None:
    registry = default_registry()
    latent = {"samples": torch.zeros(2, 4, 8, 16)}
    sampler, decode = registry["KSampler"], registry["VAEDecode"]
    half, full = DeviceMemory(CPU, FP16), DeviceMemory(CPU, DtypePolicy())
    assert activation_estimate(sampler, {"model": tiny_model, "latent_image": latent}, half) == (
        2 * 128 * UNET_BYTES_PER_LATENT_PIXEL * 2)
    assert activation_estimate(sampler, {"model": tiny_model, "latent_image": latent}, full) == (
        2 * 128 * UNET_BYTES_PER_LATENT_PIXEL * 4)
    decode_bytes = 2 * 128 * VAE_DECODE_BYTES_PER_LATENT_PIXEL * 2
    assert activation_estimate(decode, {"samples": latent}, half) == decode_bytes
    assert activation_estimate(registry["CLIPTextEncode"], {"text": "a fox"}, half) == 0


@pytest.mark.parametrize(("name", "on_device"), [
    ("KSampler", True), ("VAEDecode", True), ("VAEEncode", True), ("CLIPTextEncode", True),
    ("CheckpointLoaderSimple", False), ("LoraLoader", False), ("ControlNetLoader", False),
    ("CLIPSetLastLayer", False), ("EmptyLatentImage", True),
])
def test_only_compute_nodes_run_on_the_device(name: str, on_device: bool) -> None:
    assert computes_on_device(default_registry()[name]) is on_device


@pytest.fixture(autouse=True)
def _collect() -> Iterator[None]:
    """Copies of this test's masters do not outlive it (a later test's ids may be theirs)."""
    yield
    gc.collect()
