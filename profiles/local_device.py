"""Where a profile's local nodes compute: the device ``--device``/``--dtype`` chose, and its labels.

A profile measures the nodes it runs here the way ``diffsplit run`` with the
same flags would run them: through a
:class:`~diffsplit.engine.device_runner.DeviceNodeRunner` over the flags'
:class:`~diffsplit.engine.device_memory.DeviceMemory`, or, for the CPU in
float32 (no manager, see :func:`diffsplit.device_args.local_device_memory`),
as loaded. The labels say what was really used, never what the machine merely
has: a CPU run on a GPU machine is labelled the CPU, and its memory is the
process RSS, not the (idle) CUDA allocator.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
from diffsplit.engine.dtypes import MODEL_KINDS, DtypePolicy, dtype_name
from diffsplit.engine.executor import NodeRunner

if TYPE_CHECKING:
    from diffsplit.engine.device_memory import DeviceMemory


def device_label(memory: DeviceMemory | None) -> str:
    """``cuda:0 (NVIDIA H200)``, ``mps`` or ``cpu (2 torch threads)``: where the compute nodes ran."""
    device = memory.device if memory is not None else torch.device("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} torch threads)"
    return str(device)


def probe_device(memory: DeviceMemory | None) -> str:
    """The device a memory probe should read: the manager's (``cuda:0``), else ``cpu``."""
    return str(memory.device) if memory is not None else "cpu"


def dtype_names(memory: DeviceMemory | None) -> dict[str, str]:
    """Model kind → ``fp32``/``fp16``/``bf16``: the dtype each kind computed in (as loaded: fp32)."""
    policy = memory.policy if memory is not None else DtypePolicy()
    return {kind: dtype_name(policy.of(kind)) for kind in MODEL_KINDS}


def on_device(inner: NodeRunner, memory: DeviceMemory | None, elsewhere: Collection[str] = ()) -> NodeRunner:
    """``inner`` with its compute nodes on ``memory``'s device (``elsewhere``: remote nodes, passed on).

    Without a manager ``inner`` itself: the models run as loaded.
    """
    if memory is None:
        return inner
    from diffsplit.engine.device_runner import DeviceNodeRunner

    remote = frozenset(elsewhere)
    return DeviceNodeRunner(inner, memory, elsewhere=lambda node_id: node_id in remote)
