"""Model files an offloaded node reads while it runs, sent with the request by sha256.

Loader nodes reach the worker as recipes, whose files are FileRefs. A few other
nodes read model files themselves: the text encoders read the ``embedding:name``
files their prompts name (``nodes.prompt_embeddings``), and preprocessors the network
file an input names (``nodes.depth``). For those, the client
resolves every lookup the node will make through *its own* store (the names the
node asks ``ctx.model_path`` for, in its order) and the request carries them as
``"files": [{"folder", "name", "file": FileRef}]``. On the worker the node's
``ctx.model_path(folder, name)`` answers only from that list, by sha256 through
the worker's store: the worker reads the client's bytes or fails with
``MissingModel`` naming the file (which the client may upload), and never falls
back to a file of the same name. A lookup the client did not find is not listed,
so the worker does not find it either and the node behaves as locally (the
embedding is left out with a warning).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffsplit.engine.executor import NodeCall
from diffsplit.engine.nodes.model_files import find_model_file
from diffsplit.engine.nodes.prompt_embeddings import embedding_files
from diffsplit.tracer.errors import RecipeError
from diffsplit.tracer.files import FileRefResolver
from diffsplit.tracer.recipe import FileRef

#: The request field that lists the files.
RUN_FILES_FIELD = "files"
#: At most this many files per request.
MAX_RUN_FILES = 256


class RunFilesError(ValueError):
    """The ``files`` field of a request is malformed."""


def run_files(call: NodeCall, file_refs: FileRefResolver) -> list[dict[str, Any]]:
    """The ``files`` entries for ``call`` (empty for nodes that read no files while running).

    Embeddings the client's store lacks get the node's usual warning here.
    """
    where = f"node {call.node.id} ({call.node.class_type})"
    found = embedding_files(call.node_class, call.inputs, call.context.model_path, where=where)
    found.update(model_input_files(call))
    return [
        {"folder": folder, "name": name, "file": file_refs.file_ref(path).to_dict()}
        for (folder, name), path in found.items()
    ]


def _input_value(call: NodeCall, name: str) -> Any:
    spec = call.node_class.input(name)
    return call.inputs.get(name, None if spec is None else spec.default)


def model_input_files(call: NodeCall) -> dict[tuple[str, str], Any]:
    """The model files a non-loader node names in its inputs and reads itself (a preprocessor's
    network, ``nodes.depth``), resolved through this process's store. Loader nodes travel as recipes."""
    if call.node_class.is_loader:
        return {}
    found: dict[tuple[str, str], Any] = {}
    for spec in call.node_class.inputs:
        name = call.inputs.get(spec.name, spec.default)
        if not all(_input_value(call, switch) == value for switch, value in spec.read_when):
            continue  # a file this call does not read need not be on the worker
        if spec.type == "COMBO" and spec.model_folder and isinstance(name, str):
            found[(spec.model_folder, name)] = find_model_file(call.context.model_path, spec.model_folder,
                                                               name)
    return found


def parse_run_files(data: Any) -> dict[tuple[str, str], FileRef]:
    """``(folder, name) -> FileRef`` from a request's ``files``; RunFilesError when malformed."""
    if data is None:
        return {}
    if not isinstance(data, list) or len(data) > MAX_RUN_FILES:
        raise RunFilesError(f"'{RUN_FILES_FIELD}' must be a list of at most {MAX_RUN_FILES} entries")
    files: dict[tuple[str, str], FileRef] = {}
    for entry in data:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("file"), Mapping):
            raise RunFilesError(f"a '{RUN_FILES_FIELD}' entry needs 'folder', 'name' and 'file': {entry!r}")
        folder, name = entry.get("folder"), entry.get("name")
        if not isinstance(folder, str) or not isinstance(name, str):
            raise RunFilesError(f"a '{RUN_FILES_FIELD}' entry needs string 'folder' and 'name': {entry!r}")
        try:
            files[(folder, name)] = FileRef.from_dict(entry["file"])
        except RecipeError as exc:
            raise RunFilesError(str(exc)) from None
    return files
