"""Key rules between LDM single-file layouts and diffusers/transformers modules.

A :class:`KeyRule` ties one LDM tensor to the module tensor(s) it holds, with a
shape transform that works in both directions: loading runs
:meth:`KeyRule.to_module`, saving runs :meth:`KeyRule.to_ldm`. Each
architecture module (``ldm_unet``, ``ldm_vae``, ``ldm_text``,
``ldm_controlnet``) builds its rules from a module's own state-dict keys, so
one table serves both directions.

This module also reads tensor files (:func:`open_tensor_file`) and assembles a
module built on the meta device from a state dict (:func:`assemble_module`).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import BinaryIO

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.tracer.owned_memory import owned_tensor
from safetensors import SafetensorError, safe_open

#: File suffixes read with ``torch.load(weights_only=True)`` instead of safetensors.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
#: safetensors' dtype names → torch's (without ``torch.``)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
#: How many missing keys an error message lists.
MISSING_KEYS_SHOWN = 5


class Transform(Enum):
    """How an LDM tensor's shape relates to the module tensor(s) it maps to."""

    SAME = "same"
    #: LDM 1x1 conv weight ``[C, C, 1, 1]`` <-> module linear weight ``[C, C]``.
    CONV_1X1 = "conv_1x1"
    #: LDM ``[in, out]`` matrix <-> module linear weight ``[out, in]``.
    TRANSPOSE = "transpose"
    #: LDM fused ``in_proj`` ``[3C, ...]`` <-> module q, k, v tensors ``[C, ...]``.
    SPLIT_QKV = "split_qkv"


@dataclass(frozen=True)
class KeyRule:
    """One LDM key and the module key(s) it holds (three for ``SPLIT_QKV``)."""

    ldm_key: str
    module_keys: tuple[str, ...]
    transform: Transform = Transform.SAME

    def to_module(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Turn the LDM tensor into the module tensor(s), in ``module_keys`` order."""
        if self.transform is Transform.SAME:
            return (tensor,)
        if self.transform is Transform.CONV_1X1:
            return (tensor.reshape(tensor.shape[0], tensor.shape[1]),)
        if self.transform is Transform.TRANSPOSE:
            return (tensor.T.contiguous(),)
        return tuple(part.clone() for part in tensor.chunk(3, dim=0))

    def to_ldm(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Turn the module tensor(s), in ``module_keys`` order, into the LDM tensor."""
        if self.transform is Transform.SAME:
            return tensors[0]
        if self.transform is Transform.CONV_1X1:
            return tensors[0][:, :, None, None]
        if self.transform is Transform.TRANSPOSE:
            return tensors[0].T.contiguous()
        return torch.cat(list(tensors), dim=0)


def same_rules(keys: Iterable[str]) -> tuple[KeyRule, ...]:
    """Identity rules: the file already uses the module's own keys."""
    return tuple(KeyRule(key, (key,)) for key in keys)


def to_ldm_tensors(
    rules: Iterable[KeyRule], module_state: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """LDM tensors (keys prefixed with ``prefix``) from a module state dict."""
    return {
        prefix + rule.ldm_key: rule.to_ldm([module_state[key] for key in rule.module_keys]) for rule in rules
    }


def ldm_shapes_of(rules: Iterable[KeyRule], module_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple]:
    """The LDM shapes that ``rules`` give for module tensors of ``module_shapes`` (no data touched)."""
    meta = {key: torch.empty(tuple(shape), device="meta") for key, shape in module_shapes.items()}
    return {key: tuple(tensor.shape) for key, tensor in to_ldm_tensors(rules, meta).items()}


def module_shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of a module's state dict, without copying anything."""
    return {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}


def missing_message(path: Path, missing: Sequence[str]) -> str:
    """The text of a ModelFileError for required weights absent from ``path``."""
    shown = ", ".join(repr(key) for key in missing[:MISSING_KEYS_SHOWN])
    more = f" (and {len(missing) - MISSING_KEYS_SHOWN} more)" if len(missing) > MISSING_KEYS_SHOWN else ""
    return f"{path}: missing {len(missing)} required weight(s): {shown}{more}"


@dataclass(frozen=True, eq=False)
class TensorFile:
    """An open tensor file: key → shape, metadata, and a reader for one tensor at a time.

    ``read`` returns tensors in their own, allocator-owned memory.
    """

    path: Path
    shapes: Mapping[str, tuple[int, ...]]
    metadata: Mapping[str, str]
    read: Callable[[str], torch.Tensor]
    #: key → the dtype it is stored in (torch's name without ``torch.``: ``float16``)
    dtypes: Mapping[str, str] = field(default_factory=dict)
    #: ``read_elements(key, flat_positions)``: just those elements, read from the file without the
    #: rest of the tensor (None for pickled files: read the tensor)
    read_elements: Callable[[str, Sequence[int]], torch.Tensor] | None = None


@contextlib.contextmanager
def open_tensor_file(path: Path) -> Iterator[TensorFile]:
    """Open a ``.safetensors`` (or pickled ``.ckpt``/``.pt``) weights file for reading.

    Safetensors files are read lazily, one tensor at a time; every tensor read
    is copied out of the file's mapping into allocator-owned memory
    (:mod:`diffsplit.tracer.owned_memory`), so a model's outputs never depend on
    where the file put its bytes. Raises
    ModelFileError if the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        yield _open_pickled(path)
        return
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: not a readable safetensors file ({error})") from error
    with handle as opened:
        slices = {key: opened.get_slice(key) for key in opened.keys()}  # noqa: SIM118
        shapes = {key: tuple(piece.get_shape()) for key, piece in slices.items()}
        dtypes = {key: _SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype().lower())
                  for key, piece in slices.items()}

        def read(key: str) -> torch.Tensor:
            return owned_tensor(opened.get_tensor(key), force=True)

        with path.open("rb") as raw:
            offsets = _data_offsets(raw, path)

            def read_elements(key: str, positions: Sequence[int]) -> torch.Tensor:
                dtype = getattr(torch, dtypes[key])
                size = torch.empty((), dtype=dtype).element_size()
                start = offsets[key]
                chunks = [os.pread(raw.fileno(), size, start + position * size) for position in positions]
                data = bytearray(b"".join(chunks))
                if len(data) != size * len(positions):
                    raise ModelFileError(f"{path}: tensor {key!r} is cut short")
                return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)

            yield TensorFile(path, shapes, dict(opened.metadata() or {}), read, dtypes, read_elements)


def _data_offsets(raw: BinaryIO, path: Path) -> dict[str, int]:
    """Where each tensor's bytes start in a safetensors file (from its header)."""
    try:
        (length,) = struct.unpack("<Q", raw.read(8))
        header = json.loads(raw.read(length))
        return {key: 8 + length + int(entry["data_offsets"][0])
                for key, entry in header.items() if key != "__metadata__"}
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise ModelFileError(f"{path}: unreadable safetensors header ({error})") from error


def _open_pickled(path: Path) -> TensorFile:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds for a bad file
        raise ModelFileError(f"{path}: not a readable torch checkpoint ({error})") from error
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path}: holds no state dict")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    _check_dense(tensors, path)
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    dtypes = {key: str(value.dtype).removeprefix("torch.") for key, value in tensors.items()}

    def read(key: str) -> torch.Tensor:
        return owned_tensor(tensors[key], force=True)

    return TensorFile(path, shapes, _checkpoint_metadata(loaded), read, dtypes)


def _check_dense(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """ModelFileError unless every tensor of a pickle is an ordinary dense one whose storage holds all
    its elements, and together they are no larger than twice the file (tied weights may share).

    A pickle keeps strides, so ``torch.zeros(1).expand(50000, 50000)`` saves as one element: its
    shape would pass every shape check and a copy would then allocate 10 GB from a few bytes.
    """
    total = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if (tensor.layout != torch.strided or tensor.is_quantized
                or tensor.untyped_storage().nbytes() < size):
            raise ModelFileError(f"{path}: tensor {key!r} is not a plain dense tensor holding its own "
                                 f"{tuple(tensor.shape)} elements")
        total += size
    limit = 2 * path.stat().st_size + (1 << 20)
    if total > limit:
        raise ModelFileError(f"{path}: its tensors hold {total} bytes, more than the file's "
                             f"{path.stat().st_size} can carry")


def _checkpoint_metadata(loaded: object) -> dict[str, str]:
    """A training checkpoint's ``meta`` entries (mmcv writes its dataset's ``CLASSES`` and ``PALETTE``
    there) as strings, lists and numbers as JSON; anything else is left out."""
    meta = loaded.get("meta") if isinstance(loaded, dict) else None
    if not isinstance(meta, dict):
        return {}
    metadata: dict[str, str] = {}
    for key, value in meta.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, str):
            metadata[key] = value
            continue
        try:
            metadata[key] = json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            continue
    return metadata


def read_module_state(
    source: TensorFile, rules: Sequence[KeyRule], prefix: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Read the tensors ``rules`` need from ``source`` as a module state dict in ``dtype``.

    Raises ModelFileError naming the file and the first missing keys when any
    required LDM key is absent.
    """
    missing = [prefix + rule.ldm_key for rule in rules if prefix + rule.ldm_key not in source.shapes]
    if missing:
        raise ModelFileError(missing_message(source.path, missing))
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = source.read(prefix + rule.ldm_key)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state.update(zip(rule.module_keys, rule.to_module(tensor), strict=True))
    return state


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct a module without allocating or initialising its weights."""
    with torch.device("meta"):
        return factory()


def check_fit(skeleton: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """ModelFileError (``what``, then the first key that differs) unless a file's tensor names and
    shapes are exactly those of ``skeleton``'s state dict (built on the meta device: nothing allocated)."""
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    for key in sorted(set(expected) | set(shapes)):
        if expected.get(key) != shapes.get(key):
            raise ModelFileError(f"{what}: {key} is {shapes.get(key)} in the file, {expected.get(key)} "
                                 "in the network")


def assemble_module(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path
) -> torch.nn.Module:
    """Give a meta-device module its weights (no copy), then freeze it in eval mode.

    Non-persistent ``position_ids`` buffers (transformers CLIP) are rebuilt.
    Raises ModelFileError when a tensor's shape does not fit the module.
    """
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: weights do not fit the inferred architecture: {error}") from error
    for submodule in module.modules():
        position_ids = submodule._buffers.get("position_ids")
        if position_ids is not None and position_ids.is_meta:
            submodule.position_ids = torch.arange(position_ids.shape[-1]).expand(1, -1)
    leftover = [
        name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta
    ]
    if leftover:
        raise ModelFileError(f"{path}: no weights for {leftover[:MISSING_KEYS_SHOWN]}")
    module.eval()
    module.requires_grad_(False)
    return module
