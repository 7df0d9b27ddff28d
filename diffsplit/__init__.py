"""diffsplit: split diffusion workflows between this machine and remote GPU workers.

The public names load lazily, so ``import diffsplit`` stays cheap:

- ``tracing()`` / ``trace(fn, *args)``: record a full local run (``diffsplit.tracer``);
- ``workflow``, ``node``, ``loader``: decorators for plain Python code;
- ``offload(pipe, "unet", to=...)``: run part of a diffusers pipeline on a worker;
- ``profile(fn, *args)``: measure the steps of a decorated workflow;
- ``samplers.genie(pipe)``: a GENIE scheduler for a diffusers pipeline (``diffsplit.samplers``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "tracing": "diffsplit.tracer.session",
    "trace": "diffsplit.tracer.session",
    "Trace": "diffsplit.tracer.session",
    "workflow": "diffsplit.decorators",
    "node": "diffsplit.decorators",
    "loader": "diffsplit.decorators",
    "offload": "diffsplit.api",
    "profile": "diffsplit.profiles.api",
}

#: Submodules reached as attributes (``diffsplit.samplers.genie``), imported on first use.
_SUBMODULES = ("samplers",)

__all__ = [*sorted(_EXPORTS), *_SUBMODULES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f"diffsplit.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffsplit' has no attribute {name!r}")
    return getattr(import_module(module), name)
