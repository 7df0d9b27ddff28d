"""What a running node sees of its surroundings: the :class:`NodeContext` the executor builds.

Images are saved ComfyUI-style as ``<prefix>_00001_.png`` with the counter one
past the highest already in the folder (the prefix may name a sub-folder,
``"portraits/img"``), and with the workflow in PNG text chunks: ``prompt`` (the
API form, authoritative) and ``workflow`` (the UI form as loaded, when known;
``--set`` overrides are not reflected in it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import EngineError, Interrupted, ModelFileError
from diffsplit.engine.format_api import save_api_format
from diffsplit.engine.graph import Workflow
from diffsplit.engine.store import path_inside, unsafe_name_reason

if TYPE_CHECKING:
    import torch
    from diffsplit.engine.dtypes import DtypePolicy, ModelKind
    from diffsplit.engine.sampling.condition_scales import ConditionLog
    from diffsplit.engine.store import ModelStore

#: ``callback(node_id, step, total)``; called from the thread running the node.
ProgressCallback = Callable[[str, int, int], None]
#: The PNG text chunk holding ``--conditions auto``'s decisions.
CONDITIONS_CHUNK = "diffsplit_conditions"
_MAX_LISTED = 20


@dataclass(frozen=True)
class PngMetadata:
    """The text chunks written into every saved PNG of one run."""

    prompt: str
    workflow: str | None
    #: ``--conditions auto``'s decisions as JSON (the ``diffsplit_conditions`` chunk), or None
    conditions: str | None = None

    @classmethod
    def of(cls, workflow: Workflow) -> PngMetadata:
        """The chunks for ``workflow``: its API form and, if it came from one, its UI form."""
        ui_form = workflow.extra.get("workflow")
        return cls(
            prompt=json.dumps(save_api_format(workflow)),
            workflow=json.dumps(ui_form, default=_json_fallback) if ui_form is not None else None,
        )


def _json_fallback(value: Any) -> Any:
    if hasattr(value, "items"):
        return dict(value.items())
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON data")


class ImageSaver:
    """Writes PNGs with incrementing counters; one per executor (the lock spans its runs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def save(self, image: Any, directory: Path, prefix: str, metadata: PngMetadata) -> Path:
        """Save ``image`` (a PIL image) as ``directory/<prefix>_NNNNN_.png``; returns the path."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        if not isinstance(image, Image.Image):
            raise TypeError(f"save_image needs a PIL image, got {type(image).__name__}")
        reason = unsafe_name_reason(prefix)
        if reason is not None:
            raise EngineError(f"filename prefix {prefix!r} {reason}")
        try:
            target = path_inside(directory, prefix)
        except ValueError as exc:
            raise EngineError(f"filename prefix {prefix!r}: {exc}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text("prompt", metadata.prompt)
        if metadata.workflow is not None:
            info.add_text("workflow", metadata.workflow)
        if metadata.conditions is not None:
            info.add_text(CONDITIONS_CHUNK, metadata.conditions)
        with self._lock:
            counter = _next_counter(target.parent, target.name)
            while True:
                path = target.parent / f"{target.name}_{counter:05d}_.png"
                try:
                    stream = path.open("xb")
                except FileExistsError:
                    counter += 1
                    continue
                with stream:
                    image.save(stream, format="PNG", pnginfo=info)
                return path


def _next_counter(directory: Path, base: str) -> int:
    pattern = re.compile(rf"^{re.escape(base)}_(\d+)_\.png$")
    counters = [int(match.group(1)) for p in directory.iterdir() if (match := pattern.match(p.name))]
    return max(counters, default=0) + 1


class RunContext:
    """The :class:`~diffsplit.engine.nodes.base.NodeContext` of one node in one run."""

    def __init__(
        self,
        node_id: str,
        *,
        store: ModelStore | None,
        inputs_dir: Path | None,
        output_dir: Path,
        temp_dir: Path,
        progress: ProgressCallback | None,
        saver: ImageSaver,
        workflow: Workflow,
        cancel: threading.Event | None = None,
        master_dtypes: DtypePolicy | None = None,
        conditions: ConditionLog | None = None,
    ) -> None:
        self.node_id = node_id
        #: the run's conditioning scale estimator log (``--conditions auto``), or None
        self.conditions = conditions
        #: kind → the dtype loaders keep models in where files store them so (``nodes.base.master_dtype``)
        self.master_dtype: Callable[[ModelKind], torch.dtype] | None = (
            None if master_dtypes is None else master_dtypes.of)
        #: set when the run is interrupted: the node stops at its next progress report
        self.cancel = cancel if cancel is not None else threading.Event()
        self._store = store
        self._inputs_dir = inputs_dir
        self._output_dir = output_dir
        self._temp_dir = temp_dir
        self._progress = progress
        self._saver = saver
        self._workflow = workflow
        self.saved: list[Path] = []

    def model_path(self, folder: str, name: str) -> Path:
        """The store's file for ``name`` in ``folder`` (ModelFileError if absent or unsafe)."""
        if self._store is None:
            raise ModelFileError(f'no model store is configured, so "{name}" cannot be found in {folder}/')
        return self._store.resolve(folder, name)

    def input_path(self, name: str) -> Path:
        """The file ``name`` in the inputs folder (never outside it)."""
        if self._inputs_dir is None:
            raise EngineError(f'no inputs folder is configured, so input "{name}" cannot be read')
        try:
            path = path_inside(self._inputs_dir, name)
        except ValueError as exc:
            raise EngineError(f"input name {exc}") from None
        if not path.is_file():
            available = sorted(
                p.relative_to(self._inputs_dir).as_posix() for p in self._inputs_dir.rglob("*") if p.is_file()
            )
            shown = ", ".join(available[:_MAX_LISTED]) or "(none)"
            raise EngineError(f'input "{name}" not found in {self._inputs_dir}; available: {shown}')
        return path

    def output_dir(self) -> Path:
        """Where output images go (created on demand)."""
        self._output_dir.mkdir(parents=True, exist_ok=True)
        return self._output_dir

    def progress(self, step: int, total: int) -> None:
        """Forward a progress report to the executor's callback, tagged with this node's id.

        Raises Interrupted when the run was interrupted: every step of a
        sampler reports progress, so it stops at its next step.
        """
        if self.cancel.is_set():
            raise Interrupted(self.node_id)
        if self._progress is not None:
            self._progress(self.node_id, step, total)

    def save_image(self, image: Any, filename_prefix: str, *, temporary: bool) -> Path:
        """Save a PIL image with the workflow embedded; temporary images go to the temp folder."""
        directory = self._temp_dir if temporary else self.output_dir()
        metadata = PngMetadata.of(self._workflow)
        if self.conditions is not None:
            decisions = [decision.to_dict() for decision in self.conditions.snapshot()]
            metadata = dataclasses.replace(metadata, conditions=json.dumps(decisions))
        path = self._saver.save(image, directory, filename_prefix, metadata)
        self.saved.append(path)
        return path
