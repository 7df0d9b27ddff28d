"""Cross-client batching on a worker (``--batch-max N``, ``--batch-wait-ms MS``).

A slot that takes a sampler request waits up to ``--batch-wait-ms`` for queued
requests of any client that can sample beside it: the same node class and
model recipe, sampler, scheduler, steps, denoise (every input but the seed,
CFG scale and conditioning), and latents of one shape and dtype. Up to
``--batch-max`` of them run together, each on its own thread with its own
noise, seed, CFG scale and conditioning, and their UNet calls meet in a
:class:`~diffsplit.engine.sampling.lockstep.LockstepGroup`: one batched
forward pass per step for all of them. Each request is still answered on its
own, as if it ran alone; results differ from an unbatched run by fp32 rounding
(see ``tests/remote/test_cross_client_batching.py`` for the measured bound).

Off by default (``--batch-max 1``): then nothing here runs and split == local
stays bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.sampling.lockstep import UNBATCHABLE_SAMPLERS, LockstepGroup, LockstepUNet
from diffsplit.engine.types import DiffusionModel
from diffsplit.transport.worker_ops import RunNode

#: Node classes whose requests may sample together (they sample a MODEL input with sample_latent).
BATCHABLE_CLASSES = frozenset({"KSampler", "KSamplerAdvanced"})
#: Inputs that may differ between requests sampled together (each keeps its own).
PER_REQUEST_INPUTS = frozenset({"seed", "noise_seed", "cfg", "positive", "negative"})
#: The most requests ``--batch-max`` may ask to sample together.
MAX_BATCH = 64


@dataclass(frozen=True)
class BatchSettings:
    """How a worker batches: at most ``max_size`` requests, waiting at most ``wait_s`` to gather them."""

    max_size: int = 1
    wait_s: float = 0.01

    def __post_init__(self) -> None:
        if not 1 <= self.max_size <= MAX_BATCH:
            raise ValueError(f"--batch-max must be in 1..{MAX_BATCH}, not {self.max_size}")
        if not 0 <= self.wait_s <= 10:
            raise ValueError(f"--batch-wait-ms must be in 0..10000, not {self.wait_s * 1000:g}")

    @property
    def enabled(self) -> bool:
        return self.max_size > 1


def batch_signature(request: RunNode) -> str | None:
    """What requests must share to sample together, from the request alone (None: it runs alone).

    The node class and every input but :data:`PER_REQUEST_INPUTS`, with tensors described by
    shape and dtype (two latents of one shape batch; their values are per request).
    """
    if request.class_type not in BATCHABLE_CLASSES or request.conditions is not None:
        return None  # a run whose conditions are probed and pruned samples alone
    sampler = request.inputs.get("sampler_name")
    if isinstance(sampler, str) and sampler in UNBATCHABLE_SAMPLERS:
        return None
    shared = {name: value for name, value in request.inputs.items() if name not in PER_REQUEST_INPUTS}
    try:
        return json.dumps({"class": request.class_type, "inputs": shared}, sort_keys=True,
                          default=_described, separators=(",", ":"))
    except (TypeError, ValueError):
        return None


def _described(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype)}
    raise TypeError(f"{type(value).__name__} does not batch")


@dataclass(frozen=True)
class Member:
    """One request's place in a batch."""

    group: LockstepGroup
    index: int


class BatchMembership:
    """Which batch this thread's request belongs to (a thread-local), and what batches ran."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.batches = 0
        self.batched_requests = 0
        self.unet_passes = 0
        self.member_calls = 0

    def current(self) -> Member | None:
        return getattr(self._local, "member", None)

    def join(self, member: Member | None) -> None:
        self._local.member = member

    def leave(self) -> None:
        """This thread's request is done with its batch; the last member to leave records the batch (before
        its reply goes out, so a client that heard back sees the batch in ``stats``)."""
        member = self.current()
        self._local.member = None
        if member is not None and member.group.leave(member.index):
            self._record(member.group)

    def _record(self, group: LockstepGroup) -> None:
        size = group.size
        stats = group.stats()
        with self._lock:
            self.batches += 1
            self.batched_requests += size
            self.unet_passes += stats.unet_calls
            self.member_calls += stats.member_calls

    def report(self, settings: BatchSettings) -> dict[str, Any]:
        """For ``stats``: the settings and what batching saved (UNet passes run vs asked for)."""
        with self._lock:
            return {"max": settings.max_size, "wait_ms": settings.wait_s * 1000, "batches": self.batches,
                    "batched_requests": self.batched_requests, "unet_passes": self.unet_passes,
                    "unet_calls_asked": self.member_calls}

    def in_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` with the MODEL's UNet seen through this thread's batch (unchanged outside one)."""
        return in_group(inputs, self.current())


def in_group(inputs: dict[str, Any], member: Member | None) -> dict[str, Any]:
    """``inputs`` with the MODEL's UNet seen through ``member``'s batch (unchanged for None)."""
    model = inputs.get("model")
    if member is None or not isinstance(model, DiffusionModel):
        return inputs
    unet = LockstepUNet(model.unet, member.group, member.index)
    return {**inputs, "model": dataclasses.replace(model, unet=unet)}
