"""Errors of the tracer: unexplainable objects, inputs of no known category, bad recipes."""

from __future__ import annotations

from diffsplit.transport.errors import DiffsplitError


class TracerError(DiffsplitError):
    """Base class of tracer errors."""


class NotOffloadable(TracerError):
    """An object whose provenance the tracer cannot explain, so no recipe can rebuild it.

    ``obj_description`` names the object (its type and, when known, its
    attribute path, e.g. ``UNet2DConditionModel at pipe.unet``); ``reason`` says
    why (weights edited in place, unknown origin, built by hand...).
    """

    def __init__(self, obj_description: str, reason: str) -> None:
        self.obj_description = obj_description
        self.reason = reason
        super().__init__(f"not offloadable: {obj_description}: {reason}")


class UncategorizedInput(TracerError):
    """A node or step input that is neither a plain value, a tensor container nor a model."""

    def __init__(self, input_name: str, type_name: str, *, where: str | None = None) -> None:
        self.input_name = input_name
        self.type_name = type_name
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}input '{input_name}' is a {type_name}, which is neither a plain value, "
            "a tensor container nor a model"
        )


class RecipeError(TracerError):
    """A recipe is malformed, names an operation that is not allowed, or cannot be built."""


class FingerprintMismatch(RecipeError):
    """A model rebuilt from a recipe does not have the weights the recipe was made from."""

    def __init__(self, recipe_name: str, expected: str, actual: str) -> None:
        self.recipe_name = recipe_name
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"rebuilding {recipe_name} gave different weights: fingerprint {actual[:16]}…, "
            f"the recipe expects {expected[:16]}… (a file or library version differs)"
        )
