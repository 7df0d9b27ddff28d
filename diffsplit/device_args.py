"""``--device``, ``--dtype``, the per-kind dtype flags and ``--vram-gb``: shared by run, profile and worker.

The flags are parsed as text and resolved when the command runs
(:func:`device_memory_from_args`), so ``--help`` starts no torch and a device
this machine lacks is refused with a message that lists what it has.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from diffsplit.arg_types import positive_float

if TYPE_CHECKING:
    from diffsplit.engine.device_memory import DeviceMemory

_DTYPES = ("auto", "fp32", "fp16", "bf16")


def add_device_arguments(parser: argparse.ArgumentParser, *, what: str = "nodes run here") -> None:
    """The device flags on ``parser``; ``what`` says which nodes they apply to, for --help."""
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help=f"where {what} compute: auto (the first CUDA GPU, else MPS, else the CPU), "
                        "cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--dtype", default="auto", choices=_DTYPES,
                        help="dtype of every model kind (default auto: fp32 on the CPU; on a GPU the UNet, "
                        "ControlNets and text encoders in fp16, the VAE in bf16 where supported, else fp32)")
    for kind in ("unet", "vae", "text-encoder"):
        parser.add_argument(f"--{kind}-dtype", default="auto", choices=_DTYPES,
                            help=f"dtype of the {kind.replace('-', ' ')} (overrides --dtype)")
    parser.add_argument("--vram-gb", type=positive_float, default=None, metavar="GB",
                        help="device memory models and activations may use (default: on CUDA the free "
                        "memory at start minus 1 GiB; elsewhere no limit)")


def device_memory_from_args(args: argparse.Namespace) -> DeviceMemory:
    """The device memory manager the flags ask for (DeviceError/DtypeError name a bad flag)."""
    from diffsplit.engine.device_memory import DeviceMemory

    vram_gb = getattr(args, "vram_gb", None)
    return DeviceMemory.from_settings(
        getattr(args, "device", "auto"), dtype=getattr(args, "dtype", "auto"),
        unet_dtype=getattr(args, "unet_dtype", "auto"), vae_dtype=getattr(args, "vae_dtype", "auto"),
        text_encoder_dtype=getattr(args, "text_encoder_dtype", "auto"),
        budget_bytes=int(vram_gb * (1 << 30)) if vram_gb is not None else None)


def local_device_memory(args: argparse.Namespace) -> DeviceMemory | None:
    """The device memory manager for the nodes run in this process, or None where none is needed.

    None for the CPU in float32 with no budget: models then compute where and as they were loaded,
    with no wrapper in the way, so a plain CPU run is exactly what it was before the device flags
    (``diffsplit run``, ``profile`` and ``plan`` share this rule).
    """
    memory = device_memory_from_args(args)
    if memory.device.type == "cpu" and memory.policy.all_float32 and memory.budget_bytes is None:
        return None
    return memory


def describe(memory: DeviceMemory) -> str:
    """``cuda:0 (unet=fp16 vae=bf16 ...; budget 70.2 GiB)`` for the start-up line."""
    budget_bytes = memory.budget_bytes
    budget = "no budget" if budget_bytes is None else f"budget {budget_bytes / (1 << 30):.1f} GiB"
    return f"{memory.device} ({memory.policy.describe()}; {budget})"
