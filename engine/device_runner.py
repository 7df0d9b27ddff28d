"""Running a node on a device: admission, placed models, one retry after out-of-memory, outputs home.

Used the same way by a local run (``diffsplit run --device``: :class:`DeviceNodeRunner`
wraps the executor's node runner) and by the worker for the nodes it is sent
(:func:`run_on_device`). Only *compute* nodes are placed: nodes that take a
model and return none (samplers, VAE decode/encode, text encoding, upscaling).
Loaders and model patchers (LoraLoader, ModelSamplingDiscrete, CFGGuider) run
where the masters live, on the CPU in the dtype they were built in, so every
model stays what its recipe and fingerprint describe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffsplit.engine.device_memory import DeviceMemory, DeviceOutOfMemory
from diffsplit.engine.executor import NodeCall, NodeRunner
from diffsplit.engine.lazy_models import with_materialised_inputs
from diffsplit.engine.nodes.base import NodeClass
from diffsplit.engine.placement import device_modules, outputs_to_host, place_inputs
from diffsplit.engine.types import MODEL_TYPES

#: Output types that carry models: a node returning one builds or patches models (runs on the CPU).
MODEL_CARRYING_OUTPUTS = MODEL_TYPES | {"GUIDER"}
#: Activation rules of thumb, bytes per latent pixel per batch item per byte of the dtype (the order of
#: ComfyUI's estimates): a UNet step with its cond and uncond rows, a VAE decode, a VAE encode per pixel.
UNET_BYTES_PER_LATENT_PIXEL = 2 * 10_000
VAE_DECODE_BYTES_PER_LATENT_PIXEL = 2_200 * 64
VAE_ENCODE_BYTES_PER_PIXEL = 1_800


def computes_on_device(node_class: NodeClass) -> bool:
    """Whether a node of this class runs on the device: not a loader, no model among its outputs."""
    carries_models = any(out.type in MODEL_CARRYING_OUTPUTS for out in node_class.outputs)
    return not node_class.is_loader and not carries_models


def activation_estimate(node_class: NodeClass, inputs: Mapping[str, Any], memory: DeviceMemory) -> int:
    """Bytes of activations a compute node needs beside its weights: from latent size, batch and dtype."""
    types = {spec.name: spec.type for spec in node_class.inputs}
    latent = next((value["samples"] for name, value in inputs.items()
                   if types.get(name) == "LATENT" and isinstance(value, dict)
                   and isinstance(value.get("samples"), torch.Tensor)), None)
    image = next((value for name, value in inputs.items()
                  if types.get(name) == "IMAGE" and isinstance(value, torch.Tensor)), None)
    kinds = set(types.values())
    if latent is not None and latent.ndim >= 4:
        batch, area = int(latent.shape[0]), int(latent.shape[-1]) * int(latent.shape[-2])
        if "MODEL" in kinds or "GUIDER" in kinds:
            return batch * area * UNET_BYTES_PER_LATENT_PIXEL * _itemsize(memory.policy.unet)
        if "VAE" in kinds:
            return batch * area * VAE_DECODE_BYTES_PER_LATENT_PIXEL * _itemsize(memory.policy.vae)
    if image is not None and image.ndim == 4 and "VAE" in kinds:
        batch, area = int(image.shape[0]), int(image.shape[1]) * int(image.shape[2])
        return batch * area * VAE_ENCODE_BYTES_PER_PIXEL * _itemsize(memory.policy.vae)
    return 0


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure (CUDA's OutOfMemoryError, MPS's RuntimeError saying so)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_on_device(
    memory: DeviceMemory,
    node_class: NodeClass,
    inputs: Mapping[str, Any],
    run: Callable[[dict[str, Any]], Sequence[Any]],
    *,
    on_wait: Callable[[str], None] | None = None,
) -> tuple[Any, ...]:
    """``run(placed inputs)`` inside a device job; outputs on the CPU with their models the masters.

    Out of device memory while running, the copies no running job needs are dropped and the run
    is tried once more; a second failure raises DeviceOutOfMemory naming the node.
    """
    modules = device_modules(inputs, memory)
    estimate = activation_estimate(node_class, inputs, memory)
    with memory.job(estimate, modules=modules, what=node_class.name, on_wait=on_wait):
        for attempt in (1, 2):
            placed, placement = place_inputs(inputs, memory)
            try:
                outputs = run(placed)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                del placed
                freed = memory.free_unpinned()
                release_device_memory()
                if attempt == 2:
                    what = f"{node_class.name} (retried once after freeing {freed >> 20} MiB)"
                    raise DeviceOutOfMemory(what, estimate, memory.budget_bytes or 0) from exc
                memory.note_oom_retry()
                continue
            return tuple(outputs_to_host(list(outputs), placement))
    raise AssertionError("unreachable")  # pragma: no cover


def release_device_memory() -> None:
    """Hand the allocator's cached blocks back (CUDA only; a no-op elsewhere and before CUDA starts)."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class DeviceNodeRunner:
    """A node runner that runs compute nodes with their models on ``memory``'s device.

    ``elsewhere(node_id)`` names nodes another runner sends away (remote nodes): they pass through.
    """

    def __init__(self, inner: NodeRunner, memory: DeviceMemory,
                 elsewhere: Callable[[str], bool] | None = None) -> None:
        self.inner = inner
        self.memory = memory
        self.elsewhere = elsewhere or (lambda _node_id: False)

    def __call__(self, call: NodeCall) -> Sequence[Any]:
        if self.elsewhere(call.node.id) or not computes_on_device(call.node_class):
            return self.inner(call)
        call = with_materialised_inputs(call)  # deferred loader outputs, built here: this node uses them
        if not device_modules(call.inputs, self.memory):
            return self.inner(call)
        return run_on_device(self.memory, call.node_class, call.inputs,
                             lambda placed: self.inner(dataclasses.replace(call, inputs=placed)))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
