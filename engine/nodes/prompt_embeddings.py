"""``embedding:name`` in prompts: ComfyUI's syntax, file lookup and the one-line warning.

Syntax (ComfyUI's ``SDTokenizer``): within each weighted segment the text is cut
before every ``embedding:`` that follows whitespace (or starts the segment). In
a piece that starts with ``embedding:``, the first whitespace-separated word is
the name (cut before a ``<`` or ``[``); the rest of the piece is prompt text.
A name not found as written is tried once more with commas stripped from both
ends (``embedding:style, a cat``). ``(embedding:name:1.2)`` weights the vectors
like any tokens.

Lookup: the name is resolved *only* through the node context's
``model_path("embeddings", name)`` (the store's listing on this machine; on a
worker, only the files the client sent by sha256), as written and then with
``.safetensors``, ``.pt`` and ``.bin`` appended, like ComfyUI. Names with
``..``, absolute paths, NUL or backslashes are refused before any lookup.

A missing, refused or unusable embedding is one warning line naming the node
(id and class) and the embedding; the prompt is encoded without it, as ComfyUI
does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.embeddings import EmbeddingFile, read_embedding
from diffsplit.engine.nodes.base import NodeClass, NodeContext
from diffsplit.engine.nodes.prompt_weights import parse_prompt_weights
from diffsplit.engine.store import normalize_name, unsafe_name_reason

logger = logging.getLogger(__name__)

EMBEDDING_PREFIX = "embedding:"
EMBEDDINGS_FOLDER = "embeddings"
#: Tried in this order after the name as written (ComfyUI's order).
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")

_SPLIT = re.compile(rf"(?<=\s){re.escape(EMBEDDING_PREFIX)}")
_NAME_END = re.compile(r"[<\[]")

#: ``model_path(folder, name) -> Path``, raising ModelFileError when there is no such model.
ModelPath = Callable[[str, str], Path]
#: What the tokenizer asks: the text after ``embedding:`` → (vectors [n, width] or None, leftover text).
EmbeddingLookup = Callable[[str], tuple[torch.Tensor | None, str]]


@dataclass(frozen=True)
class EmbeddingMatch:
    """What one ``embedding:`` reference names: the file (or why there is none) and the text after it."""

    name: str
    leftover: str
    path: Path | None
    problem: str | None = None


def split_embedding_words(text: str) -> list[str]:
    """A segment cut before each ``embedding:`` that follows whitespace; empty pieces dropped."""
    first, *rest = _SPLIT.split(text)
    return [piece for piece in (first, *(EMBEDDING_PREFIX + part for part in rest)) if piece]


def embedding_references(prompt: str) -> Iterator[str]:
    """The text after each ``embedding:`` of ``prompt`` (what :func:`match_embedding` takes)."""
    for segment in parse_prompt_weights(prompt):
        for word in split_embedding_words(segment.text):
            if word.startswith(EMBEDDING_PREFIX):
                yield word[len(EMBEDDING_PREFIX):].strip("\n")


def match_embedding(model_path: ModelPath, reference: str) -> EmbeddingMatch:
    """Resolve the name at the start of ``reference`` (ComfyUI's ``_try_get_embedding``)."""
    words = reference.split()
    if not words:
        return EmbeddingMatch("", "", None, "no name follows 'embedding:'")
    name, leftover = words[0], " ".join(words[1:])
    cut = _NAME_END.search(name)
    if cut is not None:
        leftover = name[cut.start():] + (" " + leftover if leftover else "")
        name = name[: cut.start()]
    path, problem = _locate(model_path, name)
    if path is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):
            path, _ = _locate(model_path, stripped)
            return EmbeddingMatch(name, f"{name[len(stripped):]} {leftover}", path, problem)
    return EmbeddingMatch(name, leftover, path, problem)


def _locate(model_path: ModelPath, name: str) -> tuple[Path | None, str | None]:
    normalized = normalize_name(name)
    reason = unsafe_name_reason(normalized)
    if reason is not None:
        return None, f"refused: the name {reason}"
    problem = None
    for candidate in (normalized, *(normalized + suffix for suffix in EMBEDDING_EXTENSIONS)):
        try:
            return model_path(EMBEDDINGS_FOLDER, candidate), None
        except ModelFileError as exc:
            problem = problem or str(exc)
    return None, problem


def warning_text(where: str, name: str, problem: str | None) -> str:
    """The one-line warning for an embedding that is left out."""
    why = " ".join((problem or "not found").split())
    return f"{where}: embedding {name!r} ignored: {why}; the prompt is encoded without it"


class PromptEmbeddings:
    """The embeddings one node call's prompts use: found through its context, read once, warned once."""

    def __init__(self, ctx: NodeContext | None, class_type: str) -> None:
        self._ctx = ctx
        self.where = f"node {getattr(ctx, 'node_id', '?')} ({class_type})"
        self._files: dict[Path, EmbeddingFile | ModelFileError] = {}
        self._warned: set[str] = set()

    def _model_path(self, folder: str, name: str) -> Path:
        if self._ctx is None:  # a node function called without a context (tests, tools)
            raise ModelFileError(f'no model store is available, so "{name}" cannot be found in {folder}/')
        return self._ctx.model_path(folder, name)

    def lookup(self, key: str, width: int) -> EmbeddingLookup:
        """The tokenizer's lookup for the encoder ``key`` (``clip_l``/``clip_g``) of ``width`` channels."""

        def find(reference: str) -> tuple[torch.Tensor | None, str]:
            match = match_embedding(self._model_path, reference)
            if match.path is None:
                self._warn(match.name, match.problem)
                return None, match.leftover
            try:
                return self._read(match.path).vectors(key, width), match.leftover
            except ModelFileError as exc:
                self._warn(match.name, str(exc))
                return None, match.leftover

        return find

    def _read(self, path: Path) -> EmbeddingFile:
        if path not in self._files:
            try:
                self._files[path] = read_embedding(path)
            except ModelFileError as exc:
                self._files[path] = exc
        known = self._files[path]
        if isinstance(known, ModelFileError):
            raise known
        return known

    def _warn(self, name: str, problem: str | None) -> None:
        text = warning_text(self.where, name, problem)
        if text not in self._warned:
            self._warned.add(text)
            logger.warning("%s", text)


def takes_prompts(node_class: NodeClass) -> bool:
    """Whether the node tokenizes through a CLIP (whose STRING inputs may then name embeddings)."""
    return any(spec.type == "CLIP" for spec in node_class.inputs)


def embedding_files(
    node_class: NodeClass, inputs: Mapping[str, Any], model_path: ModelPath, *, where: str | None = None
) -> dict[tuple[str, str], Path]:
    """``(folder, name) -> file`` of every lookup that finds an embedding the node's prompts name.

    Only nodes with a CLIP input are looked at (ComfyUI resolves embeddings in
    the CLIP's tokenizer, so any prompt tokenized through it may name one).
    The names are the ones the node itself will ask for, in its order. With
    ``where``, an embedding that is not found gets the node's warning here too.
    """
    if not takes_prompts(node_class):
        return {}
    found: dict[tuple[str, str], Path] = {}

    def recording(folder: str, name: str) -> Path:
        path = model_path(folder, name)
        found[(folder, name)] = path
        return path

    warned: set[str] = set()
    for value in inputs.values():
        if not isinstance(value, str) or EMBEDDING_PREFIX not in value:
            continue
        for reference in embedding_references(value):
            match = match_embedding(recording, reference)
            if match.path is None and where is not None:
                text = warning_text(where, match.name, match.problem)
                if text not in warned:
                    warned.add(text)
                    logger.warning("%s", text)
    return found


def embedding_stamp(node_class: NodeClass, text: str, model_path: ModelPath) -> str | None:
    """The identity (path, size, mtime) of the embedding files ``text`` names, for execution-cache keys.

    None when ``text`` names no embedding or the node takes no CLIP; ``""`` when
    it names only missing ones (so adding the file later changes the stamp).
    """
    if EMBEDDING_PREFIX not in text or not takes_prompts(node_class):
        return None
    stamps = []
    for path in embedding_files(node_class, {"text": text}, model_path).values():
        try:
            info = path.stat()
        except OSError:
            stamps.append(f"{path}:missing")
            continue
        stamps.append(f"{path}:{info.st_size}:{info.st_mtime_ns}")
    return "|".join(stamps)
