"""Cross-client batching (engine/sampling/lockstep.py) on the tiny seeded SD 1.5 checkpoint.

Jobs sampled together must match each job sampled alone by ``sample_latent``,
while the real UNet runs one forward pass per round instead of one per job.
Passes are counted by a forward pre-hook on the real UNet (the test's own
instrument, removed after each test), which also records each pass's batch size.

Tolerance: one shared pass differs from the job's own pass by fp32 rounding only
(measured on this UNet: about 2.6e-6 on epsilons of magnitude ~2, batch 5 vs 2);
the sampler turns epsilon into ``x - sigma * eps`` with sigma up to 14.6 and CFG
up to 7, which amplifies it about 100x. Measured max abs difference of the final
latents, over the samplers below: up to 2.0e-4 on one thread (3e-4 on two); the bound is ``ATOL = 1e-3``.
Calls that run alone in their round (another context length, a batch of one)
get the job's own arguments and must match bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.models.checkpoint import load_checkpoint, load_controlnet
from diffsplit.engine.nodes.conditioning import clip_text_encode
from diffsplit.engine.nodes.controlnet import controlnet_apply
from diffsplit.engine.sampling.ksampler import sample_latent
from diffsplit.engine.sampling.lockstep import (
    LockstepError,
    LockstepGroup,
    LockstepUNet,
    SampleRequest,
    batch_key,
    sample_batched,
)
from diffsplit.engine.types import DiffusionModel

ATOL = 1e-3
STEPS = 4
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m")
#: cfg 1 skips the negative pass (a batch of 1 beside batches of 2): still one shared pass
CFGS = (4.0, 7.0, 1.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(models_dir: Path) -> DiffusionModel:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").model


@dataclass
class Passes:
    """Batch sizes of the real UNet's forward passes; ``fail_at`` makes that pass raise (0-based)."""

    sizes: list[int] = field(default_factory=list)
    fail_at: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        with self.lock:
            number = len(self.sizes)
            self.sizes.append(int(sample.shape[0]))
        if number == self.fail_at:
            raise RuntimeError("the UNet failed on this pass")

    def take(self) -> list[int]:
        with self.lock:
            sizes, self.sizes = self.sizes, []
        return sizes


@pytest.fixture
def passes(model: DiffusionModel) -> Iterator[Passes]:
    counter = Passes()
    handle = model.unet.register_forward_pre_hook(counter, with_kwargs=True)
    yield counter
    handle.remove()


def _cond(model: DiffusionModel, seed: int, tokens: int = 77) -> list[list[Any]]:
    width = model.unet.config.cross_attention_dim
    return [[torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(seed)), {}]]


def _requests(model: DiffusionModel, sampler: str, count: int = 3, **overrides: Any) -> list[SampleRequest]:
    requests = []
    for i in range(count):
        arguments: dict[str, Any] = {
            "model": model, "seed": 1000 + 17 * i, "steps": STEPS, "cfg": CFGS[i % len(CFGS)],
            "sampler_name": sampler, "scheduler": "normal", "positive": _cond(model, 10 + i),
            "negative": _cond(model, 20 + i), "latent": {"samples": torch.zeros(1, 4, 8, 8)},
        }
        arguments.update(overrides)
        requests.append(SampleRequest(**arguments))
    return requests


def _alone(request: SampleRequest) -> torch.Tensor:
    return sample_latent(
        request.model, seed=request.seed, steps=request.steps, cfg=request.cfg,
        sampler_name=request.sampler_name, scheduler=request.scheduler, positive=request.positive,
        negative=request.negative, latent=request.latent, denoise=request.denoise,
    )["samples"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _pass_sizes(request: SampleRequest) -> int:
    return 1 if request.cfg == 1.0 else 2


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_jobs_sampled_together_match_each_alone_with_one_pass_per_step(
    model: DiffusionModel, passes: Passes, sampler: str, record_property: pytest.RecordProperty
) -> None:
    requests = _requests(model, sampler)
    alone = [_alone(r) for r in requests]
    assert passes.take() == [_pass_sizes(r) for r in requests for _ in range(STEPS)]
    assert not torch.allclose(alone[0], alone[1]) and not torch.allclose(alone[1], alone[2])

    group = LockstepGroup(len(requests))
    outcomes = sample_batched(requests, group=group)

    shared = sum(_pass_sizes(r) for r in requests)
    assert passes.take() == [shared] * STEPS  # STEPS passes for 3 jobs, not 3 * STEPS
    diffs = [_max_diff(o.result()["samples"], a) for o, a in zip(outcomes, alone, strict=True)]
    record_property("max_abs_diff", max(diffs))
    print(f"\n{sampler}: batched vs alone, max abs difference per job {[f'{d:.2e}' for d in diffs]}")
    assert max(diffs) < ATOL
    stats = group.stats()
    assert (stats.rounds, stats.unet_calls, stats.member_calls, stats.largest_share) == (STEPS, STEPS, 12, 3)
    assert all(o.result()["samples"].shape == (1, 4, 8, 8) for o in outcomes)


def test_a_batch_of_one_is_the_unbatched_result_bit_for_bit(model: DiffusionModel, passes: Passes) -> None:
    for sampler in SAMPLERS:
        (request,) = _requests(model, sampler, count=1)
        (outcome,) = sample_batched([request])
        assert torch.equal(outcome.result()["samples"], _alone(request))
    assert passes.take() == [2] * (2 * STEPS * len(SAMPLERS))


def test_a_job_with_another_context_length_runs_alone_in_each_round_and_stays_exact(
    model: DiffusionModel, passes: Passes
) -> None:
    requests = _requests(model, "euler_ancestral", cfg=5.0)
    requests[2] = replace(
        requests[2], positive=_cond(model, 99, tokens=154), negative=_cond(model, 98, tokens=154)
    )
    alone = [_alone(r) for r in requests]
    passes.take()

    outcomes = sample_batched(requests)

    assert passes.take() == [4, 2] * STEPS  # each round: the 77-token jobs together, the 154-token one alone
    assert max(_max_diff(outcomes[i].result()["samples"], alone[i]) for i in (0, 1)) < ATOL
    assert torch.equal(outcomes[2].result()["samples"], alone[2])


class _Node:
    node_id = "1"


def test_sdxl_embeddings_and_controlnet_residuals_are_shared(models_dir: Path) -> None:
    """SDXL's ``added_cond_kwargs`` and ControlNet's residual tuples concatenate per member too."""
    sdxl = load_checkpoint(models_dir / "checkpoints" / "tiny-sdxl.safetensors")
    sd15 = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    controlnet = load_controlnet(models_dir / "controlnet" / "tiny-sd15-controlnet.safetensors")
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))

    def prompt(parts: Any, text: str) -> list[list[Any]]:
        return clip_text_encode(_Node(), text=text, clip=parts.clip)[0]

    def controlled(text: str) -> list[list[Any]]:
        return controlnet_apply(_Node(), conditioning=prompt(sd15, text), control_net=controlnet, image=hint,
                                strength=0.8)[0]

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    cases = {
        "sdxl": [SampleRequest(model=sdxl.model, seed=i, steps=3, cfg=5.0 + i, sampler_name="dpmpp_2m",
                               scheduler="karras", positive=prompt(sdxl, f"a cat, {i}"),
                               negative=prompt(sdxl, "blurry"), latent=latent) for i in range(3)],
        "controlnet": [SampleRequest(model=sd15.model, seed=i, steps=3, cfg=5.0, sampler_name="euler",
                                     scheduler="normal", positive=controlled(f"a dog, {i}"),
                                     negative=prompt(sd15, "blurry"), latent=latent) for i in range(3)],
    }
    for name, requests in cases.items():
        alone = [_alone(r) for r in requests]
        group = LockstepGroup(3)
        outcomes = sample_batched(requests, group=group)
        diffs = [_max_diff(o.result()["samples"], a) for o, a in zip(outcomes, alone, strict=True)]
        print(f"\n{name}: batched vs alone, max abs difference per job {[f'{d:.2e}' for d in diffs]}")
        assert max(diffs) < ATOL
        assert (group.stats().unet_calls, group.stats().largest_share) == (3, 3)


class Cancelled(Exception):
    pass


def test_a_cancelled_job_leaves_and_the_others_finish(model: DiffusionModel, passes: Passes) -> None:
    def cancel_after_two(step: int, total: int) -> None:
        if step == 2:
            raise Cancelled(f"cancelled at step {step} of {total}")

    requests = _requests(model, "dpmpp_2m")
    requests[1] = replace(requests[1], progress=cancel_after_two)
    alone = {i: _alone(requests[i]) for i in (0, 2)}
    passes.take()

    outcomes = sample_batched(requests)

    assert isinstance(outcomes[1].error, Cancelled) and outcomes[1].latent is None
    with pytest.raises(Cancelled):
        outcomes[1].result()
    for i in (0, 2):
        assert _max_diff(outcomes[i].result()["samples"], alone[i]) < ATOL
    assert passes.take() == [5, 5, 3, 3]  # three jobs for two steps, then two


def test_jobs_of_different_lengths_share_passes_until_the_shorter_ends(
    model: DiffusionModel, passes: Passes
) -> None:
    requests = _requests(model, "euler")
    requests[0] = replace(requests[0], steps=2)
    alone = [_alone(r) for r in requests]
    passes.take()

    outcomes = sample_batched(requests)

    assert passes.take() == [5, 5, 3, 3]
    assert max(_max_diff(o.result()["samples"], a) for o, a in zip(outcomes, alone, strict=True)) < ATOL


def test_an_error_in_a_shared_pass_is_raised_in_every_job_of_that_pass(
    model: DiffusionModel, passes: Passes
) -> None:
    passes.fail_at = 1  # the second shared pass raises
    outcomes = sample_batched(_requests(model, "euler"))
    errors = [o.error for o in outcomes]
    assert all(isinstance(e, RuntimeError) and "failed on this pass" in str(e) for e in errors)
    assert errors[0] is errors[1] is errors[2]
    assert passes.take() == [5, 5]


def test_a_stalled_job_is_not_waited_for_past_the_gather_timeout(
    model: DiffusionModel, passes: Passes
) -> None:
    """Job 0 stalls in its progress callback until job 1 has finished: without the timeout, a deadlock."""
    finished = threading.Event()
    waited: list[bool] = []

    def stall(step: int, total: int) -> None:
        if step == 1:
            waited.append(finished.wait(timeout=60))  # True: job 1 finished while job 0 stood still

    def finish(step: int, total: int) -> None:
        if step == total:
            finished.set()

    requests = _requests(model, "euler")
    requests[0] = replace(requests[0], progress=stall)
    requests[1] = replace(requests[1], progress=finish)
    alone = [_alone(r) for r in requests]
    passes.take()

    group = LockstepGroup(3, gather_timeout=0.2)
    outcomes = sample_batched(requests, group=group)

    assert waited == [True]
    assert max(_max_diff(o.result()["samples"], a) for o, a in zip(outcomes, alone, strict=True)) < ATOL
    sizes = passes.take()
    assert sizes[0] == 5 and sum(sizes) == sum(_pass_sizes(r) for r in requests) * STEPS
    assert group.stats().rounds > STEPS  # job 0's later steps ran in rounds of their own


def test_the_wrapper_is_the_unet_to_its_readers_and_bypasses_the_group_under_autograd(
    model: DiffusionModel, passes: Passes
) -> None:
    group = LockstepGroup(2)
    view = LockstepUNet(model.unet, group, 0)
    assert view.config is model.unet.config and view.dtype == model.unet.dtype
    assert next(view.parameters()) is next(model.unet.parameters())
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([500])
    context = _cond(model, 1)[0][0]
    with torch.enable_grad():  # would wait for member 1 forever if it went through the group
        (output,) = view(x, timestep, encoder_hidden_states=context, return_dict=False)
    with torch.no_grad():
        (direct,) = model.unet(x, timestep, encoder_hidden_states=context, return_dict=False)
    assert torch.equal(output.detach(), direct)
    assert group.stats().bypassed_calls == 1 and passes.take() == [1, 1]
    group.leave(1)
    with torch.no_grad():  # member 1 left: member 0 is its own round now
        (alone,) = view(x, timestep, encoder_hidden_states=context, return_dict=False)
    assert torch.equal(alone, direct)
    group.leave(0)
    with pytest.raises(LockstepError), torch.no_grad():
        view(x, timestep, encoder_hidden_states=context, return_dict=False)


def test_batch_key_groups_jobs_that_can_step_together(model: DiffusionModel) -> None:
    first, second, _ = _requests(model, "euler")
    assert batch_key(first) == batch_key(second) is not None  # seeds, cfg and prompts may differ
    different = [
        replace(first, model=replace(model)),  # another MODEL object, even around the same UNet
        replace(first, sampler_name="dpmpp_2m"),
        replace(first, scheduler="karras"), replace(first, steps=5), replace(first, denoise=0.5),
        replace(first, latent={"samples": torch.zeros(1, 4, 16, 8)}),
        replace(first, latent={"samples": torch.zeros(2, 4, 8, 8)}),
        replace(first, latent={"samples": torch.zeros(1, 4, 8, 8, dtype=torch.float16)}),
    ]
    assert all(batch_key(r) != batch_key(first) for r in different)
    assert batch_key(replace(first, sampler_name="genie")) is None
    assert batch_key(replace(first, sampler_name="no_such_sampler")) is None
    with pytest.raises(ValueError, match="genie"):
        sample_batched([first, replace(second, sampler_name="genie")])
