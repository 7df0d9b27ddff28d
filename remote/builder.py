"""Models from recipes on the worker: files found in the store by sha256, built through the cache.

The engine's :class:`~diffsplit.engine.rebuild.Builder` runs recipe steps; this
subclass puts every build (nested recipes too: the base model under a LoRA)
into the worker's LRU :class:`ModelCache`, keyed by the recipe's build digest,
so a base shared by two LoRA recipes is built once, and evicted like any other
entry when the budget is tight. LoRA application never mutates its input
(``engine.models.lora.apply_lora`` returns new modules), so a cached base stays
intact. Each (build, select, fingerprint) is verified once.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffsplit.engine.dtypes import DtypePolicy
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.folder_views import FolderViews, MissingFolderFile
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.rebuild import Builder, build_key, check_fingerprint
from diffsplit.engine.store import ModelStore
from diffsplit.remote.cache import ModelCache
from diffsplit.remote.content import ContentFiles
from diffsplit.remote.errors import BadRequest, MissingModel
from diffsplit.tracer.errors import FingerprintMismatch, RecipeError
from diffsplit.tracer.objects import get_path
from diffsplit.tracer.recipe import FileRef, Recipe


class CachedBuilder(Builder):
    """A recipe builder whose built objects live in a shared, bounded :class:`ModelCache`."""

    def __init__(self, store: ModelStore, registry: NodeRegistry, cache: ModelCache,
                 master_dtypes: DtypePolicy | None = None, content: ContentFiles | None = None,
                 views: FolderViews | None = None) -> None:
        super().__init__(self.resolve_file, registry=registry, master_dtypes=master_dtypes)
        self.store = store
        self.content = content
        #: folders assembled from files found by sha256 (the store's, then a Hugging Face cache's)
        self.views = views if views is not None else FolderViews([store.find_file])
        self.cache = cache
        self._lock = threading.Lock()
        self._verified: set[tuple[str, str, str]] = set()

    def build(self, recipe: Recipe) -> Any:
        """The object ``recipe`` selects, from the cache or built now, fingerprint checked once.

        The whole recipe is checked against the operations' allowlists first: nothing runs for a
        recipe that names a path, a refused keyword or an operation outside ``tracer.ops.OPS``.
        """
        self.check(recipe)
        key = build_key(recipe, self.registry)
        whole, _ = self.cache.get_or_build(key, lambda: self._run(recipe), name=build_name(recipe))
        try:
            selected = get_path(whole, recipe.select)
        except LookupError as exc:
            raise RecipeError(f"{recipe.name()}: cannot select {recipe.select!r}: {exc}") from None
        if recipe.fingerprint is not None:
            verified = (key, recipe.select, recipe.fingerprint)
            with self._lock:
                known = verified in self._verified
            if not known:
                check_fingerprint(recipe, selected)
                with self._lock:
                    self._verified.add(verified)
        return selected

    def resolve_file(self, ref: FileRef) -> Path:
        """The store's file for ``ref`` (by sha256 first, then by name with a matching hash), else the
        content cache's file of that sha256 (what a client sent by content). A folder reference that
        lists its files is assembled from files found by sha256 in any layout."""
        if ref.files:
            try:
                return self.views.view(ref)
            except MissingFolderFile as missing:
                raise MissingModel(missing.name, missing.item.sha256, missing.item.bytes) from None
        try:
            return self.store.find(sha256=ref.sha256, name=ref.name.rpartition("/")[2], folder=ref.folder,
                                   size=ref.bytes)
        except ModelFileError:
            found = self.content.find(ref) if self.content is not None else None
            if found is not None:
                return found
            raise MissingModel(ref.store_name, ref.sha256, ref.bytes) from None


#: The longest name a cache entry gets (a deep LoRA stack would make a very long one).
MAX_NAME_CHARS = 200


def build_name(recipe: Recipe) -> str:
    """What a recipe builds, for status reports: each step's class and the files it reads itself,
    nested recipes (the base under a LoRA) in brackets. Store-relative names only."""
    parts = []
    for step in recipe.steps:
        values = (step.file, *step.args, *step.kwargs.values())
        files = [value.name for value in values if isinstance(value, FileRef)]
        bases = [build_name(value) for value in values if isinstance(value, Recipe)]
        text = f"{step.cls or step.op}({', '.join(files)})" if files else (step.cls or step.op)
        parts.append(text + "".join(f" on [{base}]" for base in bases))
    # file names come from peers: escape what is not printable, so a name stays one line in any log
    name = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " + ".join(parts))
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"


class ModelBuilder:
    """What the worker asks for: a model from a recipe given as plain data, and the reverse."""

    def __init__(self, store: ModelStore, registry: NodeRegistry, cache: ModelCache,
                 master_dtypes: DtypePolicy | None = None, content: ContentFiles | None = None,
                 views: FolderViews | None = None) -> None:
        self.builder = CachedBuilder(store, registry, cache, master_dtypes, content, views)
        self._lock = threading.Lock()
        self._recipes: weakref.WeakKeyDictionary[Any, Mapping[str, Any]] = weakref.WeakKeyDictionary()

    def build(self, recipe_data: Mapping[str, Any]) -> Any:
        """The object for ``recipe_data`` (a recipe as plain data); BadRequest when it cannot be built."""
        try:
            recipe = Recipe.from_dict(recipe_data)
            value = self.builder.build(recipe)
        except FingerprintMismatch as exc:
            raise BadRequest(f"the rebuilt model differs from the client's (weights differ): {exc}") from exc
        except RecipeError as exc:
            if isinstance(exc.__cause__, MissingModel):
                raise exc.__cause__ from None
            raise BadRequest(f"cannot build the recipe: {exc}") from exc
        with self._lock, contextlib.suppress(TypeError):  # not every value can be weakly referenced
            self._recipes[value] = recipe_data
        return value

    def recipe_of(self, value: Any) -> Mapping[str, Any] | None:
        """The recipe a model built here came from (to send a model-holding output back), or None."""
        with self._lock:
            try:
                return self._recipes.get(value)
            except TypeError:
                return None
