"""The runs of the GPU check: one text-to-image workflow, timed per node and per sampler step.

Each run goes through the real executor with one of the project's node runners:
``DeviceNodeRunner`` (local, models placed on the device), plain ``run_node_locally``
(CPU only), ``RemoteRunner`` (KSampler and VAEDecode on a worker process), or a
``DeviceNodeRunner`` around a ``RemoteRunner`` (the client's own compute nodes on its
device, the assigned ones on the worker). Sampler speed is taken from the progress
reports are kept too (``steps_it_s``: between the first and the last step, without the
call's set-up), but the headline figure is steps over the sampler node's time
(``sampler_it_s``; on a worker its own run time, without the wire): a GPU runs behind the
Python that reports steps, and only the node's end waits for the GPU to finish.

The worker is a ``diffsplit worker`` child process; its command line is built in one
place (:func:`worker_command`), with ``--device``/``--dtype`` only where this diffsplit's
worker has those options.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.device_memory import DeviceMemory
from diffsplit.engine.device_runner import DeviceNodeRunner
from diffsplit.engine.devices import default_budget_bytes
from diffsplit.engine.dtypes import DtypePolicy
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.execution_cache import ExecutionCache
from diffsplit.engine.executor import Executor, NodeRunner, RunResult, run_node_locally
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source

from diffsplit.demo import READY_PREFIX, stop_process

#: Node ids of the workflow (engine.example_workflows.sd15_workflow without its LoRA).
LOADER, POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE = "1", "3", "4", "5", "6", "7"
#: What the worker runs in the split runs.
REMOTE_CLASSES = ("KSampler", "VAEDecode")
#: How long a worker may take to import, index its models folder and bind.
WORKER_READY_S = 180.0


def check_workflow(ckpt_name: str, *, width: int, height: int, steps: int, seed: int) -> dict[str, Any]:
    """Text-to-image with ``ckpt_name`` (SD 1.5 or SDXL: CLIPTextEncode serves both), euler, cfg 6."""
    workflow = sd15_workflow(seed=seed, steps=steps, lora=False)
    workflow[LOADER]["inputs"]["ckpt_name"] = ckpt_name
    workflow[LATENT]["inputs"].update(width=width, height=height)
    return workflow


@dataclass
class StepClock:
    """The progress callback of one run: when each sampler step was reported."""

    node_id: str = SAMPLER
    steps: list[tuple[int, float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, node_id: str, step: int, total: int) -> None:
        if node_id == self.node_id:
            with self._lock:
                self.steps.append((step, time.perf_counter()))

    def rate(self) -> float | None:
        """Steps per second between the first and the last reported step (None: under two reports)."""
        with self._lock:
            points = sorted(set(self.steps))
        if len(points) < 2 or points[-1][1] <= points[0][1]:
            return None
        (first, start), (last, end) = points[0], points[-1]
        return (last - first) / (end - start)


@dataclass(frozen=True)
class Measured:
    """One run: the sampler's speed, per-node wall times, the decoded image, the loader's outputs."""

    steps: int
    #: steps over the sampler node's wall time here
    sampler_it_s: float
    #: steps per second between the first and the last progress report (None: fewer than two)
    steps_it_s: float | None
    node_s: Mapping[str, float]
    total_s: float
    image: torch.Tensor
    loader_outputs: tuple[Any, ...] | None

    def seconds(self, *node_ids: str) -> float:
        """Wall time of these nodes together (0 for cache hits)."""
        return sum(self.node_s.get(node_id, 0.0) for node_id in node_ids)

    def summary(self) -> dict[str, Any]:
        """Plain data for the report (no tensors)."""
        return {"steps": self.steps, "sampler_it_s": self.sampler_it_s, "steps_it_s": self.steps_it_s,
                "total_s": self.total_s,
                "ksampler_s": self.seconds(SAMPLER), "vae_decode_s": self.seconds(DECODE),
                "text_encode_s": self.seconds(POSITIVE, NEGATIVE), "loader_s": self.seconds(LOADER)}


@dataclass(frozen=True)
class Engine:
    """What every run shares: the node registry, the model store, where SaveImage would write."""

    registry: NodeRegistry
    store: ModelStore
    output_dir: Path

    def run(self, document: Mapping[str, Any], runner: NodeRunner = run_node_locally, *,
            cache: ExecutionCache | None = None,
            given: Mapping[str, Sequence[Any]] | None = None) -> Measured:
        """Run ``document`` up to its VAEDecode, one node at a time."""
        workflow = load_workflow(dict(document), self.registry)
        steps = int(document[SAMPLER]["inputs"]["steps"])
        clock = StepClock()
        executor = Executor(self.registry, self.store, output_dir=self.output_dir, progress=clock,
                            max_workers=1)
        started = time.perf_counter()
        result = executor.run(workflow, targets=[DECODE], cache=cache, given=given, node_runner=runner)
        total = time.perf_counter() - started
        node_s = {node_id: timing.wall_s for node_id, timing in result.timings.items()}
        rate = steps / max(node_s.get(SAMPLER, 0.0), 1e-9)
        return Measured(steps, rate, clock.rate(), node_s, total, _image(result),
                        _loader_outputs(result, given))


def _image(result: RunResult) -> torch.Tensor:
    image = result.outputs[DECODE][0]
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"VAEDecode returned {type(image).__name__}, not an image tensor")
    return image.detach().to("cpu", torch.float32)


def _loader_outputs(result: RunResult, given: Mapping[str, Sequence[Any]] | None) -> tuple[Any, ...] | None:
    if given is not None and LOADER in given:
        return tuple(given[LOADER])
    outputs = result.outputs.get(LOADER)
    return tuple(outputs) if outputs is not None else None


def device_runner(inner: NodeRunner, device: torch.device, policy: DtypePolicy,
                  elsewhere: Callable[[str], bool] | None = None) -> tuple[DeviceNodeRunner, DeviceMemory]:
    """A DeviceNodeRunner on ``device`` with ``policy`` and the default budget, and its memory manager."""
    memory = DeviceMemory(device, policy, default_budget_bytes(device))
    return DeviceNodeRunner(inner, memory, elsewhere), memory


def remote_runner(engine: Engine, document: Mapping[str, Any], address: str) -> RemoteRunner:
    """A RemoteRunner sending KSampler and VAEDecode of ``document`` to ``address`` (as ``run --remote``)."""
    workflow = load_workflow(dict(document), engine.registry)
    assigned = assign_remotes(workflow, engine.registry, [f"{cls}={address}" for cls in REMOTE_CLASSES])
    return RemoteRunner(assigned, output_recipe_source(workflow, engine.registry, engine.store),
                        local_store=engine.store)


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of two images (inf for other shapes, nan if either has a nan)."""
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max())


# -- the worker process -------------------------------------------------------------------------------


def worker_supports_device_flags() -> bool:
    """Whether this diffsplit's ``worker`` takes ``--device`` and ``--dtype`` (asked of its own parser)."""
    from diffsplit.cli import build_parser

    _known, unknown = build_parser().parse_known_args(
        ["worker", "--models", ".", "--device=cpu", "--dtype=fp32"])
    return not unknown


def worker_command(models: Path, *, device: str | None, dtype: str | None, cache_gb: float,
                   listen: str = "tcp://127.0.0.1:*") -> list[str]:
    """The ``diffsplit worker`` command line; ``device``/``dtype`` None leaves those options out."""
    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models), "--listen", listen,
               "--cache-gb", f"{cache_gb:g}", "--grace", "5"]
    if device is not None:
        command += ["--device", device]
    if dtype is not None:
        command += ["--dtype", dtype]
    return command


class WorkerStartError(RuntimeError):
    """The worker process exited or stayed silent before it was listening."""


@contextlib.contextmanager
def started_worker(command: Sequence[str], log_path: Path) -> Iterator[str]:
    """Run ``command`` (a worker) with stderr in ``log_path``; yields its address once it listens."""
    with log_path.open("w") as log:
        process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=log, text=True,
                                   env={**os.environ})
        try:
            yield _wait_ready(process, log_path)
        finally:
            stop_process(process)


def _wait_ready(process: subprocess.Popen[str], log_path: Path) -> str:
    assert process.stdout is not None
    found: list[str] = []

    def read() -> None:  # readline blocks: read on a thread so the deadline holds
        for line in process.stdout:  # type: ignore[union-attr]
            if line.startswith(READY_PREFIX):
                found.append(line[len(READY_PREFIX):].split()[0])
                return

    reader = threading.Thread(target=read, name="gpu-check-worker-ready", daemon=True)
    reader.start()
    reader.join(WORKER_READY_S)
    if found:
        return found[0]
    code = process.poll()
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    state = (f"exited with code {code}" if code is not None
             else f"was not listening after {WORKER_READY_S:.0f} s")
    raise WorkerStartError(f"the worker {state}; its log ends:\n{tail}")


#: The key of the measured device memory peak (torch.cuda.max_memory_allocated) in a worker's ``stats``.
MEASURED_PEAK_KEYS = ("measured_peak_bytes",)


@dataclass(frozen=True)
class WorkerPeak:
    """The worker's device memory peak as its ``stats`` op reports it."""

    #: a measured peak (torch.cuda.max_memory_allocated in the worker), None when the worker reports none
    measured_bytes: int | None
    #: the worker's DeviceMemory ``peak_bytes``: placed copies plus activation estimates (an estimate)
    estimate_bytes: int | None
    source: str


def worker_device_peak(address: str) -> WorkerPeak:
    """Ask the worker's ``stats`` op for its device memory peak (measured if it has one, and its estimate)."""
    from diffsplit.transport.sockets import Client

    with Client(address) as client:
        reply = client.request({"op": "stats"}, timeout=10.0)
    device = reply.get("device")
    if not isinstance(device, Mapping):
        return WorkerPeak(None, None, "the worker's stats have no device section: omitted")
    estimate = _int_or_none(device.get("peak_bytes"))
    for key in MEASURED_PEAK_KEYS:
        measured = _int_or_none(device.get(key))
        if measured is not None:
            return WorkerPeak(measured, estimate, f"worker stats device.{key}")
    return WorkerPeak(None, estimate, "the worker's stats report no measured device memory peak (only "
                      "DeviceMemory's estimate, device.peak_bytes): omitted")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
