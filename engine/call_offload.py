"""Offloading plain diffusers code: a module's forward or a whole pipeline call runs on a worker.

``ModuleOffload`` replaces ``module.forward`` (or, under accelerate hooks,
the ``_old_forward`` they call) with a proxy of the same signature, put back
by ``restore()``, so the pipeline's own code keeps calling ``self.unet(...)``
and each call runs on the worker. ``OffloadedPipeline`` sends whole pipeline calls. Arguments travel like
node inputs (tensors as frames, CPU generators as their state, which is copied
back after the call so the local generator advances exactly as it would have);
the target travels as its recipe, never as weights. PIL results are made on
this side from the worker's numpy output, as diffusers itself does.
"""

from __future__ import annotations

import functools
import io
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffsplit.engine.errors import EngineError
from diffsplit.engine.file_upload import send_file
from diffsplit.engine.untraced_adapters import ContentFile
from diffsplit.engine.value_walk import iter_values
from diffsplit.engine.wire_values import WireValueError, from_wire, to_wire
from diffsplit.tracer.errors import NotOffloadable
from diffsplit.tracer.recorder import active_listener
from diffsplit.transport.auth import ClientCurve, client_curve_from_environment
from diffsplit.transport.compute_threads import client_threads
from diffsplit.transport.errors import TransportError
from diffsplit.transport.pool import Lease, shared_pool
from diffsplit.transport.protocol import Settings
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_errors import (
    MissingModel,
    WorkerError,
    error_from_reply,
    is_error_reply,
    with_context,
)
from diffsplit.transport.worker_ops import Call, CallResult, RunFunction


class OffloadError(EngineError):
    """An offloaded call could not run on its worker."""


def run_function_remotely(
    function: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    address: str,
    curve: ClientCurve | None,
    settings: Settings | None = None,
    timeout_s: float | None = None,
) -> Any:
    """Run a ``@diffsplit.node`` step on a worker started with ``--trust-code``.

    The step's code travels pickled by value (cloudpickle), so the worker needs
    it neither installed nor importable; that is only ever sent over an
    authenticated CURVE connection, and the worker accepts it only from a client
    key on its allow-list. Model arguments travel as the recipes of the trace
    active here (``diffsplit.tracing()`` or ``@workflow(...).trace``).
    """
    import cloudpickle

    if curve is None:
        raise OffloadError(
            f"{getattr(function, '__qualname__', function)}: running code on a worker needs CURVE keys "
            "(node(remote=..., curve=ClientCurve(...)), or the files named by "
            "DIFFSPLIT_CURVE_SERVER_KEY and DIFFSPLIT_CURVE_CLIENT_KEY)"
        )
    session = active_listener()

    def recipe_of(value: Any) -> Mapping[str, Any] | None:
        if session is None:
            return None
        try:
            return session.make_recipe(value).to_dict()
        except NotOffloadable:
            return None

    module = sys.modules.get(getattr(function, "__module__", ""), None)
    if module is not None and module.__name__ != "__main__":
        cloudpickle.register_pickle_by_value(module)
    try:
        code = cloudpickle.dumps(function)
    finally:
        if module is not None and module.__name__ != "__main__":
            cloudpickle.unregister_pickle_by_value(module)
    try:
        wire_args = to_wire(list(args), recipe_of, where="argument")
        wire_kwargs = to_wire(dict(kwargs), recipe_of, where="argument")
    except WireValueError as exc:
        hint = "" if session is not None else " (no trace is active: call it inside diffsplit.tracing())"
        raise OffloadError(f"cannot run {function.__qualname__} remotely: {exc}{hint}") from exc
    request = RunFunction(args=wire_args, kwargs=wire_kwargs, threads=client_threads(),
                          code=torch.frombuffer(bytearray(code), dtype=torch.uint8))
    try:
        lease = shared_pool().lease(address, settings=settings or Settings(), curve=curve)
    except TransportError as exc:
        raise OffloadError(f"worker {address}: {exc}") from exc
    with lease as client:  # one connection per worker for every call: no handshake per call
        reply = _request(client, request.header(), timeout_s)
        if is_error_reply(reply):
            raise _offload_error(client, error_from_reply(reply))
        return _result(reply, args, kwargs)


def _request(client: Client, header: Mapping[str, Any], timeout_s: float | None) -> dict[str, Any]:
    try:
        return client.request(header, timeout=timeout_s)
    except TransportError as exc:
        raise OffloadError(f"worker {client.endpoint}: {exc}") from exc


def _offload_error(client: Client, error: WorkerError, note: str = "") -> OffloadError:
    """``error`` raised as both OffloadError and the worker's typed error."""
    return with_context(error, OffloadError, f"worker {client.endpoint}: {error.kind}: {error.message}{note}")


def _result(reply: Mapping[str, Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """Copy the generators' states back and decode the output."""
    result = CallResult.parse(reply)
    generators = [v for v in iter_values([list(args), dict(kwargs)]) if isinstance(v, torch.Generator)]
    for generator, state in zip(generators, result.generator_states, strict=False):
        generator.set_state(state.clone())
    return from_wire(result.output, _no_model_results)


@dataclass
class CallSender:
    """Sends ``call`` requests for one target recipe to one worker.

    ``contents``: files the recipe names by content (sha256 → file), sent when the worker
    says it lacks one (``MissingModel``) into its content cache; ``uploads`` counts them.
    """

    address: str
    target: Mapping[str, Any]
    settings: Settings = field(default_factory=Settings)
    timeout_s: float | None = None
    curve: ClientCurve | None = None
    contents: Mapping[str, ContentFile] = field(default_factory=dict)
    uploads: int = field(default=0, init=False)
    _lease: Lease | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def call(self, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """Run ``target.method(*args, **kwargs)`` on the worker and return the decoded result."""
        try:
            wire_args = to_wire(list(args), _no_recipe, where="argument")
            wire_kwargs = to_wire(dict(kwargs), _no_recipe, where="argument")
        except WireValueError as exc:
            raise OffloadError(f"cannot offload this call: {exc}") from exc
        request = Call(args=wire_args, kwargs=wire_kwargs, threads=client_threads(), target=self.target,
                       method=method)
        client = self._connection()
        sent: set[str] = set()
        while True:
            reply = _request(client, request.header(), self.timeout_s)
            if not is_error_reply(reply):
                return _result(reply, args, kwargs)
            error = error_from_reply(reply)
            content = self.contents.get(error.sha256) if isinstance(error, MissingModel) else None
            if content is None or error.sha256 in sent:
                raise _offload_error(client, error)
            sent.add(error.sha256)
            self._send_content(client, content, error)

    def _send_content(self, client: Client, content: ContentFile, missing: MissingModel) -> None:
        """Send a file the worker lacks into its content cache; the MissingModel, with why, if it refuses."""
        try:
            send_file(client, io.BytesIO(content.data), folder=str(content.ref.folder), name=content.ref.name,
                      sha256=content.ref.sha256, total_bytes=content.ref.bytes, content=True,
                      timeout_s=self.timeout_s)
        except TransportError as exc:
            raise OffloadError(f"worker {client.endpoint}: sending {content.ref.name}: {exc}") from exc
        except WorkerError as exc:
            note = f"; sending it by content was refused: {exc.message}"
            raise _offload_error(client, missing, note) from None
        self.uploads += 1

    def close(self) -> None:
        """Give the connection back to the process's pool (a later call leases it again)."""
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def _connection(self) -> Client:
        with self._lock:
            if self._lease is None:
                curve = self.curve if self.curve is not None else client_curve_from_environment()
                try:
                    self._lease = shared_pool().lease(self.address, settings=self.settings, curve=curve)
                except TransportError as exc:
                    raise OffloadError(f"worker {self.address}: {exc}") from exc
            return self._lease.client


def _no_recipe(value: Any) -> None:
    return None  # models inside call arguments are not sent; to_wire then refuses them clearly


def _no_model_results(recipe: Mapping[str, Any]) -> Any:
    raise OffloadError("the worker returned a model object; offload a step that returns data")


#: Marks a forward replaced by :class:`ModuleOffload` (offloading it twice is refused).
_OFFLOADED_MARK = "__diffsplit_offloaded__"
_MISSING = object()


def _forward_slot(module: torch.nn.Module) -> str:
    """The attribute holding the forward that actually computes.

    accelerate's hooks (``device_map``, ``enable_model_cpu_offload()``) replace
    ``module.forward`` by a wrapper that moves weights, calls
    ``module._old_forward`` and moves results; replacing ``_old_forward`` keeps
    that wrapper (and whatever it does before and after) in place.
    """
    if getattr(module, "_hf_hook", None) is not None and "_old_forward" in vars(module):
        return "_old_forward"
    return "forward"


def is_offloaded(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward runs on a worker (through :class:`ModuleOffload`)."""
    return bool(getattr(vars(module).get(_forward_slot(module)), _OFFLOADED_MARK, False))


class ModuleOffload:
    """A module whose forward runs on a worker until :meth:`restore` (also a context manager).

    The proxy keeps the original forward's signature (``inspect.signature``
    sees through it); ``restore()`` puts back exactly what was there, also when
    accelerate hooks wrap the module.
    """

    def __init__(self, module: torch.nn.Module, sender: CallSender) -> None:
        slot = _forward_slot(module)
        current = getattr(module, slot)
        if getattr(current, _OFFLOADED_MARK, False):
            raise OffloadError(f"{type(module).__name__}.forward is already offloaded")
        self.module = module
        self.sender = sender
        self._slot = slot
        self._previous = vars(module).get(slot, _MISSING)

        @functools.wraps(current)
        def remote_forward(*args: Any, **kwargs: Any) -> Any:
            return sender.call("forward", args, kwargs)

        setattr(remote_forward, _OFFLOADED_MARK, True)
        setattr(module, slot, remote_forward)

    def restore(self) -> None:
        """Run the module locally again and close the connection."""
        if getattr(vars(self.module).get(self._slot), _OFFLOADED_MARK, False):
            if self._previous is _MISSING:
                delattr(self.module, self._slot)
            else:
                setattr(self.module, self._slot, self._previous)
        self.sender.close()

    def __enter__(self) -> ModuleOffload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


class OffloadedPipeline:
    """A pipeline whose calls run on a worker; every other attribute is the local pipeline's."""

    def __init__(self, pipeline: Any, sender: CallSender) -> None:
        self.pipeline = pipeline
        self.sender = sender

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wants = kwargs.get("output_type", "pil")
        if wants == "pil":
            kwargs = {**kwargs, "output_type": "np"}
        result = self.sender.call("__call__", args, kwargs)
        if wants == "pil":
            images = result["images"] if isinstance(result, Mapping) else result[0]
            pil = self.pipeline.numpy_to_pil(images)
            if isinstance(result, Mapping):
                result["images"] = pil
                result.images = pil
            else:
                result = (pil, *result[1:])
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def close(self) -> None:
        """Close the connection to the worker."""
        self.sender.close()

    def __enter__(self) -> OffloadedPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
