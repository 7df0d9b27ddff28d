"""Recipes: plain, versioned data that tells a worker how to rebuild one model object.

A recipe is a list of steps (loader calls, then mutator calls on what they
built), an attribute path that selects the object inside what was built, and
a fingerprint of the object's weights. Files are named by store-relative name,
sha256 and size, never by a local path.

Recipes are values: deeply immutable and hashable. A step's arguments are
frozen when it is made (mappings become :class:`FrozenMap`, lists tuples), and
the tagged objects of the plain form become objects, so a recipe is parsed
once, when it comes off the wire or out of a file, and its digests are
computed once. In the plain (JSON) form, tagged objects carry what JSON cannot:

- ``{"$file": {...}}``: a :class:`FileRef` (the worker passes its own path);
- ``{"$recipe": {...}}``: a nested :class:`Recipe` (a model argument, e.g.
  ``vae=`` or a graph loader's ``model`` input), built first;
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

import functools
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from diffsplit.tracer.errors import RecipeError

RECIPE_VERSION = 1
FILE_TAG = "$file"
RECIPE_TAG = "$recipe"

FileKind = Literal["file", "dir"]
#: The most files a folder reference may list (a diffusers pipeline reads about fifteen).
MAX_FOLDER_FILES = 256


def relative_name_problem(name: object) -> str | None:
    """What keeps ``name`` from being a plain store-relative name (``a/b.safetensors``), or None.

    Refused: empty names, absolute paths (``/x``, ``C:x``), backslashes, NUL
    characters and empty, ``.`` or ``..`` segments.
    """
    if not isinstance(name, str) or not name:
        return "is empty"
    if "\x00" in name or "\\" in name:
        return "holds a NUL character or a backslash"
    if name.startswith("/") or (len(name) > 1 and name[0].isascii() and name[0].isalpha() and name[1] == ":"):
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' segment"
    return None


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


class FrozenMap(Mapping[str, Any]):
    """An immutable, hashable mapping of string keys to frozen values (a step's keyword arguments)."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items: dict[str, Any] = dict(items or {})
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(sorted(self._items.items())))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._items == other._items
        return isinstance(other, Mapping) and self._items == dict(other)

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


_SHA256_DIGITS = frozenset("0123456789abcdef")


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a sha256 as recipes, stores and uploads write it: 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _SHA256_DIGITS


def _check_sha256(sha256: object, what: str) -> None:
    if not is_sha256(sha256):
        raise RecipeError(f"{what} has a malformed sha256 {sha256!r}")


def _check_size(size: object, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise RecipeError(f"{what} has a malformed size {size!r}")


@dataclass(frozen=True)
class FolderFile:
    """One file of a model folder that a loader read: its path inside the folder, sha256 and size."""

    path: str
    sha256: str
    bytes: int

    def __post_init__(self) -> None:
        reason = relative_name_problem(self.path)
        if reason is not None:
            raise RecipeError(f"a folder file's path {reason}: it must be relative to its folder")
        _check_sha256(self.sha256, f"folder file {self.path!r}")
        _check_size(self.bytes, f"folder file {self.path!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, data: object) -> FolderFile:
        """The inverse of :meth:`to_dict`; RecipeError on malformed data."""
        if not isinstance(data, Mapping) or set(data) != {"path", "sha256", "bytes"}:
            raise RecipeError("a folder file must be an object with exactly path, sha256 and bytes")
        if not isinstance(data["path"], str):
            raise RecipeError("a folder file's path must be a string")
        return cls(path=data["path"], sha256=data["sha256"], bytes=data["bytes"])


def folder_digest(files: tuple[FolderFile, ...]) -> str:
    """The digest of a folder's files: sha256 over ``"<path>\\0<sha256>\\n"`` lines sorted by path.

    The store names a whole model folder by the same digest over all its files.
    """
    lines = "".join(f"{item.path}\0{item.sha256}\n" for item in sorted(files, key=lambda item: item.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def _check_folder_files(files: tuple[FolderFile, ...], sha256: str, total: int) -> None:
    if len(files) > MAX_FOLDER_FILES:
        raise RecipeError(f"a folder reference lists {len(files)} files; at most {MAX_FOLDER_FILES}")
    paths = sorted(item.path for item in files)
    if len(set(paths)) != len(paths):
        raise RecipeError("a folder reference lists one path twice")
    folders = {path.rsplit("/", 1)[0] for path in paths if "/" in path}
    folders |= {folder.rsplit("/", cut)[0] for folder in folders for cut in range(1, folder.count("/") + 1)}
    both = sorted(folders.intersection(paths))
    if both:
        raise RecipeError(f"a folder reference lists {both[0]!r} both as a file and as a folder")
    if folder_digest(files) != sha256:
        raise RecipeError("a folder reference's sha256 is not the digest of the files it lists")
    if sum(item.bytes for item in files) != total:
        raise RecipeError("a folder reference's bytes are not the sum of the files it lists")


@dataclass(frozen=True)
class FileRef:
    """A model file (or diffusers folder) as the worker's store knows it.

    ``name`` is relative to the store folder ``folder`` (``None`` when the file
    lies outside any store). For ``kind == "dir"``, ``sha256`` is a digest over
    the folder's files (see :func:`folder_digest`). A folder reference made by
    the tracer lists in ``files`` the files its loader read (each by path, sha256
    and size): the digest then covers only those, and a worker assembles the
    folder from files it finds by sha256 in any layout (``name`` is a hint).
    Without ``files`` the reference names a whole folder.
    """

    name: str
    sha256: str
    bytes: int
    folder: str | None = None
    kind: FileKind = "file"
    files: tuple[FolderFile, ...] = ()

    def __post_init__(self) -> None:
        # the name is only a hint (the worker finds files by sha256), but it is never a path: the
        # refusal does not echo it, so an error text never repeats a path a peer tried
        reason = relative_name_problem(self.name)
        if reason is not None:
            raise RecipeError(
                f"a file reference's name {reason}: it must be a store-relative name "
                "(the name the store lists, e.g. 'sd15/model.safetensors'), never a path"
            )
        if self.folder is not None and (relative_name_problem(self.folder) is not None or "/" in self.folder):
            raise RecipeError("a file reference's folder must be one store folder name (e.g. 'loras')")
        _check_sha256(self.sha256, f"file {self.name!r}")
        _check_size(self.bytes, f"file {self.name!r}")
        object.__setattr__(self, "files", tuple(self.files))
        if self.files:
            if self.kind != "dir":
                raise RecipeError(f"file {self.name!r} lists files but is not a folder")
            _check_folder_files(self.files, self.sha256, self.bytes)

    @classmethod
    def folder_of(cls, name: str, files: tuple[FolderFile, ...], folder: str | None = None) -> FileRef:
        """A folder reference listing ``files`` (digest and size computed from them)."""
        ordered = tuple(sorted(files, key=lambda item: item.path))
        return cls(name=name, sha256=folder_digest(ordered), bytes=sum(item.bytes for item in ordered),
                   folder=folder, kind="dir", files=ordered)

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``folder`` and ``kind`` are left out when they hold their defaults."""
        data: dict[str, Any] = {"name": self.name, "sha256": self.sha256, "bytes": self.bytes}
        if self.folder is not None:
            data["folder"] = self.folder
        if self.kind != "file":
            data["kind"] = self.kind
        if self.files:
            data["files"] = [item.to_dict() for item in self.files]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileRef:
        """The inverse of :meth:`to_dict`; RecipeError on malformed data."""
        try:
            kind = data.get("kind", "file")
            if kind not in ("file", "dir"):
                raise RecipeError(f"unknown file kind {kind!r}")
            name, sha256, size, folder = data["name"], data["sha256"], data["bytes"], data.get("folder")
            if not isinstance(name, str) or not isinstance(sha256, str) or not (
                folder is None or isinstance(folder, str)
            ):
                raise RecipeError("a file reference's name, sha256 and folder must be strings")
            if isinstance(size, bool) or not isinstance(size, int):
                raise RecipeError("a file reference's bytes must be an integer")
            listed = data.get("files", [])
            if not isinstance(listed, list | tuple) or len(listed) > MAX_FOLDER_FILES:
                raise RecipeError(f"a folder reference's files must be a list of at most {MAX_FOLDER_FILES}")
            files = tuple(FolderFile.from_dict(item) for item in listed)
            return cls(name=name, sha256=sha256, bytes=size, folder=folder, kind=kind, files=files)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(f"malformed file reference: missing or bad field {exc}") from None

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(freeze(value) for value in self.args))
        if not isinstance(self.kwargs, Mapping):
            raise RecipeError(f"recipe step {self.op!r}: kwargs must be a mapping")
        frozen = {str(key): freeze(value) for key, value in self.kwargs.items()}
        object.__setattr__(self, "kwargs", FrozenMap(frozen))

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
            data["args"] = [thaw(value) for value in self.args]
        if self.kwargs:
            data["kwargs"] = {key: thaw(value) for key, value in self.kwargs.items()}
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
        for key in ("cls", "on"):
            if not (data.get(key) is None or isinstance(data.get(key), str)):
                raise RecipeError(f"recipe step {data['op']!r}: {key} must be a string")
        if data.get("file") is not None and not isinstance(data["file"], Mapping):
            raise RecipeError(f"recipe step {data['op']!r}: file must be a file reference object")
        return cls(
            op=data["op"],
            cls=data.get("cls"),
            file=FileRef.from_dict(data["file"]) if data.get("file") is not None else None,
            args=tuple(args),
            kwargs=kwargs,
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
        """Plain data (JSON-ready); a new dict each call (the recipe itself never changes)."""
        data: dict[str, Any] = {"v": self.v, "steps": json.loads(self._steps_json)}
        if self.select:
            data["select"] = self.select
        if self.fingerprint is not None:
            data["fingerprint"] = self.fingerprint
        return data

    @functools.cached_property
    def _steps_json(self) -> str:
        """The canonical JSON of the steps, made once."""
        return canonical_json([step.to_dict() for step in self.steps])

    @functools.cached_property
    def _canonical(self) -> str:
        return canonical_json(self.to_dict())

    def to_json(self, *, indent: int | None = None) -> str:
        """The recipe as JSON text (canonical when ``indent`` is None)."""
        if indent is None:
            return self._canonical
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

    @functools.cached_property
    def _digest(self) -> str:
        data = self.to_dict()
        data.pop("fingerprint", None)
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()

    @functools.cached_property
    def _build_digest(self) -> str:
        data = {"v": self.v, "steps": json.loads(self._steps_json)}
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()

    def digest(self) -> str:
        """sha256 of the canonical JSON of version, steps and select (the worker's cache key).

        The fingerprint is left out: it is derived from the steps, and a recipe
        made without running anything (a dry trace) has none. Computed once.
        """
        return self._digest

    def build_digest(self) -> str:
        """sha256 of version and steps only: recipes that differ only in ``select`` build the same thing."""
        return self._build_digest

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
    if isinstance(value, FileRef):
        yield value
    elif isinstance(value, Recipe):
        yield from value.files()
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _files_in(item)
    elif isinstance(value, tuple):
        for item in value:
            yield from _files_in(item)


#: Plain values a step argument may hold besides containers, files and recipes.
_SCALARS = (str, int, float, bool, type(None))


def freeze(value: Any) -> Any:
    """A step argument as an immutable, hashable value: tagged objects become FileRef / Recipe objects."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"a recipe argument cannot be {value} (recipes hold finite numbers only)")
    if isinstance(value, (FileRef, Recipe, *_SCALARS)):
        return value
    tag = tagged(value)
    if tag is not None:
        kind, payload = tag
        if not isinstance(payload, Mapping):
            raise RecipeError(f"a {kind} argument must be an object, not {type(payload).__name__}")
        return FileRef.from_dict(payload) if kind == FILE_TAG else Recipe.from_dict(payload)
    if isinstance(value, Mapping):
        return FrozenMap({str(key): freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    raise RecipeError(f"a recipe argument cannot be a {type(value).__name__}")


def thaw(value: Any) -> Any:
    """The plain (JSON) form of a frozen step argument: objects become tagged mappings."""
    if isinstance(value, FileRef):
        return file_value(value)
    if isinstance(value, Recipe):
        return recipe_value(value)
    if isinstance(value, Mapping):
        return {str(key): thaw(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(item) for item in value]
    return value
