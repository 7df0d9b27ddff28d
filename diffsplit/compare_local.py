"""``diffsplit run --compare-local``: how far a split run is from the same run done all here.

The fidelity contract: a split run equals the local run bit for bit when the
client's local nodes and the workers use the same device kind and dtypes (the
worker runs each job with the client's thread count, and every value crosses
the wire losslessly). A worker on another device or in another dtype (a GPU in
fp16 beside a CPU client in fp32) gives a different image; this module measures
by how much, so a user can see whether the difference matters.

After the split run the workflow runs again entirely in this process (same
overrides, same ``--device``/``--dtype`` for the local nodes), writing its
images into a temporary folder that is deleted afterwards, so nothing in the
user's ``--out`` is overwritten or mixed. Then every IMAGE-typed output both
runs produced, and every saved image, is compared: the largest absolute
difference and the PSNR, both over values in [0, 1] (a saved PNG's 8-bit levels
are divided by 255).

JSON (the ``compare_local`` section of ``--stats``): ``psnr_db`` is a number,
the string ``"inf"`` when the two are identical (JSON has no infinity), or
``null`` when it is undefined (a NaN or an infinity in either output); ``max_diff``
is a number, or ``null`` when such a value makes it undefined.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffsplit.transport.errors import DiffsplitError

if TYPE_CHECKING:
    from diffsplit.engine.device_memory import DeviceMemory
    from diffsplit.engine.executor import RunResult
    from diffsplit.engine.graph import Workflow
    from diffsplit.engine.nodes.registry import NodeRegistry
    from diffsplit.engine.store import ModelStore

#: The output type compared (ComfyUI's images: float tensors [B, H, W, C] in [0, 1]).
IMAGE_TYPE = "IMAGE"
#: The prefix of every line ``--compare-local`` prints.
PREFIX = "compare-local:"


class CompareLocalError(DiffsplitError):
    """``--compare-local`` cannot compare (no remote nodes, or the two runs made different things)."""


@dataclass(frozen=True)
class OutputComparison:
    """One output compared: a node's IMAGE output (``kind`` "output") or a saved image ("saved").

    ``max_diff`` and ``psnr_db`` are over values in [0, 1]; ``psnr_db`` is ``math.inf`` when
    the two are identical and NaN when either holds a NaN or an infinity (``max_diff`` is then NaN
    or infinite).
    """

    kind: str
    label: str
    max_diff: float
    psnr_db: float
    identical: bool
    node_id: str | None = None
    class_type: str | None = None
    output: str | None = None

    def line(self) -> str:
        """``compare-local: node 7 (VAEDecode) max diff 0.0, PSNR inf (identical)``."""
        verdict = "identical" if self.identical else "differs"
        psnr = "inf" if math.isinf(self.psnr_db) and self.psnr_db > 0 else f"{self.psnr_db:.2f} dB"
        return f"{PREFIX} {self.label} max diff {_number(self.max_diff)}, PSNR {psnr} ({verdict})"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (see the module docstring for ``"inf"`` and ``null``)."""
        return {
            "kind": self.kind, "label": self.label, "node_id": self.node_id, "class_type": self.class_type,
            "output": self.output, "identical": self.identical,
            "max_diff": self.max_diff if math.isfinite(self.max_diff) else None,
            "psnr_db": _json_psnr(self.psnr_db),
        }


@dataclass(frozen=True)
class LocalComparison:
    """What ``--compare-local`` found: the comparisons and how long the reference run took."""

    outputs: tuple[OutputComparison, ...]
    reference_s: float

    @property
    def identical(self) -> bool:
        """Whether every compared output was identical (and something was compared)."""
        return bool(self.outputs) and all(item.identical for item in self.outputs)

    def lines(self) -> list[str]:
        """One line per compared output, or one saying nothing could be compared."""
        if not self.outputs:
            return [f"{PREFIX} no IMAGE outputs or saved images to compare"]
        return [item.line() for item in self.outputs]

    def to_json(self) -> dict[str, Any]:
        """The ``compare_local`` section of ``--stats``."""
        return {"reference_s": self.reference_s, "identical": self.identical,
                "outputs": [item.to_json() for item in self.outputs]}


def require_remote(remotes: Sequence[str]) -> None:
    """Refuse ``--compare-local`` without ``--remote``: the run would only be compared with itself.

    Why an error and not a report of "identical": a local-only run compared with
    a second local run is identical by construction (that is the contract), so the
    second run would cost its full time and tell nothing; the flag is most likely
    given by mistake, or with the ``--remote`` forgotten.
    """
    if not remotes:
        raise CompareLocalError("--compare-local compares a split run with the same run done all here; "
                                "without --remote NODE=ADDR everything runs here already, so there is "
                                "nothing to compare")


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio of ``b`` against ``a`` in dB: ``inf`` when equal, NaN with a NaN or inf.

    ``10 * log10(data_range**2 / MSE)``, the mean squared error taken in float64.
    """
    first, second = _as_float64(a), _as_float64(b)
    _require_same_shape(first, second, "psnr")
    if first.size == 0:
        return math.inf
    mse = float(np.mean((first - second) ** 2))
    if not math.isfinite(mse):  # a NaN or an infinity in either: no meaningful ratio
        return math.nan
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest absolute difference of two same-shaped arrays (NaN when either holds a NaN)."""
    first, second = _as_float64(a), _as_float64(b)
    _require_same_shape(first, second, "max_abs_diff")
    return float(np.max(np.abs(first - second))) if first.size else 0.0


def compare_arrays(kind: str, label: str, split: np.ndarray, local: np.ndarray, *,
                   node_id: str | None = None, class_type: str | None = None,
                   output: str | None = None) -> OutputComparison:
    """Compare ``split`` with the ``local`` reference (values in [0, 1])."""
    if np.shape(split) != np.shape(local):
        raise CompareLocalError(f"{label}: the split run made shape {tuple(np.shape(split))}, the local "
                                f"reference {tuple(np.shape(local))}; they cannot be compared")
    identical = bool(np.array_equal(split, local))
    return OutputComparison(kind=kind, label=label, max_diff=max_abs_diff(split, local),
                            psnr_db=psnr(local, split), identical=identical, node_id=node_id,
                            class_type=class_type, output=output)


def compare_runs(local: RunResult, split: RunResult, workflow: Workflow,
                 registry: NodeRegistry) -> list[OutputComparison]:
    """Every IMAGE output both runs produced (topological order), then the saved images in turn.

    Saved images are paired by position: the same workflow saves the same images in the same
    order, though their file names may differ (each folder numbers its own files).
    """
    comparisons = [item for node_id in split.outputs if node_id in local.outputs
                   for item in _node_images(node_id, local.outputs[node_id], split.outputs[node_id],
                                            workflow, registry)]
    if len(local.saved_files) != len(split.saved_files):
        raise CompareLocalError(f"the split run saved {len(split.saved_files)} image(s), the local "
                                f"reference {len(local.saved_files)}; they cannot be paired")
    for split_path, local_path in zip(split.saved_files, local.saved_files, strict=True):
        comparisons.append(compare_arrays("saved", f"saved {split_path.name}", _png_values(split_path),
                                          _png_values(local_path), output=str(split_path)))
    return comparisons


def compare_with_local(workflow: Workflow, registry: NodeRegistry, store: ModelStore | None,
                       split: RunResult, *, inputs_dir: Path | None, memory: DeviceMemory | None,
                       max_workers: int = 1) -> LocalComparison:
    """Run ``workflow`` again all here (nodes on ``memory``'s device, if any) and compare with ``split``.

    The reference run's images go into a temporary folder, compared before it is deleted.
    """
    from diffsplit.engine.executor import Executor, NodeRunner, run_node_locally

    runner: NodeRunner = run_node_locally
    if memory is not None:
        from diffsplit.engine.device_runner import DeviceNodeRunner

        runner = DeviceNodeRunner(run_node_locally, memory)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffsplit-compare-local-") as folder:
        executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=Path(folder),
                            max_workers=max(1, max_workers))
        local = executor.run(workflow, node_runner=runner)
        reference_s = time.perf_counter() - started
        outputs = compare_runs(local, split, workflow, registry)
    return LocalComparison(tuple(outputs), reference_s)


def _node_images(node_id: str, local: Sequence[Any], split: Sequence[Any], workflow: Workflow,
                 registry: NodeRegistry) -> Iterator[OutputComparison]:
    class_type = workflow.node(node_id).class_type
    specs = registry[class_type].outputs
    images = [(index, spec) for index, spec in enumerate(specs) if spec.type == IMAGE_TYPE]
    for index, spec in images:
        if index >= len(local) or index >= len(split):
            continue
        first, second = _tensor_values(split[index]), _tensor_values(local[index])
        if first is None or second is None:
            continue
        label = f"node {node_id} ({class_type})" + (f" output {spec.name}" if len(images) > 1 else "")
        yield compare_arrays("output", label, first, second, node_id=node_id, class_type=class_type,
                             output=spec.name)


def _tensor_values(value: Any) -> np.ndarray | None:
    """A torch tensor's values as float64 NumPy (None for anything else)."""
    import torch

    if not isinstance(value, torch.Tensor):
        return None
    return value.detach().to("cpu", torch.float64).numpy()


def _png_values(path: Path) -> np.ndarray:
    """A saved image's pixels in [0, 1] (RGBA kept: alpha counts too)."""
    from PIL import Image

    with Image.open(path) as picture:
        mode = "RGBA" if "A" in picture.getbands() else "RGB"
        return np.asarray(picture.convert(mode), dtype=np.float64) / 255.0


def _as_float64(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _require_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {a.shape} and {b.shape}")


def _number(value: float) -> str:
    """``0.0``, ``0.0123``, ``3.05e-05``: short, and never hiding a difference as zero."""
    if math.isnan(value):
        return "nan"
    return "0.0" if value == 0.0 else f"{value:.3g}"


def _json_psnr(value: float) -> float | str | None:
    if math.isnan(value):
        return None
    return "inf" if math.isinf(value) and value > 0 else value

