"""Loading ComfyUI workflows in either format, and saving the API format.

``load_workflow`` accepts a path (``.json``, or a ``.png`` saved by ComfyUI or
diffsplit, whose text chunks hold the workflow) or an already-parsed document,
and detects the format: API (``{"id": {"class_type": ...}}``, or wrapped in
``{"prompt": ...}``) or UI (``{"nodes": [...], "links": [...]}``). Loading only
parses; call ``Workflow.validate`` (the executor does) to check it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.format_api import is_api_format, parse_api_format, save_api_format
from diffsplit.engine.format_ui import is_ui_format, parse_ui_format
from diffsplit.engine.graph import Workflow

if TYPE_CHECKING:
    from diffsplit.engine.nodes.registry import NodeRegistry

__all__ = ["detect_format", "load_workflow", "read_document", "save_api_format"]


def load_workflow(source: str | Path | Mapping[str, Any], registry: NodeRegistry) -> Workflow:
    """The workflow in ``source`` (a file path or a parsed JSON document), either format."""
    document = read_document(source) if isinstance(source, str | Path) else source
    kind = detect_format(document)
    if kind == "ui":
        return parse_ui_format(document, registry)
    return parse_api_format(document)


def detect_format(document: Any) -> str:
    """``"api"`` or ``"ui"``; a WorkflowError if ``document`` is neither."""
    if is_ui_format(document):
        return "ui"
    if is_api_format(document):
        return "api"
    if isinstance(document, Mapping):
        described = f"an object with keys {', '.join(list(map(str, document))[:8]) or '(none)'}"
    else:
        described = type(document).__name__
    raise WorkflowError(
        f"not a ComfyUI workflow: expected the API format ({{id: {{class_type, inputs}}}}) "
        f"or the UI format ({{nodes, links}}), got {described}"
    )


def read_document(path: str | Path) -> Any:
    """The parsed workflow document stored in a JSON file or in a PNG's text chunks.

    From a PNG, the API form (chunk ``prompt``) is preferred, with the UI form
    (chunk ``workflow``) attached as ``extra_data.extra_pnginfo.workflow``.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".png":
            return _read_png_document(path)
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkflowError(f"cannot read workflow {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise WorkflowError(f"workflow {path} is not valid JSON: {exc}") from exc


def _read_png_document(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        chunks = dict(getattr(image, "text", {}) or image.info)
    prompt, ui = chunks.get("prompt"), chunks.get("workflow")
    if prompt is None and ui is None:
        raise WorkflowError(f"{path} carries no workflow (no 'prompt' or 'workflow' text chunk)")
    if prompt is None:
        return json.loads(ui)
    document: dict[str, Any] = {"prompt": json.loads(prompt)}
    if ui is not None:
        document["extra_data"] = {"extra_pnginfo": {"workflow": json.loads(ui)}}
    return document
