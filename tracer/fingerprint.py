"""Cheap weight fingerprints, and snapshots that reveal weights changed in place.

A fingerprint is a sha256 over, for every tensor of an object sorted by path,
its dtype, shape and a fixed strided sample of its elements (their exact bit
patterns), plus the object's type and scheduler configs. Two objects built the
same way have the same fingerprint on any machine; one with edited weights
almost surely does not. Computing it reads ``SAMPLES_PER_TENSOR`` elements per
tensor, never the whole weights.

A :class:`WeightSnapshot` remembers, after each known loader or mutator call,
which tensor object sits at each path and its autograd version counter
(``tensor._version``, bumped by every in-place operation such as
``weight.add_(1)``). Comparing it with the object later names any tensor that
was edited, replaced, added or removed outside the known calls.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.tracer.objects import config_of, named_tensors, parts
from diffsplit.tracer.recipe import join_path, split_path

SAMPLES_PER_TENSOR = 16
#: How many changed tensors a refusal names before summarizing the rest.
_LISTED_CHANGES = 3


def sample_positions(count: int) -> range:
    """The flat positions a fingerprint samples in a tensor of ``count`` elements."""
    if count == 0:
        return range(0)
    return range(0, count, max(1, count // SAMPLES_PER_TENSOR))[:SAMPLES_PER_TENSOR]


@dataclass(frozen=True, eq=False)
class SampledTensor:
    """A tensor known by its dtype, shape and the elements at :func:`sample_positions` only
    (read from a file without reading the rest)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    sample: torch.Tensor

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def tensor_sample(tensor: torch.Tensor | SampledTensor, as_dtype: torch.dtype | None = None) -> bytes:
    """The raw bytes of ``SAMPLES_PER_TENSOR`` evenly strided elements of ``tensor`` (on the CPU),
    floating ones converted to ``as_dtype`` first when given."""
    if isinstance(tensor, SampledTensor):
        sample = tensor.sample.contiguous()
    elif tensor.is_meta or tensor.layout != torch.strided or tensor.is_quantized:
        return b""
    else:
        flat = tensor.detach()
        flat = flat.reshape(-1) if flat.is_contiguous() else flat.contiguous().reshape(-1)
        positions = sample_positions(flat.numel())
        if not positions:
            return b""
        sample = flat[:: positions.step][: len(positions)].cpu().contiguous()
    if as_dtype is not None and sample.is_floating_point():
        sample = sample.to(as_dtype)
    return sample.view(torch.uint8).numpy().tobytes()


def tensor_line(path: str, tensor: torch.Tensor | SampledTensor, as_dtype: torch.dtype | None = None) -> str:
    """One fingerprint line: path, dtype, shape and the sample's hash (floating ones as ``as_dtype``)."""
    sample = hashlib.sha256(tensor_sample(tensor, as_dtype)).hexdigest()[:32]
    shown = as_dtype if as_dtype is not None and tensor.is_floating_point() else tensor.dtype
    dtype = str(shown).removeprefix("torch.")
    return f"{path}|{dtype}|{tuple(tensor.shape)}|{sample}"


def _config_line(path: str, config: Mapping[str, Any]) -> str:
    public = {key: value for key, value in config.items() if not str(key).startswith("_")}
    return f"{path}|config|{json.dumps(public, sort_keys=True, default=repr)}"


def fingerprint_of_tensors(
    type_name: str, tensors: Iterable[tuple[str, torch.Tensor | SampledTensor]], configs: Iterable[str],
    as_dtype: torch.dtype | None = None,
) -> str:
    """The fingerprint of an object given its type name, tensors and config lines."""
    lines = [f"type|{type_name}", *sorted(configs),
             *sorted(tensor_line(path, t, as_dtype) for path, t in tensors)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _state_lines(path: str, value: Any) -> list[str]:
    """Lines for the non-tensor state of ``value``: a scheduler's config, a tokenizer's added tokens."""
    lines = []
    config = config_of(value)
    if config is not None:
        lines.append(_config_line(path, config))
    added_vocab = getattr(value, "get_added_vocab", None)
    if callable(added_vocab):
        lines.append(f"{path}|vocab|{len(value)}|{json.dumps(added_vocab(), sort_keys=True)}")
    return lines


def _adapter_lines(path: str, value: Any) -> list[str]:
    """Lines for the state of the PEFT adapter layers in a module that no tensor holds: which adapters
    are active, disabled or merged, and each active one's scaling (``set_adapters`` weights), exactly
    (an inactive adapter's scaling changes nothing a forward computes)."""
    if not isinstance(value, torch.nn.Module):
        return []
    lines = []
    for name, module in value.named_modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, Mapping) or not hasattr(module, "active_adapters"):
            continue
        active = sorted(str(adapter) for adapter in module.active_adapters)
        state = {
            "active": active,
            "disabled": bool(getattr(module, "disable_adapters", False)),
            "merged": sorted(str(adapter) for adapter in getattr(module, "merged_adapters", ())),
            "scaling": {str(key): float(factor).hex() for key, factor in sorted(scaling.items())
                        if str(key) in active and isinstance(factor, int | float)},
        }
        lines.append(f"{join_path(path, name)}|adapters|{json.dumps(state, sort_keys=True)}")
    return lines


#: The real tensor at a path of an object whose tensors are on the meta device (see :func:`fingerprint`).
TensorSource = Callable[[str, torch.Tensor], "torch.Tensor | SampledTensor"]


def fingerprint(
    value: Any, *, tensor_at: TensorSource | None = None, as_dtype: torch.dtype | None = None
) -> str:
    """The fingerprint of a model object (module, pipeline, engine model, scheduler, tokenizer...).

    ``tensor_at(path, meta_tensor)`` gives the values of each meta-device tensor
    of ``value``, one at a time: a model built on the meta device is fingerprinted
    from its file without ever holding more than one tensor, and the result equals
    the fingerprint of the same model built for real. ``as_dtype``: the fingerprint
    of the same model with every floating tensor converted to that dtype (a worker
    keeping an fp16 file's weights in fp16 checks them against a client's fp32 load:
    fp16 to fp32 is exact, so the two agree), computed from the samples alone.
    """
    lines = _state_lines("", value) + _adapter_lines("", value)
    for name, part in parts(value):
        lines.extend(_state_lines(name, part))
        lines.extend(_adapter_lines(name, part))
    tensors: Iterable[tuple[str, torch.Tensor | SampledTensor]] = named_tensors(value)
    if tensor_at is not None:
        tensors = ((path, tensor_at(path, t) if t.is_meta else t) for path, t in named_tensors(value))
    return fingerprint_of_tensors(type(value).__qualname__, tensors, lines, as_dtype)


def _version(tensor: torch.Tensor) -> int:
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors have no version counter
        return -1


@dataclass(frozen=True)
class TensorState:
    """Which tensor object sat at a path (a weak reference and its id), and its version counter then."""

    ref: weakref.ReferenceType[torch.Tensor]
    ident: int
    version: int

    def same_as(self, other: TensorState) -> bool:
        """Whether both states name the same tensor object (by id once it is gone) at the same version."""
        mine, theirs = self.ref(), other.ref()
        alive = mine is not None or theirs is not None
        same_object = (mine is theirs) if alive else self.ident == other.ident
        return same_object and self.version == other.version


@dataclass(frozen=True)
class WeightSnapshot:
    """The tensors of an object at one moment, by path."""

    states: Mapping[str, TensorState]

    @classmethod
    def take(cls, value: Any) -> WeightSnapshot:
        """Record the tensor objects and version counters of everything reachable from ``value``."""
        return cls(
            {path: TensorState(weakref.ref(t), id(t), _version(t)) for path, t in named_tensors(value)}
        )

    def compare(self, later: WeightSnapshot, at: str = "") -> list[str]:
        """What differs in ``later`` (a snapshot of the part at path ``at``) from this snapshot's part there.

        Returns human-readable findings (empty when nothing changed):
        ``"conv_in.weight was modified in place"``, ``"... was replaced"``,
        ``"... was added"``, ``"... was removed"``.
        """
        prefix = split_path(at)
        expected = {
            ".".join(split_path(path)[len(prefix) :]): state
            for path, state in self.states.items()
            if split_path(path)[: len(prefix)] == prefix
        }
        findings: list[str] = []
        for path, state in later.states.items():
            before = expected.get(path)
            if before is None:
                findings.append(f"{path or 'the tensor'} was added")
            elif before.version != state.version and before.ref() is state.ref():
                findings.append(f"{path} was modified in place")
            elif not before.same_as(state):
                findings.append(f"{path} was replaced")
        findings.extend(f"{path} was removed" for path in expected if path not in later.states)
        return findings

    def with_part(self, at: str, part: WeightSnapshot) -> WeightSnapshot:
        """This snapshot with everything under path ``at`` replaced by ``part`` (a swapped component)."""
        prefix = split_path(at)
        kept = {
            path: state for path, state in self.states.items() if split_path(path)[: len(prefix)] != prefix
        }
        kept.update({join_path(at, path): state for path, state in part.states.items()})
        return WeightSnapshot(kept)

    def changes(self, value: Any, at: str = "") -> list[str]:
        """What changed in ``value`` now (the part at path ``at``) since this snapshot."""
        return self.compare(WeightSnapshot.take(value), at)


def summarize_changes(findings: list[str]) -> str:
    """The first few findings, and how many more there are."""
    shown = "; ".join(findings[:_LISTED_CHANGES])
    more = len(findings) - _LISTED_CHANGES
    return shown + (f"; and {more} more" if more > 0 else "")
