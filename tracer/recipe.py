"""Recipes: plain, versioned data that tells a worker how to rebuild one model object.

A recipe is a list of steps (loader calls, then mutator calls on what they
built), an attribute path that selects the object inside what was built, and
a fingerprint of the object's weights. Files are named by store-relative name,
sha256 and size, never by a local path. Step arguments are JSON values, where a
few tagged objects carry what JSON cannot:

- ``{"$file": {...}}``: a :class:`FileRef` (the worker passes its own path);
- ``{"$recipe": {...}}``: a nested recipe (a model argument, e.g. ``vae=`` or a
  graph loader's ``model`` input), built first;
- ``{"$dtype": "float16"}`` never appears: dtypes travel as plain names
  (``"float16"``) under the ``dtype``/``torch_dtype`` keywords.

Example::

    {"v": 1,
     "steps": [{"op": "diffusers.from_pretrained", "cls": "StableDiffusionPipeline",
                "file": {"folder": "diffusers", "name": "tiny-sd15", "kind": "dir",
                         "sha256": "…", "bytes": 25000000},
                "kwargs": {"torch_dtype": "float16"}},
               {"op": "diffusers.load_lora_weights", "on": "",
                "file": {…}, "kwargs": {"adapter_name": "style"}}],
     "select": "unet",
     "fingerprint": "…"}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from diffsplit.tracer.errors import RecipeError

RECIPE_VERSION = 1
FILE_TAG = "$file"
RECIPE_TAG = "$recipe"

FileKind = Literal["file", "dir"]


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no whitespace: the same text in every process."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def split_path(path: str) -> tuple[str, ...]:
    """The segments of a dotted attribute path (``""`` is the object itself)."""
    return tuple(path.split(".")) if path else ()


def join_path(*paths: str) -> str:
    """Dotted paths joined, skipping empty ones: ``join_path("", "unet", "conv_in") == "unet.conv_in"``."""
    return ".".join(p for p in paths if p)


def paths_overlap(first: str, second: str) -> bool:
    """Whether one path lies inside the other (an object and its parts overlap)."""
    a, b = split_path(first), split_path(second)
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


@dataclass(frozen=True)
class FileRef:
    """A model file (or diffusers folder) as the worker's store knows it.

    ``name`` is relative to the store folder ``folder`` (``None`` when the file
    lies outside any store). For ``kind == "dir"``, ``sha256`` is a digest over
    the folder's files (see :func:`diffsplit.tracer.files.directory_digest`).
    """

    name: str
    sha256: str
    bytes: int
    folder: str | None = None
    kind: FileKind = "file"

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith("/") or "\\" in self.name:
            raise RecipeError(f"file name {self.name!r} must be a store-relative name")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise RecipeError(f"file {self.name!r} has a malformed sha256 {self.sha256!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``folder`` and ``kind`` are left out when they hold their defaults."""
        data: dict[str, Any] = {"name": self.name, "sha256": self.sha256, "bytes": self.bytes}
        if self.folder is not None:
            data["folder"] = self.folder
        if self.kind != "file":
            data["kind"] = self.kind
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileRef:
        """The inverse of :meth:`to_dict`; RecipeError on malformed data."""
        try:
            kind = data.get("kind", "file")
            if kind not in ("file", "dir"):
                raise RecipeError(f"unknown file kind {kind!r}")
            return cls(
                name=str(data["name"]),
                sha256=str(data["sha256"]),
                bytes=int(data["bytes"]),
                folder=data.get("folder"),
                kind=kind,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(f"malformed file reference {dict(data)!r}: {exc}") from None

    @property
    def store_name(self) -> str:
        """``folder/name`` (or just ``name``), for messages."""
        return f"{self.folder}/{self.name}" if self.folder else self.name

    def short(self) -> str:
        """``name sha256:ab12cd34…`` for reports."""
        return f"{self.name} sha256:{self.sha256[:8]}…"


@dataclass(frozen=True)
class Step:
    """One call of a recipe.

    ``op`` names an allowed operation (``diffusers.from_pretrained``,
    ``diffusers.set_adapters``, ``comfy.node``…). ``cls`` is the class the
    operation is called on (a diffusers class name, an engine node class name,
    a ``@loader`` function's import name). ``on`` is set for mutators: the path,
    inside the value built so far, of the object they act on (``""`` = the value
    itself). ``args``/``kwargs`` hold JSON values and tagged objects.
    """

    op: str
    cls: str | None = None
    file: FileRef | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    on: str | None = None

    @property
    def is_mutator(self) -> bool:
        """Whether the step acts on the value built so far (instead of building a new one)."""
        return self.on is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain data; empty fields are left out to keep recipes small."""
        data: dict[str, Any] = {"op": self.op}
        if self.cls is not None:
            data["cls"] = self.cls
        if self.on is not None:
            data["on"] = self.on
        if self.file is not None:
            data["file"] = self.file.to_dict()
        if self.args:
            data["args"] = [_thaw(value) for value in self.args]
        if self.kwargs:
            data["kwargs"] = {key: _thaw(value) for key, value in self.kwargs.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Step:
        """The inverse of :meth:`to_dict`; RecipeError on malformed data."""
        if not isinstance(data, Mapping) or not isinstance(data.get("op"), str):
            raise RecipeError(f"a recipe step needs a string 'op': {data!r}")
        unknown = set(data) - {"op", "cls", "on", "file", "args", "kwargs"}
        if unknown:
            raise RecipeError(f"recipe step {data['op']!r} has unknown fields {sorted(unknown)}")
        kwargs = data.get("kwargs", {})
        args = data.get("args", [])
        if not isinstance(kwargs, Mapping) or not isinstance(args, list):
            raise RecipeError(f"recipe step {data['op']!r}: args must be a list and kwargs an object")
        return cls(
            op=data["op"],
            cls=data.get("cls"),
            file=FileRef.from_dict(data["file"]) if data.get("file") is not None else None,
            args=tuple(args),
            kwargs=dict(kwargs),
            on=data.get("on"),
        )

    def files(self) -> Iterator[FileRef]:
        """Every file this step reads, nested recipes included."""
        if self.file is not None:
            yield self.file
        for value in (*self.args, *self.kwargs.values()):
            yield from _files_in(value)


@dataclass(frozen=True)
class Recipe:
    """How to rebuild one model object: steps, the path that selects it, a fingerprint of its weights."""

    steps: tuple[Step, ...]
    select: str = ""
    fingerprint: str | None = None
    v: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps:
            raise RecipeError("a recipe needs at least one step")
        if self.steps[0].is_mutator:
            raise RecipeError(f"a recipe must start with a loader, not the mutator {self.steps[0].op!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        data: dict[str, Any] = {"v": self.v, "steps": [step.to_dict() for step in self.steps]}
        if self.select:
            data["select"] = self.select
        if self.fingerprint is not None:
            data["fingerprint"] = self.fingerprint
        return data

    def to_json(self, *, indent: int | None = None) -> str:
        """The recipe as JSON text (canonical when ``indent`` is None)."""
        if indent is None:
            return canonical_json(self.to_dict())
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """The inverse of :meth:`to_dict`; RecipeError on malformed data or another version."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe is a JSON object, not {type(data).__name__}")
        version = data.get("v")
        if version != RECIPE_VERSION:
            raise RecipeError(
                f"recipe version {version!r} is not supported (this diffsplit reads {RECIPE_VERSION})"
            )
        steps = data.get("steps")
        if not isinstance(steps, list):
            raise RecipeError("a recipe needs a list of steps")
        select = data.get("select", "")
        fingerprint = data.get("fingerprint")
        if not isinstance(select, str) or not (fingerprint is None or isinstance(fingerprint, str)):
            raise RecipeError("a recipe's select and fingerprint must be strings")
        return cls(
            steps=tuple(Step.from_dict(step) for step in steps), select=select, fingerprint=fingerprint
        )

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"a recipe is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def digest(self) -> str:
        """sha256 of the canonical JSON of version, steps and select (the worker's cache key).

        The fingerprint is left out: it is derived from the steps, and a recipe
        made without running anything (a dry trace) has none.
        """
        data = self.to_dict()
        data.pop("fingerprint", None)
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()

    def build_digest(self) -> str:
        """sha256 of version and steps only: recipes that differ only in ``select`` build the same thing."""
        data = {"v": self.v, "steps": [step.to_dict() for step in self.steps]}
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()

    def size_bytes(self) -> int:
        """Size of the canonical JSON in bytes."""
        return len(self.to_json().encode())

    def files(self) -> tuple[FileRef, ...]:
        """Every file the recipe reads (nested recipes included), first use first, without repeats."""
        seen: dict[tuple[str, str], FileRef] = {}
        for step in self.steps:
            for ref in step.files():
                seen.setdefault((ref.sha256, ref.name), ref)
        return tuple(seen.values())

    def with_select(self, select: str, fingerprint: str | None) -> Recipe:
        """The same build with another selected path; mutators on disjoint parts are dropped."""
        kept = tuple(
            step for step in self.steps if not step.is_mutator or paths_overlap(step.on or "", select)
        )
        return replace(self, steps=kept, select=select, fingerprint=fingerprint)

    def name(self) -> str:
        """A short human name: the first step's class and file, and the select path."""
        first = self.steps[0]
        what = first.cls or first.op
        if first.file is not None:
            what += f"({first.file.name})"
        return f"recipe {self.digest()[:12]} [{what}{' → ' + self.select if self.select else ''}]"


def file_value(ref: FileRef) -> dict[str, Any]:
    """A FileRef as a tagged step argument."""
    return {FILE_TAG: ref.to_dict()}


def recipe_value(recipe: Recipe) -> dict[str, Any]:
    """A nested recipe as a tagged step argument."""
    return {RECIPE_TAG: recipe.to_dict()}


def tagged(value: Any) -> tuple[str, Any] | None:
    """``(tag, payload)`` if ``value`` is a tagged object (``{"$file": …}``), else None."""
    if isinstance(value, Mapping) and len(value) == 1:
        ((key, payload),) = value.items()
        if key in (FILE_TAG, RECIPE_TAG):
            return key, payload
    return None


def _files_in(value: Any) -> Iterator[FileRef]:
    tag = tagged(value)
    if tag is not None:
        kind, payload = tag
        if kind == FILE_TAG:
            yield FileRef.from_dict(payload)
        else:
            yield from Recipe.from_dict(payload).files()
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _files_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _files_in(item)


def _thaw(value: Any) -> Any:
    """A JSON value with tuples turned into lists and mappings into dicts."""
    if isinstance(value, Mapping):
        return {str(key): _thaw(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(item) for item in value]
    return value
