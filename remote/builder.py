"""Models from recipes on the worker: files found in the store by sha256, built through the cache."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.store import ModelStore
from diffsplit.remote.cache import ModelCache
from diffsplit.remote.errors import BadRequest, MissingModel
from diffsplit.tracer.errors import FingerprintMismatch, RecipeError
from diffsplit.tracer.recipe import FileRef, Recipe


class ModelBuilder:
    """Builds the model a recipe describes, once per recipe digest (nested recipes too)."""

    def __init__(self, store: ModelStore, registry: NodeRegistry, cache: ModelCache) -> None:
        self.store = store
        self.registry = registry
        self.cache = cache
        self._lock = threading.Lock()
        self._recipes: dict[int, tuple[Any, Mapping[str, Any]]] = {}

    def build(self, recipe_data: Mapping[str, Any]) -> Any:
        """The object for ``recipe_data`` (a recipe as plain data), from the cache or built now."""
        try:
            recipe = Recipe.from_dict(recipe_data)
        except RecipeError as exc:
            raise BadRequest(f"malformed recipe: {exc}") from exc
        value = self.build_recipe(recipe)
        with self._lock:
            self._recipes[id(value)] = (value, recipe_data)
        return value

    def build_recipe(self, recipe: Recipe) -> Any:
        """Build (or find) a parsed recipe; nested recipes come through here as well."""
        from diffsplit.engine.rebuild import build

        def make() -> Any:
            try:
                return build(
                    recipe, self.resolve_file, registry=self.registry, build_nested=self.build_recipe
                )
            except FingerprintMismatch as exc:
                raise BadRequest(f"rebuilt model does not match the client's: {exc}") from exc

        value, _ = self.cache.get_or_build(recipe.digest, make)
        return value

    def resolve_file(self, ref: FileRef) -> Path:
        """The store's file for ``ref``: by sha256 first, then by name with a matching hash."""
        try:
            return self.store.find(sha256=ref.sha256, name=ref.name.rpartition("/")[2], folder=ref.folder,
                                   size=ref.bytes)
        except ModelFileError:
            raise MissingModel(ref.store_name, ref.sha256, ref.bytes) from None

    def recipe_of(self, value: Any) -> Mapping[str, Any] | None:
        """The recipe a model built here came from (to send a model-holding output back), or None."""
        with self._lock:
            known = self._recipes.get(id(value))
        return known[1] if known is not None and known[0] is value else None
