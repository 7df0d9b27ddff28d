"""Node signatures and the cache of node outputs between runs (ComfyUI style).

A node's signature is the sha256 of a canonical JSON of its class, its literal
inputs and, for each linked input, the signature of the source node and the
output index. Two nodes with equal signatures compute the same outputs, so a
re-run with one changed widget re-executes only that node and what depends on
it. A node whose literals are not JSON data (or that depends on such a node, or
on outputs supplied from outside the run) has no signature and is never cached.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from diffsplit.engine.graph import Link, Node, Workflow
from diffsplit.engine.lru import LruTable

#: A node input's file identity (path, size, mtime) when the input names a file, else None.
FileStamp = Callable[[Node, str, Any], str | None]


def node_signatures(
    workflow: Workflow, order: Iterable[str], uncacheable: Iterable[str] = (),
    file_stamp: FileStamp | None = None,
) -> dict[str, str | None]:
    """The signature of each node in ``order`` (a topological order), None where there is none.

    Nodes in ``uncacheable`` (e.g. whose outputs are supplied from outside) have
    no signature, nor does anything downstream of them or of a node not in ``order``.
    ``file_stamp`` adds the identity of files named by inputs (a model or an input
    image replaced under the same name then changes the signature, like ComfyUI's
    IS_CHANGED).
    """
    signatures: dict[str, str | None] = dict.fromkeys(uncacheable)
    for node_id in order:
        if node_id not in signatures:
            signatures[node_id] = _signature(workflow.nodes[node_id], signatures, file_stamp)
    return signatures


def _signature(node: Node, known: Mapping[str, str | None], file_stamp: FileStamp | None) -> str | None:
    described: dict[str, Any] = {}
    for name, value in node.inputs.items():
        if not isinstance(value, Link):
            described[name] = {"value": value}
            stamp = file_stamp(node, name, value) if file_stamp is not None else None
            if stamp is not None:
                described[name]["file"] = stamp
            continue
        source_signature = known.get(value.node_id)
        if source_signature is None:
            return None
        described[name] = {"link": [source_signature, value.output_index]}
    return _digest({"class_type": node.class_type, "inputs": described})


def _digest(document: Mapping[str, Any]) -> str | None:
    try:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ExecutionCache:
    """Node outputs by signature, shared between runs; thread-safe, optionally bounded (LRU).

    Keep one instance alive across ``Executor.run`` calls to reuse outputs
    (models, encoded prompts, latents) of nodes whose signature did not change.
    """

    def __init__(self, max_entries: int | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: LruTable[str, tuple[Any, ...]] = LruTable(max_entries=max_entries)
        self._lock = threading.Lock()

    def get(self, signature: str) -> tuple[Any, ...] | None:
        """The cached outputs for ``signature``, or None."""
        with self._lock:
            return self._entries.get(signature)

    def put(self, signature: str, outputs: tuple[Any, ...]) -> None:
        """Remember ``outputs`` under ``signature`` (evicting the least recently used if full)."""
        with self._lock:
            self._entries.put(signature, tuple(outputs))

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()

    def __contains__(self, signature: object) -> bool:
        with self._lock:
            return signature in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
