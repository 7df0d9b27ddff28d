"""Checking a recipe against the operations' allowlists, before any of its steps runs.

Every step must name an operation of :data:`diffsplit.tracer.ops.OPS` and
carry only the arguments its :class:`~diffsplit.tracer.ops.OpSpec` declares:
each file a store reference, each keyword on the op's allowlist with a value of
the declared kind. Engine loader nodes (``comfy.node``) are checked against
the node's declared inputs instead: model files are store references, model
inputs nested recipes, widget values in their declared ranges and choices
(``engine.validation``). Nested recipes are checked with the recipe that holds
them, so a recipe that fails anywhere runs nothing.

Refusals never repeat a path-like string the recipe carried: a peer learns
that a path is refused, not whether it exists.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.nodes.base import NodeClass
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.validation import check_node_values
from diffsplit.tracer.errors import RecipeError
from diffsplit.tracer.ops import OPS, REFUSED_KWARGS, ArgRule, OpSpec
from diffsplit.tracer.recipe import FileRef, FrozenMap, Recipe, Step, relative_name_problem

#: Base classes (per library) a recipe's class must derive from.
ALLOWED_BASES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "diffusers": frozenset({"DiffusionPipeline", "ModelMixin", "SchedulerMixin"}),
        "transformers": frozenset({"PreTrainedModel", "PreTrainedTokenizerBase"}),
    }
)
#: dtype names a recipe may use.
ALLOWED_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "float64": torch.float64,
    }
)
_DTYPE_KEYWORDS = frozenset({"dtype", "torch_dtype"})
_VARIANT = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DEVICE = re.compile(r"cpu|mps|cuda(:[0-9]{1,3})?")
_MAX_NAME = 255
_MAX_DEPTH = 16
_MAX_REMEMBERED = 4096
_NO_PATHS = (
    "recipes name files by store reference ({\"$file\": {folder, name, sha256, bytes}}), "
    "which the worker resolves in its own store; they never carry paths"
)


def allowed_class(library: str, name: str | None, bases: frozenset[str] | None = None) -> type:
    """The class ``name`` exported by ``library`` if it is a pipeline/model/scheduler/tokenizer class.

    ``bases`` narrows the allowed base classes further (``{"SchedulerMixin"}``).
    """
    allowed = ALLOWED_BASES.get(library)
    if allowed is None or not name or not name.isidentifier():
        raise RecipeError(f"class {name!r} of {library!r} is not allowed in a recipe")
    if bases is not None:
        allowed = allowed & bases
    module = importlib.import_module(library)
    cls = getattr(module, name, None)
    if not isinstance(cls, type) or not any(
        base.__name__ in allowed and base.__module__.partition(".")[0] == library for base in cls.__mro__
    ):
        kinds = "pipeline, model, scheduler or tokenizer"
        kinds = "scheduler" if bases == frozenset({"SchedulerMixin"}) else kinds
        raise RecipeError(f"{library}.{name} is not a {library} {kinds} class")
    return cls


def derives_from(cls: type, name: str) -> bool:
    """Whether ``cls`` has a base class called ``name``."""
    return any(base.__name__ == name for base in cls.__mro__)


def path_like(value: object) -> bool:
    """Whether a string could name a file or folder (a separator, ``~``, ``.``/``..``, NUL)."""
    return isinstance(value, str) and (
        any(mark in value for mark in ("/", "\\", "\x00")) or value.startswith("~") or value in (".", "..")
    )


def shown(value: object) -> str:
    """``value`` for an error text: a path-like string is not repeated."""
    if path_like(value):
        return "a path-like string"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


class RecipeChecker:
    """Checks recipes (and the recipes nested in them) against :data:`OPS`; remembers what passed."""

    def __init__(self, registry: NodeRegistry | None = None) -> None:
        self.registry = registry
        self._passed: set[str] = set()

    def check(self, recipe: Recipe) -> None:
        """Raise a RecipeError naming the first step and argument that is not allowed."""
        self._check(recipe, 0)

    def _check(self, recipe: Recipe, depth: int) -> None:
        key = recipe.build_digest()
        if key in self._passed:
            return
        if depth > _MAX_DEPTH:
            raise RecipeError(f"{recipe.name()}: recipes are nested more than {_MAX_DEPTH} deep")
        for number, step in enumerate(recipe.steps):
            try:
                _StepCheck(self, step, depth).run()
            except RecipeError as exc:
                op = step.op if step.op in OPS else shown(step.op)
                raise RecipeError(f"{recipe.name()}: step {number} ({op}): {exc}") from None
        if len(self._passed) >= _MAX_REMEMBERED:
            self._passed.clear()
        self._passed.add(key)

    def nested(self, recipe: Recipe, depth: int) -> None:
        """Check a recipe held in a step's argument."""
        self._check(recipe, depth + 1)


class _StepCheck:
    """The checks of one step."""

    def __init__(self, checker: RecipeChecker, step: Step, depth: int) -> None:
        self.checker = checker
        self.step = step
        self.depth = depth

    def run(self) -> None:
        step = self.step
        spec = OPS.get(step.op)
        if spec is None:
            raise RecipeError(f"the unknown operation {shown(step.op)}; allowed: {', '.join(sorted(OPS))}")
        if spec.kind == "mutator" and step.on is None:
            raise RecipeError("a mutator step needs 'on' (the path of the object it changes)")
        if spec.kind == "loader" and step.on is not None:
            raise RecipeError("a loader step builds a new value and takes no 'on'")
        for name, value in step.kwargs.items():
            if name in _DTYPE_KEYWORDS and isinstance(value, str) and value not in ALLOWED_DTYPES:
                known = ", ".join(ALLOWED_DTYPES)
                raise RecipeError(f"keyword {name!r} is the unknown dtype {shown(value)}; known: {known}")
        if step.op == "comfy.node":
            self.check_node()
        elif step.op == "user.loader":
            self.check_user_loader()
        else:
            builds = spec.kind == "loader" and spec.library in ALLOWED_BASES
            cls = allowed_class(spec.library, step.cls, spec.bases) if builds else None
            if spec.kind == "mutator" and spec.bases is not None:
                allowed_class(spec.library, step.cls, spec.bases)  # a mutator run through a named class
            self.check_file(spec)
            self.check_args(spec)
            self.check_kwargs(spec, cls)

    def check_file(self, spec: OpSpec) -> None:
        step = self.step
        if spec.file == "none":
            if step.file is not None:
                raise RecipeError(f"{step.op} reads no file, but the step names one")
            return
        if step.file is not None:
            self.value(spec.file_rule, step.file, "its file")
        elif step.args and isinstance(step.args[0], str):
            raise RecipeError(f"positional argument 0 is a plain string where a file is read: {_NO_PATHS}")
        elif spec.file == "file":
            raise RecipeError(f"{step.op} needs its file as a store reference in 'file'")
        elif not step.args or not isinstance(step.args[0], Recipe):
            raise RecipeError(
                f"{step.op} needs its file as a store reference in 'file', or a nested recipe of its "
                "weights as the first argument"
            )

    def check_args(self, spec: OpSpec) -> None:
        positional = list(self.step.args)
        if spec.file == "file_or_model" and self.step.file is None:
            self.checker.nested(positional.pop(0), self.depth)
        if len(positional) > len(spec.args):
            plain = any(isinstance(value, str) for value in positional)
            raise RecipeError(
                f"{self.step.op} takes {len(spec.args) or 'no'} positional argument(s) here"
                + (f"; a plain string is never read as a file: {_NO_PATHS}" if plain else "")
            )
        for index, (rule, value) in enumerate(zip(spec.args, positional, strict=False)):
            self.value(rule, value, f"positional argument {index}")

    def check_kwargs(self, spec: OpSpec, cls: type | None) -> None:
        step = self.step
        init = _init_parameters(cls) if spec.init_kwargs == "class_init" and cls is not None else frozenset()
        for name, value in step.kwargs.items():
            rule = spec.kwargs.get(name)
            if rule is not None:
                self.value(rule, value, f"keyword {name!r}")
            elif name in REFUSED_KWARGS:
                raise RecipeError(f"keyword {name!r} is refused: {REFUSED_KWARGS[name]}")
            elif name in init and cls is not None:
                self.init_value(cls, name, value)
            else:
                allowed = ", ".join(sorted(spec.kwargs)) or "none"
                extra = f" (or a parameter of {cls.__name__}.__init__)" if init and cls is not None else ""
                plain = isinstance(value, str)
                paths = f"; a plain string is never read as a file: {_NO_PATHS}" if plain else ""
                raise RecipeError(
                    f"keyword {shown(name)} is not allowed for {step.op}; allowed keywords: {allowed}{extra}"
                    + paths
                )
        missing = sorted(spec.required - set(step.kwargs))
        if missing:
            raise RecipeError(f"{step.op} needs the keyword(s) {', '.join(missing)}")

    def init_value(self, cls: type, name: str, value: Any) -> None:
        """A keyword naming a parameter of the class's ``__init__``: a component, option or config value."""
        where = f"keyword {name!r}"
        if derives_from(cls, "DiffusionPipeline"):
            if isinstance(value, Recipe):
                self.checker.nested(value, self.depth)
            elif not (value is None or isinstance(value, bool | int | float)):
                raise RecipeError(
                    f"{where} of {cls.__name__} must be a nested recipe (a component), None, a number "
                    f"or true/false, not {_kind_of(value)}"
                )
        elif derives_from(cls, "SchedulerMixin"):
            self.value(ArgRule("data"), value, where)
        else:
            raise RecipeError(f"{where} is not allowed: {cls.__name__}'s config is not changed from recipes")

    def value(self, rule: ArgRule, value: Any, where: str) -> None:
        """Raise a RecipeError unless ``value`` is of ``rule``'s kind."""
        if value is None and rule.nullable:
            return
        if rule.kind == "file":
            self.file_value(rule, value, where)
        elif rule.kind == "model":
            if not isinstance(value, Recipe):
                raise RecipeError(f"{where} must be a nested recipe, not {_kind_of(value)}")
            self.checker.nested(value, self.depth)
        elif rule.kind in ("data", "config"):
            if rule.kind == "config" and not isinstance(value, FrozenMap):
                raise RecipeError(f"{where} must be a mapping of config values, not {_kind_of(value)}")
            _check_data(value, where, 0)
        else:
            problem = _scalar_problem(rule, value)
            if problem is not None:
                raise RecipeError(f"{where} {problem}")

    def file_value(self, rule: ArgRule, value: Any, where: str) -> None:
        if isinstance(value, str):
            raise RecipeError(f"{where} is a plain string where a file is read: {_NO_PATHS}")
        if not isinstance(value, FileRef):
            raise RecipeError(f"{where} must be a store reference to a file, not {_kind_of(value)}")
        if value.kind == "file" and rule.suffixes and not value.name.lower().endswith(rule.suffixes):
            raise RecipeError(
                f"{where} ({value.store_name}) is not a {'/'.join(rule.suffixes)} file: "
                "pickled weights (.bin, .ckpt, .pt, .pth) are never loaded from recipes"
            )

    def check_user_loader(self) -> None:
        """``@loader`` functions: no plain string positional argument, no path-like string anywhere."""
        step = self.step
        if step.file is not None:
            self.value(ArgRule("file"), step.file, "its file")
        for index, value in enumerate(step.args):
            if isinstance(value, str):
                raise RecipeError(
                    f"positional argument {index} of a @loader is a plain string, which is never read as a "
                    f"file: {_NO_PATHS}"
                )
            self.user_value(value, f"positional argument {index}")
        for name, value in step.kwargs.items():
            self.user_value(value, f"keyword {name!r}")

    def user_value(self, value: Any, where: str) -> None:
        if isinstance(value, Recipe):
            self.checker.nested(value, self.depth)
        elif isinstance(value, FrozenMap | tuple):
            items = value.values() if isinstance(value, FrozenMap) else value
            for item in items:
                self.user_value(item, where)
        elif path_like(value):
            raise RecipeError(f"{where} is a path-like string, which is never read as a file: {_NO_PATHS}")

    def check_node(self) -> None:
        step = self.step
        registry = self.checker.registry
        if registry is None:
            raise RecipeError("a graph recipe needs the node registry")
        if step.cls is None or step.cls not in registry:
            raise RecipeError(f"unknown node class {shown(step.cls)}")
        node_class = registry[step.cls]
        if not node_class.is_loader:
            raise RecipeError(f"{step.cls} is not a loader node and cannot appear in a recipe")
        if step.file is not None or step.args:
            raise RecipeError("a node step takes its inputs as keywords, no 'file' or positional arguments")
        for name, value in step.kwargs.items():
            self.node_input(node_class, name, value)
        for spec in node_class.inputs:
            if not spec.optional and spec.name not in step.kwargs:
                raise RecipeError(f"{node_class.name} input {spec.name!r} ({spec.type}) is missing")

    def node_input(self, node_class: NodeClass, name: str, value: Any) -> None:
        spec = node_class.input(name)
        where = f"{node_class.name} input {shown(name)}"
        if spec is None:
            declared = ", ".join(item.name for item in node_class.inputs) or "(none)"
            raise RecipeError(f"{where} is not declared; {node_class.name} declares: {declared}")
        if spec.model_folder:
            if not isinstance(value, FileRef):
                raise RecipeError(
                    f"{where} names a file in {spec.model_folder}/ and must be a store reference, "
                    f"not {_kind_of(value)}: {_NO_PATHS}"
                )
            return
        if not spec.is_widget:
            if not isinstance(value, Recipe):
                raise RecipeError(f"{where} ({spec.type}) must be a nested recipe, not {_kind_of(value)}")
            self.checker.nested(value, self.depth)
            return
        if not isinstance(value, bool | int | float | str) or path_like(value):
            raise RecipeError(f"{where} ({spec.type}) must be a plain value, not {_kind_of(value)}")
        registry = self.checker.registry
        if registry is None:
            raise RecipeError("a graph recipe needs the node registry")
        try:
            check_node_values(registry, "recipe", node_class.name, {name: value})
        except WorkflowError as exc:
            raise RecipeError(f"{where}: {exc.reason}") from None


def _init_parameters(cls: type) -> frozenset[str]:
    """The named parameters of ``cls.__init__`` (not ``self``, ``*args`` or ``**kwargs``)."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in parameters if p.kind in named and p.name != "self")


def _kind_of(value: Any) -> str:
    if isinstance(value, str):
        return "a path-like string" if path_like(value) else "a plain string"
    if isinstance(value, FileRef):
        return "a file reference"
    if isinstance(value, Recipe):
        return "a nested recipe"
    if isinstance(value, FrozenMap):
        return "a mapping"
    if isinstance(value, tuple):
        return "a list"
    return "null" if value is None else type(value).__name__


def _scalar_problem(rule: ArgRule, value: Any) -> str | None:
    """Why ``value`` is not of ``rule``'s (scalar) kind, or None."""
    kind = rule.kind
    if kind == "dtype":
        known = isinstance(value, str) and value in ALLOWED_DTYPES
        return None if known else f"is the unknown dtype {shown(value)}"
    if kind == "true":
        return None if value is True else f"must be true or left out, not {shown(value)}"
    if kind == "bool":
        return None if isinstance(value, bool) else f"must be true or false, not {_kind_of(value)}"
    if kind in ("number", "int"):
        numeric = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not numeric or (kind == "int" and not isinstance(value, int)):
            return f"must be {'an integer' if kind == 'int' else 'a finite number'}, not {_kind_of(value)}"
        return None
    if kind == "choice":
        return None if value in rule.choices else f"must be one of {', '.join(map(str, rule.choices))}"
    if kind == "device":
        ok = isinstance(value, str) and _DEVICE.fullmatch(value) is not None
        return None if ok else "must be a device name (cpu, cuda, cuda:N, mps)"
    if kind == "variant":
        ok = isinstance(value, str) and _VARIANT.fullmatch(value) is not None
        return None if ok else "must be a variant name (letters, digits, '_' and '-', e.g. fp16)"
    if kind == "names":
        items = value if isinstance(value, tuple) else (value,)
        problems = [_name_problem(item) for item in items]
        return next((problem for problem in problems if problem), None)
    if kind in ("plain_name", "weights_file_name"):
        problem = _name_problem(value)
        if problem is None and kind == "weights_file_name" and not value.lower().endswith(".safetensors"):
            problem = "must name a .safetensors file: pickled weights are never loaded from recipes"
        return problem
    return f"has an argument kind {kind!r} this machine does not know"


def _name_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a plain name, not {_kind_of(value)}"
    if len(value) > _MAX_NAME or relative_name_problem(value) is not None or "/" in value:
        return "must be a plain name (one segment: no '/', '\\', '..'), never a path"
    return None


def _check_data(value: Any, where: str, depth: int) -> None:
    """Plain JSON data: no files, recipes or path-like strings, finite numbers, bounded depth."""
    if depth > _MAX_DEPTH:
        raise RecipeError(f"{where} is nested too deeply")
    if isinstance(value, FileRef | Recipe):
        raise RecipeError(f"{where} must be plain data, not {_kind_of(value)}")
    if isinstance(value, FrozenMap):
        for key, item in value.items():
            _check_data(key, where, depth + 1)
            _check_data(item, where, depth + 1)
    elif isinstance(value, tuple):
        for item in value:
            _check_data(item, where, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where} holds a number that is not finite")
    elif path_like(value):
        raise RecipeError(f"{where} holds a path-like string, which is never read as a file: {_NO_PATHS}")


def check_recipe(recipe: Recipe, registry: NodeRegistry | None = None) -> None:
    """Raise a RecipeError unless every step of ``recipe`` (nested recipes included) is allowed."""
    RecipeChecker(registry).check(recipe)
