"""The two functions through which marked user code runs, so the tracer can watch them.

``@diffsplit.loader`` functions run through :func:`run_loader` and
``@diffsplit.node`` steps through :func:`run_node`. Their code objects are in
the recorder's watch list (see ``known_loaders.MARK_FUNCTIONS``); outside a
trace they cost one extra call. The objects passed as ``marked`` only need a
``__wrapped__`` attribute (the user's function).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def run_loader(marked: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """Call a ``@loader`` function; recorded as one loader call (calls inside it are not)."""
    return marked.__wrapped__(*args, **kwargs)


def run_node(marked: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """Call a ``@node`` step locally; its inputs are categorized and its model inputs explained."""
    return marked.__wrapped__(*args, **kwargs)


def import_name(function: Any) -> str:
    """``module:qualname`` of a function, the name a worker imports it by."""
    return f"{function.__module__}:{function.__qualname__}"
