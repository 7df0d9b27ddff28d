"""Conditioning scale estimator: after an early probe, which conditions a sampler run keeps, at what scale.

ControlNet residuals add up: at each step the UNet sees ``R = sum_i r_i``, one
``r_i`` per condition (a :class:`~diffsplit.engine.types.ControlHint` of a chain,
already scaled by its strength). During the first ``probe`` fraction of the steps
every condition runs as usual and its own residual is kept apart; their inner
products summed over the probe calls form a Gram matrix ``G`` (``G_ii``: a
condition's activation strength, ``G_ij / sqrt(G_ii G_jj)``: how much two
conditions overlap). From ``G`` alone:

- the kept set ``K`` and its scales ``c`` are those that best reproduce the full
  residual: ``c = argmin || R - sum_{k in K} c_k r_k ||`` (least squares over the
  probe, ``G_KK c = G_K 1``); the relative error of that fit is what dropping costs;
- conditions are dropped one at a time (backward elimination): each time the one
  whose removal, with the kept scales refitted, leaves the smallest error, while
  that error stays below ``tolerance`` (0: nothing is dropped) and every scale within ``[0, max_scale]``.

A weak condition (small ``G_ii``) costs little to drop; one that overlaps a
stronger one (cosine near 1) is dropped and the stronger one scaled up to cover
it. With nothing dropped the fit is exact (``c = 1``). For the remaining steps the
kept hints run with their strength times their scale (a ControlNet's residuals
are linear in its strength) and the dropped ones not at all: fewer ControlNet
passes per step. Conditions not active during the probe, or no longer active
after it, are kept unchanged and left out of the fit (neither its target nor
its terms: the fit describes the steps after the probe). Conditions are only
weighed against those active over the same steps (the same start and end
percent): one that ends sooner cannot stand in for one that runs on, so each
such group is pruned on its own. The probe's steps are computed exactly as without
the estimator, so a run that drops nothing equals the unpruned run bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffsplit.engine.sampling.condition_settings import ConditionSettings
from diffsplit.engine.sampling.control import (
    ControlResiduals,
    UNetInputs,
    control_residuals,
    hint_is_active,
    is_adapter,
)
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.types import ControlHint

__all__ = ["ChainDecision", "ConditionDecision", "ConditionLog", "ConditionPruner", "ConditionSettings",
           "Fit", "fit", "prune", "prune_groups"]

_log = logging.getLogger(__name__)

#: The longest condition label kept (labels travel on the wire).
MAX_LABEL_CHARS = 120
#: The most conditions a decision from a worker may list.
MAX_CHAIN_CONDITIONS = 64
#: The most conditions of one chain the estimator weighs (a longer chain runs unpruned).
MAX_WEIGHED_CONDITIONS = 32
#: The most steps a decision from a worker may count.
MAX_DECISION_STEPS = 100_000


def _number(data: Mapping[str, Any], key: str, *, finite: bool = True) -> float:
    """``data[key]`` as a float; a measurement (``finite=False``) may be NaN or infinite, as a probe whose
    residuals overflowed reports them."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or (finite and not math.isfinite(value)):
        raise ValueError(f"a condition decision's {key!r} is not a {'finite ' if finite else ''}number: "
                         f"{value!r}")
    return float(value)


def _steps(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DECISION_STEPS:
        raise ValueError(f"a condition decision's {key!r} is not a step count in 0..{MAX_DECISION_STEPS}: "
                         f"{value!r}")
    return value


@dataclass(frozen=True)
class Fit:
    """A kept set's least-squares scales and the relative error of its residual against the full one."""

    kept: tuple[int, ...]
    scales: tuple[float, ...]
    error: float


def fit(gram: torch.Tensor, kept: Sequence[int]) -> Fit:
    """The scales of ``kept`` (indices into ``gram``) that best reproduce the sum of all residuals."""
    gram = gram.double()
    total = float(gram.sum())
    if total <= 0.0:
        return Fit(tuple(kept), tuple(1.0 for _ in kept), 0.0)
    if len(kept) == 0:
        return Fit((), (), 1.0)
    index = torch.tensor(list(kept), dtype=torch.long)
    sub = gram[index][:, index]
    target = gram[index].sum(dim=1)
    # the least-squares scales nearest the given strengths (scales of 1): where residuals are linearly
    # dependent many scales fit as well, and the one changing the run least is taken
    change = torch.linalg.pinv(sub, hermitian=True) @ (target - sub.sum(dim=1))
    scales = 1.0 + change
    left = total - 2.0 * float(scales @ target) + float(scales @ sub @ scales)
    return Fit(tuple(kept), tuple(float(s) for s in scales), math.sqrt(max(left, 0.0) / total))


def prune(gram: torch.Tensor, tolerance: float, max_scale: float) -> Fit:
    """Backward elimination: drop while the refitted error stays below ``tolerance`` and every scale
    within ``[0, max_scale]``; at least one condition stays."""
    kept = list(range(gram.shape[0]))
    current = fit(gram, kept)
    while len(kept) > 1:
        best: Fit | None = None
        for drop in kept:
            trial = fit(gram, [i for i in kept if i != drop])
            # written so that a NaN error or scale (a residual that overflowed) never allows a drop
            if not trial.error < tolerance or not all(-1e-9 <= s <= max_scale for s in trial.scales):
                continue
            if best is None or trial.error < best.error:
                best = trial
        if best is None:
            break
        kept, current = list(best.kept), best
    return current


def prune_groups(gram: torch.Tensor, groups: Sequence[Sequence[int]], tolerance: float,
                 max_scale: float) -> Fit:
    """:func:`prune` within each group of indices into ``gram`` (conditions that are active over the
    same steps: one may only stand in for another that it outlives), every other index left out of
    both the fit and its target. The error is that of the whole result against the sum of every
    grouped condition."""
    kept: list[int] = []
    scales: list[float] = []
    for group in groups:
        index = torch.tensor(list(group), dtype=torch.long)
        result = prune(gram[index][:, index], tolerance, max_scale)
        kept += [group[k] for k in result.kept]
        scales += list(result.scales)
    members = [i for group in groups for i in group]
    if not members:
        return Fit((), (), 0.0)
    order = sorted(range(len(kept)), key=lambda k: kept[k])
    index = torch.tensor(members, dtype=torch.long)
    sub = gram.double()[index][:, index]
    left = torch.ones(len(members), dtype=torch.float64)  # the part of each residual not reproduced
    for i, scale in zip(kept, scales, strict=True):
        left[members.index(i)] -= scale
    total = float(sub.sum())
    error = math.sqrt(max(float(left @ sub @ left), 0.0) / total) if total > 0 else 0.0
    return Fit(tuple(kept[k] for k in order), tuple(scales[k] for k in order), error)


@dataclass(frozen=True)
class ConditionDecision:
    """What the estimator decided for one condition of a chain."""

    label: str
    strength: float
    #: root mean square of its residual over the probe (its activation strength)
    activation: float
    #: its largest cosine similarity with another condition's residual over the probe
    overlap: float
    kept: bool
    #: the factor on its strength for the remaining steps (1 when dropped or not judged)
    scale: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data (reply, PNG metadata, manifest)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ChainDecision:
    """The decisions for one chain of hints in one sampler run."""

    node_id: str
    probe_steps: int
    total_steps: int
    #: relative error of the kept conditions' refitted residual against all of them, over the probe
    error: float
    conditions: tuple[ConditionDecision, ...]

    @property
    def dropped(self) -> int:
        """How many conditions the remaining steps skip."""
        return sum(1 for c in self.conditions if not c.kept)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (reply, PNG metadata)."""
        return {"node": self.node_id, "probe_steps": self.probe_steps, "total_steps": self.total_steps,
                "error": self.error, "conditions": [c.to_dict() for c in self.conditions]}

    @classmethod
    def from_dict(cls, data: Any) -> ChainDecision:
        """Decisions a worker sent back (ValueError naming what is malformed: a missing number, a
        non-finite strength, more than ``MAX_CHAIN_CONDITIONS`` conditions, a step count out of range)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("conditions"), list):
            raise ValueError("a condition decision is not a mapping with 'conditions'")
        if len(data["conditions"]) > MAX_CHAIN_CONDITIONS:
            raise ValueError(f"a condition decision lists {len(data['conditions'])} conditions, over the "
                             f"limit of {MAX_CHAIN_CONDITIONS}")
        conditions = []
        for item in data["conditions"]:
            if not isinstance(item, Mapping):
                raise ValueError("a condition entry is not a mapping")
            conditions.append(ConditionDecision(
                label=str(item.get("label", "?"))[:MAX_LABEL_CHARS], strength=_number(item, "strength"),
                activation=_number(item, "activation", finite=False),
                overlap=_number(item, "overlap", finite=False),
                kept=item.get("kept") is True, scale=_number(item, "scale", finite=False),
                reason=str(item.get("reason", ""))[:200]))
        return cls(node_id=str(data.get("node", "?"))[:64], probe_steps=_steps(data, "probe_steps"),
                   total_steps=_steps(data, "total_steps"), error=_number(data, "error", finite=False),
                   conditions=tuple(conditions))

    def lines(self) -> list[str]:
        """Human-readable lines, one per condition after a heading."""
        head = (f"node {self.node_id}: {len(self.conditions) - self.dropped} of {len(self.conditions)} "
                f"condition(s) kept after a {self.probe_steps}-step probe of {self.total_steps} "
                f"(residual error {self.error:.1%})")
        rows = [f"  {c.label}: {'kept' if c.kept else 'dropped'}"
                + (f" at scale {c.scale:.3f}" if c.kept and not math.isclose(c.scale, 1.0) else "")
                + f" (activation {c.activation:.3g}, overlap {c.overlap:.2f}; {c.reason})"
                for c in self.conditions]
        return [head, *rows]


@dataclass
class ConditionLog:
    """The decisions of one run, from every sampler node (thread-safe; shared by the run's nodes)."""

    settings: ConditionSettings
    decisions: list[ChainDecision] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, decision: ChainDecision) -> None:
        """Record one chain's decisions."""
        with self._lock:
            self.decisions.append(decision)

    def snapshot(self) -> list[ChainDecision]:
        """The decisions so far."""
        with self._lock:
            return list(self.decisions)


def condition_log(ctx: Any) -> ConditionLog | None:
    """The run's :class:`ConditionLog` where ``--conditions auto`` is on (None: the estimator is off)."""
    log = getattr(ctx, "conditions", None)
    return log if isinstance(log, ConditionLog) else None


def chain_of(head: ControlHint) -> tuple[ControlHint, ...]:
    """The hints of a chain, the first applied first."""
    hints: list[ControlHint] = []
    hint: ControlHint | None = head
    while hint is not None:
        hints.append(hint)
        hint = hint.previous
    return tuple(reversed(hints))


def hint_label(hint: ControlHint, index: int) -> str:
    """How decisions name a condition: its label (the node that applied it) or its place in the chain."""
    name = hint.label or f"condition {index + 1}"
    text = f"{name} (strength {hint.strength:g}, {hint.start_percent:g}-{hint.end_percent:g})"
    return text[:MAX_LABEL_CHARS]


def _parts(residuals: ControlResiduals) -> tuple[torch.Tensor, ...]:
    return (*residuals.down, *(() if residuals.mid is None else (residuals.mid,)))


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The inner product of two residual sets, tensor by tensor in float64 (never a float64 copy of a
    whole set: the memory a probe adds is one residual tensor's)."""
    return sum(float(torch.sum(x.double() * y.double())) for x, y in zip(a, b, strict=True))


class _ChainProbe:
    """One chain's Gram matrix and element count over the probe calls."""

    def __init__(self, head: ControlHint) -> None:
        self.head = head  # kept alive: chains are keyed by the head's identity
        self.hints = chain_of(head)
        self.positions = {id(hint): i for i, hint in enumerate(self.hints)}
        self.gram = torch.zeros(len(self.hints), len(self.hints), dtype=torch.float64)
        self.elements = 0
        self.seen = [False] * len(self.hints)

    def add(self, own: Mapping[int, tuple[torch.Tensor, ...]]) -> None:
        positions = self.positions
        flat = {positions[key]: parts for key, parts in own.items() if key in positions}
        if not flat:
            return
        self.elements += sum(part.numel() for part in next(iter(flat.values())))
        for i, a in flat.items():
            self.seen[i] = True
            for j, b in flat.items():
                if j >= i:
                    value = _dot(a, b)
                    self.gram[i, j] += value
                    if j != i:
                        self.gram[j, i] += value


class ConditionPruner:
    """Probes a sampler run's conditions, then runs the kept ones rescaled (see the module docstring)."""

    def __init__(self, settings: ConditionSettings, log: ConditionLog, node_id: str,
                 schedule: DiscreteSchedule,
                 sigmas: torch.Tensor) -> None:
        self.settings = settings
        self.log = log
        self.node_id = node_id
        self.schedule = schedule
        self.sigmas = [float(s) for s in sigmas]
        self.total_steps = len(self.sigmas) - 1
        self.probe_steps = settings.probe_steps(self.total_steps)
        self._probes: dict[int, _ChainProbe] = {}
        self._replaced: dict[int, ControlHint | None] | None = None
        self._unweighed: dict[int, ControlHint] = {}  # chains too long to probe, kept alive by identity

    @property
    def decided(self) -> bool:
        """Whether the probe is over and the kept chains are in use."""
        return self._replaced is not None

    def step_done(self, step: int) -> None:
        """The sampler finished step ``step`` (0-based): after the probe's last one, decide."""
        if self._replaced is None and step + 1 == self.probe_steps and self.probe_steps < self.total_steps:
            self._decide(self.sigmas[step + 1])

    def residuals(
        self, head: ControlHint | None, sigma: float, inputs: UNetInputs
    ) -> ControlResiduals | None:
        """The residuals for a UNet call whose entries carry ``head``: every hint while probing, the
        kept (rescaled) ones after."""
        if head is None:
            return None
        if self._replaced is not None:
            return control_residuals(self._replaced.get(id(head), head), self.schedule, sigma, inputs)
        probe = self._probes.get(id(head))
        if probe is None:
            chain = chain_of(head)
            if len(chain) > MAX_WEIGHED_CONDITIONS:  # a probe holds every condition's residuals at once
                if id(head) not in self._unweighed:
                    self._unweighed[id(head)] = head
                    _log.warning("node %s: a chain of %d conditions is over the %d the estimator weighs; "
                                 "all of them run", self.node_id, len(chain), MAX_WEIGHED_CONDITIONS)
                return control_residuals(head, self.schedule, sigma, inputs)
            probe = self._probes[id(head)] = _ChainProbe(head)
        own: dict[int, tuple[torch.Tensor, ...]] = {}

        def observe(hint: ControlHint, residuals: ControlResiduals) -> None:
            if not is_adapter(hint):  # an adapter's features live in another space: it is not weighed
                own[id(hint)] = _parts(residuals)

        result = control_residuals(head, self.schedule, sigma, inputs, observe=observe)
        probe.add(own)
        return result

    def _decide(self, next_sigma: float) -> None:
        replaced: dict[int, ControlHint | None] = {}
        for key, probe in self._probes.items():
            decision, scales = self._decide_chain(probe, next_sigma)
            self.log.add(decision)
            replaced[key] = self._rebuilt(probe.hints, scales)
        self._replaced = replaced

    def _decide_chain(
        self, probe: _ChainProbe, next_sigma: float
    ) -> tuple[ChainDecision, list[float | None]]:
        hints = probe.hints
        gram = probe.gram
        candidates = [i for i, hint in enumerate(hints)
                      if probe.seen[i] and gram[i, i] > 0 and hint_is_active(hint, self.schedule, next_sigma)]
        windows: dict[tuple[float, float], list[int]] = {}
        for i in candidates:
            windows.setdefault((hints[i].start_percent, hints[i].end_percent), []).append(i)
        result = prune_groups(gram, list(windows.values()), self.settings.tolerance, self.settings.max_scale)
        scale_of = dict(zip(result.kept, result.scales, strict=True))
        decisions, scales = [], []
        norms = gram.diagonal().clamp(min=0).sqrt()
        for i, hint in enumerate(hints):
            overlaps = [float(gram[i, j] / (norms[i] * norms[j])) for j in range(len(hints))
                        if j != i and norms[i] > 0 and norms[j] > 0]
            activation = math.sqrt(float(gram[i, i]) / max(probe.elements, 1)) if probe.seen[i] else 0.0
            overlap = max(overlaps, default=0.0)
            if i not in candidates:
                if is_adapter(hint):
                    reason = "a T2I-Adapter: only ControlNets are weighed"
                elif not probe.seen[i]:
                    reason = "not active during the probe"
                else:
                    reason = "not active after the probe"
                decisions.append(ConditionDecision(hint_label(hint, i), hint.strength, activation, overlap,
                                                   True, 1.0, reason))
                scales.append(1.0)
            elif i in scale_of:
                reason = "needed" if math.isclose(scale_of[i], 1.0, abs_tol=1e-6) else "covers dropped ones"
                decisions.append(ConditionDecision(hint_label(hint, i), hint.strength, activation, overlap,
                                                   True, scale_of[i], reason))
                scales.append(scale_of[i])
            else:
                reason = "overlaps a kept condition" if overlap >= 0.5 else "contributes little"
                decisions.append(ConditionDecision(hint_label(hint, i), hint.strength, activation, overlap,
                                                   False, 1.0, reason))
                scales.append(None)
        chain = ChainDecision(self.node_id, self.probe_steps, self.total_steps, result.error,
                              tuple(decisions))
        return chain, scales

    @staticmethod
    def _rebuilt(hints: Sequence[ControlHint], scales: Sequence[float | None]) -> ControlHint | None:
        """The chain of the kept hints, each at its strength times its scale (None: all dropped)."""
        previous: ControlHint | None = None
        unchanged = True
        for hint, scale in zip(hints, scales, strict=True):
            if scale is None:
                unchanged = False
                continue
            if unchanged and scale == 1.0 and hint.previous is previous:
                previous = hint  # the same object: positive and negative still batch together
                continue
            unchanged = False
            previous = dataclasses.replace(hint, strength=hint.strength * scale, previous=previous)
        return previous


PrunerFactory = Callable[[DiscreteSchedule, torch.Tensor], ConditionPruner]


def pruner_factory(log: ConditionLog | None, node_id: str) -> PrunerFactory | None:
    """What a sampler run calls to make its pruner (None: the estimator is off for this run)."""
    if log is None:
        return None
    settings = log.settings

    def make(schedule: DiscreteSchedule, sigmas: torch.Tensor) -> ConditionPruner:
        return ConditionPruner(settings, log, node_id, schedule, sigmas)

    return make
