"""Cross-client batching: N sampler runs in N threads whose UNet calls meet and run as one batch.

A :class:`LockstepGroup` of ``size`` members is a rendezvous for UNet calls.
Each run's CFGDenoiser calls a :class:`LockstepUNet` (the real UNet behind a
wrapper that knows its group and member index) exactly as it calls the UNet;
the wrapper queues the call and blocks. When every live member has a call
queued (a *round*), one of the waiting members concatenates the calls that can
share a forward pass along the batch dimension, runs the real UNet once per such
sub-batch, splits the outputs back by each member's batch size, and wakes the
others. Each run keeps its own noise, seed, CFG scale, conditioning and sampler
state: only the forward passes are shared.

Sharing is decided per call, never assumed: calls go into one sub-batch only when
they are to the same UNet with the same keyword names, the same positional
count, per-sample tensors (``sample``, ``timestep``, ``encoder_hidden_states``,
``added_cond_kwargs`` values, ControlNet residuals, ...) of equal shapes past
the batch dimension, dtypes and devices, and equal plain values elsewhere
(``return_dict``, ``cross_attention_kwargs``). Anything else (another context
length, a tensor where a plain value is expected, an unknown positional
argument) runs alone in that round, with its arguments untouched, so a member
that never shares gets the same numbers as a run without the group. A call that
needs its own thread (autograd on, ``torch.func`` transforms, the
``continuous_time`` switch of GENIE, autocast) bypasses the group and calls the
UNet directly.

A member that finishes, fails, or is cancelled (its progress callback raising)
calls :meth:`LockstepGroup.leave`, and the rounds go on without it. An exception
in a shared forward pass is raised in every member of that sub-batch (the same
instance, as ``concurrent.futures`` does). Waits sleep on a condition variable;
with ``gather_timeout`` a member that has not called for that long, while the
others wait, is no longer waited for (the round runs without it) until it calls
again, so a stalled run delays the others by at most that much. Rounds run one
at a time (a bypassing call may overlap one, as concurrent jobs' calls do).

:func:`sample_batched` runs KSampler jobs (:class:`SampleRequest`, the arguments of
:func:`~diffsplit.engine.sampling.ksampler.sample_latent`) together in one group
and returns one :class:`SampleOutcome` per job. :func:`batch_key` is what jobs
must share to step in lockstep (same model object, sampler, scheduler, steps,
denoise, window, latent shape and dtype); jobs with different keys still give
correct results together, they just share fewer passes.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.sampling.continuous_time import is_continuous
from diffsplit.engine.sampling.denoiser import CFGDenoiser
from diffsplit.engine.sampling.ksampler import ProgressFn, ksampler_sigmas, sample_with_sigmas, slice_sigmas
from diffsplit.engine.sampling.samplers import DenoiseFn, get_sampler
from diffsplit.engine.types import DiffusionModel
from diffsplit.engine.value_walk import iter_values
from diffsplit.transport.compute_threads import intra_op_threads

#: Seconds the waiting members give a member that has not called before running a round without it.
DEFAULT_GATHER_TIMEOUT = 60.0
#: Samplers that differentiate the denoiser (``torch.func.jvp`` under the process-wide ``sdpa_kernel``
#: switch): they cannot share calls, and runs of them beside other threads do not match runs alone.
UNBATCHABLE_SAMPLERS: frozenset[str] = frozenset({"genie", "genie_head"})

#: UNet2DConditionModel.forward's leading positional parameters.
_POSITIONAL = ("sample", "timestep", "encoder_hidden_states")
#: Arguments whose tensors have one row per sample (concatenated along dim 0 when shared).
_PER_SAMPLE = frozenset({
    "sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
    "added_cond_kwargs", "down_block_additional_residuals", "mid_block_additional_residual",
    "down_intrablock_additional_residuals", "encoder_attention_mask",
})
_PLAIN = (type(None), bool, int, float, str)


class LockstepError(RuntimeError):
    """A group was used wrongly (a member calling after it left) or an output could not be split."""


@dataclass(frozen=True)
class LockstepStats:
    """What a group did: rounds run, real UNet forward passes, and the calls members made."""

    rounds: int
    #: forward passes of the real UNet made by the group (shared, alone in a round, or bypassing)
    unet_calls: int
    #: UNet calls the members made (what the passes would have been without the group)
    member_calls: int
    #: calls that bypassed the group (autograd, torch.func, continuous time, autocast)
    bypassed_calls: int
    #: the most members one forward pass served
    largest_share: int


class _Unshareable(Exception):
    """Internal: a call that must run alone."""


@dataclass(frozen=True)
class _Shape:
    """A call's structure: positional count and, per argument name, the spec of its value."""

    inner_id: int
    positional: int
    specs: tuple[tuple[str, Hashable], ...]


@dataclass(eq=False)
class _Call:
    index: int
    inner: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    key: Hashable
    batch: int = 0
    leaves: tuple[torch.Tensor, ...] = ()
    done: bool = False
    result: Any = None
    error: BaseException | None = None


def _per_sample_spec(
    value: Any, batch: int, leaves: list[torch.Tensor], *, timestep: bool = False
) -> Hashable:
    if isinstance(value, torch.Tensor):
        if timestep and (value.ndim == 0 or (value.ndim == 1 and value.shape[0] == 1)):
            value = value.reshape(1).expand(batch)  # what the UNet does with one timestep for the batch
        if value.ndim == 0 or value.shape[0] != batch:
            raise _Unshareable
        leaves.append(value)
        return ("tensor", tuple(value.shape[1:]), value.dtype, value.device)
    if isinstance(value, tuple | list) and type(value) in (tuple, list):
        return (type(value).__name__, tuple(_per_sample_spec(item, batch, leaves) for item in value))
    if type(value) is dict:
        return ("dict", tuple((key, _per_sample_spec(item, batch, leaves)) for key, item in value.items()))
    return _plain_spec(value)


def _plain_spec(value: Any) -> Hashable:
    if type(value) in _PLAIN:
        if isinstance(value, float) and math.isnan(value):
            raise _Unshareable
        return ("value", type(value).__name__, value)
    if type(value) in (tuple, list):
        return (type(value).__name__, tuple(_plain_spec(item) for item in value))
    if type(value) is dict and all(isinstance(key, str) for key in value):
        return ("dict", tuple((key, _plain_spec(item)) for key, item in value.items()))
    raise _Unshareable


def _rebuild(spec: Hashable, leaves: Any) -> Any:
    assert isinstance(spec, tuple)
    kind = spec[0]
    if kind == "tensor":
        return next(leaves)
    if kind == "value":
        return spec[2]
    if kind == "dict":
        return {key: _rebuild(item, leaves) for key, item in spec[1]}
    items = [_rebuild(item, leaves) for item in spec[1]]
    return tuple(items) if kind == "tuple" else items


def _named(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    if len(args) > len(_POSITIONAL) or any(name in kwargs for name in _POSITIONAL[: len(args)]):
        raise _Unshareable
    return {**dict(zip(_POSITIONAL, args, strict=False)), **kwargs}


def _shape_of(
    inner: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[_Shape, int, list[torch.Tensor]]:
    """The call's sharing key, its batch size and its per-sample tensors in key order."""
    named = _named(args, kwargs)
    sample = named.get("sample")
    if not isinstance(sample, torch.Tensor) or sample.ndim == 0:
        raise _Unshareable
    batch = int(sample.shape[0])
    leaves: list[torch.Tensor] = []
    specs = []
    for name in sorted(named):
        value = named[name]
        if name in _PER_SAMPLE:
            spec = _per_sample_spec(value, batch, leaves, timestep=name == "timestep")
        else:
            spec = _plain_spec(value)
        specs.append((name, spec))
    return _Shape(inner_id=id(inner), positional=len(args), specs=tuple(specs)), batch, leaves


def _needs_own_thread(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether the call depends on this thread's autograd/functorch/autocast state (so it cannot move)."""
    if torch.is_grad_enabled() or is_continuous():
        return True
    tensors = [item for item in iter_values((args, kwargs)) if isinstance(item, torch.Tensor)]
    if any(t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return True
    device_types = {t.device.type for t in tensors} or {"cpu"}
    return any(torch.is_autocast_enabled(device_type) for device_type in device_types)


def _split_output(output: Any, sizes: Sequence[int]) -> list[Any]:
    total = sum(sizes)
    if isinstance(output, torch.Tensor):
        if output.ndim == 0 or output.shape[0] != total:
            raise LockstepError(f"cannot split a UNet output of shape {tuple(output.shape)} into {sizes}")
        return list(torch.split(output, list(sizes)))
    if isinstance(output, tuple | list) and type(output) in (tuple, list):
        parts = [_split_output(item, sizes) for item in output]
        return [type(output)(part[i] for part in parts) for i in range(len(sizes))]
    if isinstance(output, Mapping) and all(isinstance(key, str) for key in output):
        per_key = {key: _split_output(item, sizes) for key, item in output.items()}
        return [type(output)(**{key: value[i] for key, value in per_key.items()}) for i in range(len(sizes))]
    if type(output) in _PLAIN:
        return [output] * len(sizes)
    raise LockstepError(f"cannot split a UNet output of type {type(output).__name__} between members")


def _run_shared(calls: Sequence[_Call]) -> None:
    """One forward pass for ``calls`` (same key); fills each call's result or error."""
    try:
        first = calls[0]
        if len(calls) == 1:
            outputs = [first.inner(*first.args, **first.kwargs)]
        else:
            assert isinstance(first.key, _Shape)
            joined = iter([torch.cat(parts) for parts in zip(*(c.leaves for c in calls), strict=True)])
            named = {name: _rebuild(spec, joined) for name, spec in first.key.specs}
            args = tuple(named.pop(name) for name in _POSITIONAL[: first.key.positional])
            outputs = _split_output(first.inner(*args, **named), [c.batch for c in calls])
    except Exception as error:  # every member of this pass gets the pass's exception
        for call in calls:
            call.error = error
        return
    for call, output in zip(calls, outputs, strict=True):
        call.result = output


def _run_groups(groups: Iterable[list[_Call]], threads: int | None = None) -> None:
    """The forward passes of one round: one per group of calls that share a key."""
    with torch.no_grad(), intra_op_threads(threads):
        for members in groups:
            _run_shared(members)


class LockstepGroup:
    """The rendezvous of ``size`` members' UNet calls (members are ``0 .. size-1``, all live at first).

    Use one group per batch of runs: a member that left cannot come back.
    """

    def __init__(self, size: int, *, gather_timeout: float | None = DEFAULT_GATHER_TIMEOUT,
                 pass_threads: int | None = None) -> None:
        """``pass_threads``: run the shared forward passes on one thread of the group's own with that
        many intra-op CPU threads (None: on the member thread that completes each round, as it is).
        Members can then sample with one thread each: one OpenMP team does the heavy work, rather
        than one team per member thread, whose idle workers spin against each other."""
        if size < 1:
            raise ValueError(f"a lockstep group needs at least one member, got {size}")
        if gather_timeout is not None and gather_timeout <= 0:
            raise ValueError(f"gather_timeout must be positive or None, got {gather_timeout}")
        self.size = size
        self.gather_timeout = gather_timeout
        self.pass_threads = pass_threads
        self._pass_thread: ThreadPoolExecutor | None = None
        self._cond = threading.Condition(threading.Lock())
        self._live = set(range(size))
        self._detached: set[int] = set()  # live members not waited for (stalled past gather_timeout)
        self._queued: dict[int, _Call] = {}
        self._running = False
        self._last_event = time.monotonic()
        self._rounds = 0
        self._unet_calls = 0
        self._member_calls = 0
        self._bypassed = 0
        self._largest = 0

    def stats(self) -> LockstepStats:
        """The counters so far."""
        with self._cond:
            return LockstepStats(rounds=self._rounds, unet_calls=self._unet_calls,
                                 member_calls=self._member_calls, bypassed_calls=self._bypassed,
                                 largest_share=self._largest)

    def live_members(self) -> frozenset[int]:
        """The members that have not left."""
        with self._cond:
            return frozenset(self._live)

    def leave(self, index: int) -> bool:
        """Member ``index`` makes no more calls (finished, failed or cancelled); idempotent.

        Returns whether this call was the one that left the group without members.
        """
        with self._cond:
            was_live = index in self._live
            self._live.discard(index)
            self._detached.discard(index)
            self._queued.pop(index, None)
            self._event()
            if not self._live and self._pass_thread is not None:
                self._pass_thread.shutdown(wait=False)  # no round can come any more
                self._pass_thread = None
            return was_live and not self._live

    def _passes(self) -> ThreadPoolExecutor:
        """The group's pass thread (made at the first round that needs it)."""
        with self._cond:
            if self._pass_thread is None:
                self._pass_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffsplit-lockstep")
            return self._pass_thread

    def call(self, index: int, inner: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``inner(*args, **kwargs)`` for member ``index``, in one pass with others' calls where it can."""
        if _needs_own_thread(args, kwargs):
            with self._cond:
                self._check_live(index)
                self._bypassed += 1
                self._member_calls += 1
                self._unet_calls += 1
            return inner(*args, **kwargs)
        try:
            shape, batch, leaves = _shape_of(inner, args, kwargs)
            slot = _Call(index, inner, args, kwargs, key=shape, batch=batch, leaves=tuple(leaves))
        except _Unshareable:
            slot = _Call(index, inner, args, kwargs, key=("alone", index))
        with self._cond:
            self._check_live(index)
            self._detached.discard(index)
            self._queued[index] = slot
            self._member_calls += 1
            self._event()
            try:
                self._wait_for(slot)
            except BaseException:
                self._queued.pop(index, None)
                raise
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _check_live(self, index: int) -> None:
        if index not in self._live:
            raise LockstepError(f"member {index} left its lockstep group (or is not one of its {self.size})")

    def _event(self) -> None:
        self._last_event = time.monotonic()
        self._cond.notify_all()

    def _wait_for(self, slot: _Call) -> None:
        """Wait (holding the condition) until ``slot`` is done, running rounds that become ready."""
        while not slot.done:
            taken = self._take_round()
            if taken:
                self._run_round(taken)
                continue
            timeout = None
            if not self._running and self.gather_timeout is not None:
                timeout = max(0.0, self._last_event + self.gather_timeout - time.monotonic())
            self._cond.wait(timeout)

    def _take_round(self) -> list[_Call]:
        if self._running or not self._queued:
            return []
        awaited = self._live - self._detached
        if not awaited <= self._queued.keys():
            stalled = time.monotonic() - self._last_event
            if self.gather_timeout is None or stalled < self.gather_timeout:
                return []
            self._detached |= awaited - self._queued.keys()
        taken = [self._queued[i] for i in sorted(self._queued)]
        self._queued.clear()
        self._running = True
        return taken

    def _run_round(self, calls: list[_Call]) -> None:
        """Run a taken round outside the lock (called and returning with it held)."""
        groups: dict[Hashable, list[_Call]] = {}
        for call in calls:
            groups.setdefault(call.key, []).append(call)
        self._cond.release()
        try:
            if self.pass_threads is None:
                _run_groups(groups.values())
            else:
                self._passes().submit(_run_groups, list(groups.values()), self.pass_threads).result()
        finally:
            self._cond.acquire()
            for call in calls:
                if call.result is None and call.error is None:
                    call.error = LockstepError("the round was interrupted before this call ran")
                call.done = True
            self._running = False
            self._rounds += 1
            self._unet_calls += len(groups)
            self._largest = max([self._largest, *(len(m) for m in groups.values())])
            self._event()


class LockstepUNet(torch.nn.Module):
    """Member ``index``'s view of ``unet``: calls go through ``group``; attributes are the UNet's."""

    def __init__(self, unet: torch.nn.Module, group: LockstepGroup, index: int) -> None:
        super().__init__()
        self.unet = unet
        self.group = group
        self.index = index

    @property
    def dtype(self) -> torch.dtype:
        """The real UNet's dtype (the denoiser casts its inputs to it)."""
        inner: Any = self.unet
        return inner.dtype  # type: ignore[no-any-return]

    @property
    def device(self) -> torch.device:
        """The real UNet's device."""
        inner: Any = self.unet
        return inner.device  # type: ignore[no-any-return]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The UNet's output for this member's call, computed in a pass shared with other members."""
        return self.group.call(self.index, self.unet, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "unet" not in modules:
                raise
            return getattr(modules["unet"], name)


@dataclass(frozen=True, eq=False)
class SampleRequest:
    """One KSampler job: the arguments of :func:`~diffsplit.engine.sampling.ksampler.sample_latent`."""

    model: DiffusionModel
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    positive: Sequence[Sequence[Any]]
    negative: Sequence[Sequence[Any]]
    latent: Mapping[str, Any]
    denoise: float = 1.0
    add_noise: bool = True
    start_step: int | None = None
    last_step: int | None = None
    force_full_denoise: bool = False
    #: ``progress(step, total)`` after each step, on the job's thread; raising cancels the job alone
    progress: ProgressFn | None = None


@dataclass(frozen=True)
class BatchKey:
    """What jobs share to step in lockstep; ``model`` compares by identity (the same MODEL object)."""

    model: DiffusionModel
    sampler_name: str
    scheduler: str
    steps: int
    denoise: float
    start_step: int | None
    last_step: int | None
    force_full_denoise: bool
    latent_shape: tuple[int, ...]
    latent_dtype: torch.dtype


@dataclass(frozen=True)
class SampleOutcome:
    """A job's result: the sampled LATENT, or the exception that ended it."""

    latent: dict[str, Any] | None = None
    error: BaseException | None = None

    def result(self) -> dict[str, Any]:
        """The LATENT, or raise the job's exception."""
        if self.error is not None:
            raise self.error
        assert self.latent is not None
        return self.latent


def batch_key(request: SampleRequest) -> BatchKey | None:
    """The key jobs must share to run as one batch, or None for a job that should run alone.

    None: a sampler that differentiates the denoiser (GENIE), an unknown sampler
    name (the job's own run reports it), or a LATENT without a ``samples`` tensor.
    """
    samples = request.latent.get("samples")
    if not isinstance(samples, torch.Tensor) or request.sampler_name in UNBATCHABLE_SAMPLERS:
        return None
    try:
        get_sampler(request.sampler_name)
    except ValueError:
        return None
    return BatchKey(
        model=request.model, sampler_name=request.sampler_name, scheduler=request.scheduler,
        steps=int(request.steps), denoise=float(request.denoise), start_step=request.start_step,
        last_step=request.last_step, force_full_denoise=bool(request.force_full_denoise),
        latent_shape=tuple(samples.shape), latent_dtype=samples.dtype,
    )


def sample_in_group(request: SampleRequest, group: LockstepGroup, index: int) -> dict[str, Any]:
    """``sample_latent`` for ``request`` as member ``index`` of ``group`` (the caller leaves the group after).

    Conditioning is resolved against the real MODEL; only the denoiser's UNet calls go through the group.
    """
    sampler = get_sampler(request.sampler_name)
    model = request.model
    sigmas = ksampler_sigmas(model.sampling, request.scheduler, sampler, request.steps, request.denoise)
    sigmas = slice_sigmas(sigmas, request.start_step, request.last_step, request.force_full_denoise)
    shared = dataclasses.replace(model, unet=LockstepUNet(model.unet, group, index))

    def build(latent_shape: tuple[int, ...], seed: int) -> DenoiseFn:
        own = CFGDenoiser.build(
            model, request.positive, request.negative, request.cfg, latent_shape, seed=seed
        )
        return dataclasses.replace(own, model=shared)

    output, _ = sample_with_sigmas(
        model, sigmas, sampler, seed=request.seed, add_noise=request.add_noise, cfg=request.cfg,
        positive=request.positive, negative=request.negative, latent=request.latent,
        progress=request.progress, denoiser=build,
    )
    return output


def sample_batched(
    requests: Sequence[SampleRequest], *, group: LockstepGroup | None = None
) -> list[SampleOutcome]:
    """Run ``requests`` together, one thread each, their UNet calls shared; one outcome per request, in order.

    ``group`` (fresh, of ``len(requests)`` members) lets the caller set the gather
    timeout and read :meth:`LockstepGroup.stats` afterwards. A job that fails or
    is cancelled leaves the group; the others finish. Threads are named
    ``diffsplit-lockstep-<i>`` and have all ended when this returns.

    Raises ValueError for a GENIE job (:data:`UNBATCHABLE_SAMPLERS`): its JVP switches
    torch's attention kernels process-wide (``sdpa_kernel``), so it must not run
    beside other threads.
    """
    if not requests:
        return []
    refused = sorted({r.sampler_name for r in requests} & UNBATCHABLE_SAMPLERS)
    if refused:
        raise ValueError(f"sampler(s) {', '.join(refused)} cannot run in lockstep (they differentiate the "
                         "denoiser under thread-global settings); sample such jobs alone")
    if group is None:
        group = LockstepGroup(len(requests))
    if group.size != len(requests) or group.live_members() != frozenset(range(group.size)):
        raise ValueError(f"sample_batched needs a fresh group of {len(requests)} members")
    outcomes: list[SampleOutcome | None] = [None] * len(requests)

    def member(index: int) -> None:
        try:
            outcomes[index] = SampleOutcome(latent=sample_in_group(requests[index], group, index))
        except Exception as error:  # the job's own failure or cancellation: reported, the others go on
            outcomes[index] = SampleOutcome(error=error)
        finally:
            group.leave(index)

    threads: list[threading.Thread] = []
    for index in range(len(requests)):
        name = f"diffsplit-lockstep-{index}"
        thread = threading.Thread(target=member, args=(index,), name=name, daemon=True)
        try:
            thread.start()
        except RuntimeError as error:  # no thread to run it: it leaves at once
            outcomes[index] = SampleOutcome(error=error)
            group.leave(index)
            continue
        threads.append(thread)
    for thread in threads:
        thread.join()
    missing = LockstepError("the job's thread ended without a result")
    return [outcome if outcome is not None else SampleOutcome(error=missing) for outcome in outcomes]


__all__: tuple[str, ...] = (
    "DEFAULT_GATHER_TIMEOUT", "BatchKey", "LockstepError", "LockstepGroup", "LockstepStats", "LockstepUNet",
    "SampleOutcome", "SampleRequest", "batch_key", "sample_batched", "sample_in_group",
)
