"""The decorators of the public API: ``@workflow``, ``@node`` and ``@loader``.

- ``@workflow`` marks a function whose full local run is traced:
  ``generate.trace(*args) -> Trace``; a plain call ``generate(*args)`` runs
  traced too, with its ``@node(remote=...)`` steps on their workers.
- ``@node`` (or ``@node(remote="tcp://gpu:5555")``) marks a step: inside a
  trace its inputs are categorized and its model inputs explained. The remote
  address is stored on the wrapper (``denoise.remote``). Such a step runs on
  that worker when called from a plain ``@workflow`` call (or inside
  ``tracing(offload_nodes=True)``, or outside any trace): code pickled by
  value, only over CURVE to a ``--trust-code`` worker, model arguments as
  recipes of the active trace. Inside ``.trace()`` it runs locally.
- ``@loader`` marks a user function that loads a model, so the tracer records
  it as one loader call (a worker imports it by ``module:qualname``).

The wrappers keep the function's name, docstring and ``__wrapped__``, and work
on methods too.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, overload

from diffsplit.tracer.marks import import_name, run_loader, run_node
from diffsplit.tracer.recorder import active_listener
from diffsplit.tracer.session import Trace, trace, tracing
from diffsplit.transport.auth import ClientCurve, client_curve_from_environment


class _Marked:
    """Shared behaviour of the wrappers: metadata of the wrapped function, binding as a method."""

    def __init__(self, function: Callable[..., Any]) -> None:
        if not callable(function):
            raise TypeError(f"{type(self).__name__} needs a function, got {type(function).__name__}")
        functools.update_wrapper(self, function)
        self.__wrapped__ = function

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return types.MethodType(self, instance)

    @property
    def import_name(self) -> str:
        """``module:qualname`` of the wrapped function."""
        return import_name(self.__wrapped__)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.import_name}>"


class WorkflowFunction(_Marked):
    """A ``@workflow`` function: a plain call runs ``@node(remote=...)`` steps on their workers."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if active_listener() is not None:  # already inside a trace: that trace decides
            return self.__wrapped__(*args, **kwargs)
        with tracing(offload_nodes=True):
            return self.__wrapped__(*args, **kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Trace:
        """Run the function once, traced; the result is in ``.result``."""
        return trace(self.__wrapped__, *args, **kwargs)


class NodeFunction(_Marked):
    """A ``@node`` step; ``remote`` is the worker address it may run on (None: local only)."""

    def __init__(
        self, function: Callable[..., Any], remote: str | None = None, curve: ClientCurve | None = None
    ) -> None:
        super().__init__(function)
        if remote is not None and not isinstance(remote, str):
            raise TypeError(f"remote must be an address string such as 'tcp://gpu:5555', not {remote!r}")
        self.remote = remote
        self.curve = curve

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        listener = active_listener()
        if self.remote is None or (listener is not None and not listener.offload_nodes):
            return self.run_locally(*args, **kwargs)
        from diffsplit.engine.call_offload import run_function_remotely

        return run_function_remotely(
            self.__wrapped__, args, kwargs, address=self.remote,
            curve=self.curve or client_curve_from_environment(),
        )

    def run_locally(self, *args: Any, **kwargs: Any) -> Any:
        """Run the step in this process (observed by an active trace)."""
        return run_node(self, args, kwargs)


class LoaderFunction(_Marked):
    """A ``@loader`` function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return run_loader(self, args, kwargs)


def workflow(function: Callable[..., Any]) -> WorkflowFunction:
    """Mark a function whose full local run can be traced with ``function.trace(...)``."""
    return WorkflowFunction(function)


@overload
def node(function: Callable[..., Any], /) -> NodeFunction: ...
@overload
def node(
    *, remote: str | None = None, curve: ClientCurve | None = None
) -> Callable[[Callable[..., Any]], NodeFunction]: ...


def node(
    function: Callable[..., Any] | None = None, /, *, remote: str | None = None,
    curve: ClientCurve | None = None,
) -> NodeFunction | Callable[[Callable[..., Any]], NodeFunction]:
    """Mark a step: ``@node`` or ``@node(remote="tcp://gpu:5555")`` (runs there; needs CURVE keys)."""
    if function is not None:
        return NodeFunction(function, remote, curve)
    return lambda inner: NodeFunction(inner, remote, curve)


def loader(function: Callable[..., Any]) -> LoaderFunction:
    """Mark a user function that loads a model, so a trace records it (the worker imports it by name)."""
    return LoaderFunction(function)
