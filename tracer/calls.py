"""Recorded calls, and how one becomes a recipe step.

A :class:`CallRecord` keeps what identifies a call (operation, class, file,
arguments that differ from their defaults) as Python values. Turning it into
a :class:`~diffsplit.tracer.recipe.Step` happens only when a recipe is asked
for: files are then hashed (or looked up in the store) and model-valued
arguments (``vae=my_vae``, a graph loader's ``model`` input) become nested
recipes through a :class:`ValueEncoder`.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from diffsplit.tracer.errors import NotOffloadable
from diffsplit.tracer.fingerprint import WeightSnapshot
from diffsplit.tracer.hub_cache import loader_path
from diffsplit.tracer.known_loaders import NON_IDENTITY_KWARGS, CallKind, KnownFunction, ResolvedFunction
from diffsplit.tracer.marks import import_name
from diffsplit.tracer.recipe import FileRef, Recipe, Step, file_value, recipe_value

#: Keywords whose string values are dtype names in a recipe.
DTYPE_KEYWORDS: frozenset[str] = frozenset({"dtype", "torch_dtype"})
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


class _Missing(enum.Enum):
    MISSING = "missing"


MISSING = _Missing.MISSING


@dataclass(frozen=True)
class LocalFile:
    """A file or folder on this machine, named by a call's argument."""

    path: Path


@dataclass(frozen=True, eq=False)
class CallRecord:
    """One recorded loader, mutator or placement call.

    ``file`` is the raw value of the argument naming the file read (MISSING
    when the function reads none); ``from_dtype`` is the subject's dtype before
    a ``torch.to`` conversion (to drop lossless round trips);
    ``argument_states`` holds, by ``id``, the tensors of every argument that
    has some, as they were when the call started; ``files_read`` the files
    inside a loader's folder that the call read (``tracer.file_reads``; empty:
    not known, the recipe names the whole folder).
    """

    index: int
    op: str
    kind: CallKind
    label: str
    cls: str | None = None
    file: Any = MISSING
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    from_dtype: torch.dtype | None = None
    argument_states: Mapping[int, WeightSnapshot] = field(default_factory=dict)
    files_read: tuple[Path, ...] = ()

    def summary(self) -> str:
        """``label(file, key=value, …)`` for reports, without hashing anything."""
        shown = []
        if self.file is not MISSING:
            shown.append(_short_value(self.file))
        shown.extend(_short_value(value) for value in self.args)
        shown.extend(f"{key}={_short_value(value)}" for key, value in self.kwargs.items())
        return f"{self.label}({', '.join(shown)})"


def _short_value(value: Any) -> str:
    if isinstance(value, str | os.PathLike) and (
        os.sep in str(value) or str(value).endswith(_MODEL_SUFFIXES)
    ):
        return Path(value).name
    if isinstance(value, LocalFile):
        return value.path.name
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, bool | int | float | str) or value is None:
        return repr(value)
    if isinstance(value, list | tuple) and len(value) <= 4:
        return "[" + ", ".join(_short_value(item) for item in value) + "]"
    return type(value).__name__


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def _first_dtype(subject: Any) -> torch.dtype | None:
    if isinstance(subject, torch.nn.Module):
        for tensor in subject.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
    return None


def _same(value: Any, default: Any) -> bool:
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except (TypeError, ValueError, RuntimeError):
        return False


def _local_path(value: Any) -> Any:
    """A LocalFile for a PathLike, or for a string that names an existing model file or absolute path."""
    if isinstance(value, os.PathLike):
        return LocalFile(Path(value).absolute())
    names_file = isinstance(value, str) and (os.path.isabs(value) or value.endswith(_MODEL_SUFFIXES))
    if names_file and os.path.exists(value):
        return LocalFile(Path(value).absolute())
    return value


def _loader_file(value: Any, arguments: Mapping[str, Any]) -> Any:
    """A loader's path argument as a LocalFile when it names a file here: relative paths and hub ids too.

    A hub id resolves to its snapshot in the local Hugging Face cache (read only, at the revision asked).
    """
    if isinstance(value, str):
        found = loader_path(value, _text_option(arguments, "revision"), _text_option(arguments, "cache_dir"))
        if found is not None:
            return LocalFile(found)
    return _local_path(value)


def _text_option(arguments: Mapping[str, Any], name: str) -> str | None:
    """A str-valued keyword of a call, given by name or through ``**kwargs``."""
    extra = arguments.get("kwargs")
    value = arguments.get(name, extra.get(name) if isinstance(extra, Mapping) else None)
    return str(value) if isinstance(value, str | os.PathLike) else None


def _identity(spec: KnownFunction, name: str) -> bool:
    """Whether argument ``name`` of ``spec``'s function is part of what it builds."""
    return name not in NON_IDENTITY_KWARGS or name in spec.identity_kwargs


def capture_argument_states(values: Iterable[Any]) -> dict[int, WeightSnapshot]:
    """Snapshots, by ``id``, of the values that hold tensors (models, state dicts, tensors)."""
    states = {}
    for value in values:
        if value is None or isinstance(value, bool | int | float | str | os.PathLike | type):
            continue
        snapshot = WeightSnapshot.take(value)
        if snapshot.states:
            states[id(value)] = snapshot
    return states


def record_from_call(
    index: int,
    function: ResolvedFunction,
    arguments: Mapping[str, Any],
    kind: CallKind,
    extra: Mapping[str, Any],
) -> CallRecord:
    """The record of a watched call from its arguments (``extra``: keywords the classifier added)."""
    spec = function.spec
    if spec.op == "user.loader":
        marked = arguments["marked"]
        return CallRecord(
            index=index,
            op="user.loader",
            kind="loader",
            label=getattr(marked, "__qualname__", "loader"),
            cls=import_name(marked.__wrapped__),
            args=tuple(_local_path(value) for value in arguments["args"]),
            kwargs={key: _local_path(value) for key, value in arguments["kwargs"].items()},
            argument_states=capture_argument_states((*arguments["args"], *arguments["kwargs"].values())),
        )
    owner = arguments.get(spec.owner_param) if spec.owner_param else None
    subject = arguments.get(spec.subject_param) if spec.subject_param else None
    label = function.qualname
    if owner is not None:
        label = f"{owner.__name__}.{function.qualname.rpartition('.')[2]}"
    elif subject is not None:
        label = f"{type(subject).__name__}.{function.qualname.rpartition('.')[2]}"
    if spec.op == "torch.to":
        return CallRecord(index, spec.op, kind, label, kwargs=dict(extra), from_dtype=_first_dtype(subject))
    skipped = {spec.owner_param, spec.subject_param, spec.file_param}
    kwargs: dict[str, Any] = {}
    for name in function.parameters:
        if name in skipped or name not in arguments or not _identity(spec, name):
            continue
        if name in function.defaults and _same(arguments[name], function.defaults[name]):
            continue
        kwargs[name] = arguments[name]
    if function.varkw:
        for name, value in arguments.get(function.varkw, {}).items():
            if _identity(spec, name):
                kwargs[name] = value
    kwargs.update(extra)
    if spec.op == "diffusers.from_config" and isinstance(kwargs.get("config"), Mapping):
        # private keys (_class_name, _diffusers_version) are ignored by from_config
        kwargs["config"] = {key: value for key, value in kwargs["config"].items() if not key.startswith("_")}
    file = arguments.get(spec.file_param, MISSING) if spec.file_param else MISSING
    args = tuple(arguments.get(function.varargs, ())) if function.varargs else ()
    return CallRecord(
        index=index,
        op=spec.op,
        kind=kind,
        label=label,
        cls=owner.__name__ if owner is not None else None,
        file=_loader_file(file, arguments) if file is not MISSING else MISSING,
        args=args,
        kwargs=kwargs,
        argument_states=capture_argument_states((*args, *kwargs.values(), file)),
    )


class ValueEncoder(Protocol):
    """What turning a record into a step needs: file references and nested recipes."""

    def file_ref(self, path: Path, read: tuple[Path, ...] = ()) -> FileRef:
        """The reference of a local file or folder (``read``: the folder's files a loader read)."""
        ...

    def nested_recipe(self, value: Any) -> Recipe:
        """The recipe of a model-valued argument; raises NotOffloadable."""
        ...


def encode_value(value: Any, encoder: ValueEncoder, where: str, key: str | None = None) -> Any:
    """A call argument as a recipe value (JSON, ``$file``, ``$recipe``); NotOffloadable if impossible."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotOffloadable(where, f"argument {key or ''} is {value}, which a recipe cannot hold")
        return value
    if isinstance(value, torch.dtype):
        if key not in DTYPE_KEYWORDS:
            raise NotOffloadable(where, f"a dtype is passed as {key or 'a positional argument'}; pass dtype=")
        return dtype_name(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, enum.Enum):
        return encode_value(value.value, encoder, where, key)
    value = _local_path(value)
    if isinstance(value, LocalFile):
        if not value.path.exists():
            raise NotOffloadable(where, f"{value.path.name} no longer exists")
        return file_value(encoder.file_ref(value.path))
    if isinstance(value, list | tuple) and not _holds_tensors(value):
        return [encode_value(item, encoder, where, key) for item in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value) and not _holds_tensors(value):
        return {k: encode_value(item, encoder, where, k) for k, item in value.items()}
    return recipe_value(encoder.nested_recipe(value))


def _holds_tensors(container: Any) -> bool:
    items = container.values() if isinstance(container, Mapping) else container
    return any(isinstance(item, torch.Tensor | torch.nn.Module) for item in items)


def to_step(record: CallRecord, encoder: ValueEncoder, *, on: str | None) -> Step:
    """The recipe step of ``record`` (``on``: path of the mutated object, None for loaders)."""
    where = record.summary()
    file_ref: FileRef | None = None
    args = [encode_value(value, encoder, where) for value in record.args]
    if record.file is not MISSING:
        if isinstance(record.file, LocalFile):
            if not record.file.path.exists():
                raise NotOffloadable(where, f"{record.file.path.name} no longer exists")
            file_ref = encoder.file_ref(record.file.path, record.files_read)
        elif isinstance(record.file, str):
            raise NotOffloadable(
                where,
                f"it loaded {record.file!r}, which is not a local file or folder "
                "(neither a path here nor a repository in the local Hugging Face cache)",
            )
        else:
            args.insert(0, encode_value(record.file, encoder, where))
    kwargs = {key: encode_value(value, encoder, where, key) for key, value in record.kwargs.items()}
    return Step(op=record.op, cls=record.cls, file=file_ref, args=tuple(args), kwargs=kwargs, on=on)
