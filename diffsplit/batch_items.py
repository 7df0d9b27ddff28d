"""The items of ``diffsplit batch``: prompts from text lines, JSONL or CSV, each with its overrides.

- ``.txt`` (or any other name): one prompt per non-empty line.
- ``.jsonl``: one JSON object per non-empty line. ``prompt`` and ``negative``
  are the texts; ``id`` names the item (its images and its manifest line);
  every other key is an override: ``NODE.INPUT`` as ``--set`` takes it, or a
  bare input name (``seed``, ``steps``, ``cfg``, ``width``, ``strength_model``…)
  that exactly one node of the workflow has as a widget value.
- ``.csv``: a header row naming the same keys; each cell is JSON where it
  parses (``7``, ``6.5``), else text; an empty cell sets nothing.

Every item is read and checked against the workflow before anything runs, so a
bad line 9,000 is reported before the first image, with its line number.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.graph import Link, Node, Workflow
from diffsplit.engine.overrides import parse_value

#: Keys of an item that are not overrides.
TEXT_KEYS = ("prompt", "negative")
ID_KEY = "id"
#: Bare input names that also match another spelling of the same input on other samplers.
ALIASES = {"seed": ("seed", "noise_seed")}
#: The most item errors listed at once (the rest are counted).
MAX_LISTED_ERRORS = 10
#: Characters an item id may use (it names files).
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: The largest items file read (a night's batch of prompts is a few MB).
MAX_ITEMS_BYTES = 256 * 1024 * 1024


class BatchItemsError(WorkflowError):
    """The items file cannot be read, or some of its items do not fit the workflow."""


@dataclass(frozen=True)
class BatchItem:
    """One item: where it came from, its name, and the ``NODE.INPUT`` overrides it applies."""

    line: int  # 1-based line of the file (the data line for CSV, header = line 1)
    key: str  # names the item's images and its manifest line
    prompt: str | None
    overrides: tuple[tuple[str, Any], ...]  # ("6.seed", 7), ... in a stable order

    @property
    def digest(self) -> str:
        """What the item asks for, hashed: a finished item is redone on resume only if this changed."""
        text = json.dumps({"prompt": self.prompt, "overrides": list(self.overrides)}, sort_keys=True,
                          default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def override_map(self) -> dict[str, Any]:
        return dict(self.overrides)


@dataclass(frozen=True)
class _Raw:
    line: int
    fields: Mapping[str, Any]


def read_items(path: Path, workflow: Workflow, *, prompt_targets: Sequence[str] = ()) -> list[BatchItem]:
    """The items of ``path`` resolved against ``workflow``; BatchItemsError lists every bad one.

    ``prompt_targets``: ``NODE.INPUT`` names that the ``prompt`` text goes to
    (default: the text inputs of the encoder feeding the sampler's ``positive``).
    """
    raws = _read_raw(path)
    if not raws:
        raise BatchItemsError(f"{path}: no items (every line is empty)")
    resolver = _Resolver(workflow, tuple(prompt_targets))
    items: list[BatchItem] = []
    found: list[tuple[int, str]] = []
    for raw in raws:
        try:
            items.append(resolver.item(raw, width=len(str(raws[-1].line))))
        except BatchItemsError as exc:
            found.append((raw.line, f"line {raw.line}: {exc}"))
    seen: dict[str, int] = {}
    for item in items:
        if item.key in seen:
            found.append((item.line, f"line {item.line}: id {item.key!r} is already used on line "
                                     f"{seen[item.key]}"))
        seen.setdefault(item.key, item.line)
    errors = [message for _, message in sorted(found)]
    if errors:
        listed = errors[:MAX_LISTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(listed)} more" if len(errors) > len(listed) else ""
        raise BatchItemsError(f"{path}: {len(errors)} item(s) do not fit the workflow:\n  "
                              + "\n  ".join(listed) + more)
    return items


def _read_raw(path: Path) -> list[_Raw]:
    try:
        size = path.stat().st_size
        if size > MAX_ITEMS_BYTES:
            raise BatchItemsError(f"{path}: {size} bytes, more than the {MAX_ITEMS_BYTES} an items file "
                                  "may have")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise BatchItemsError(f"cannot read the items file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BatchItemsError(f"{path} is not UTF-8 text: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl(path, text)
    if suffix == ".csv":
        return _csv(path, text)
    return [_Raw(number, {"prompt": line.strip()})
            for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _jsonl(path: Path, text: str) -> list[_Raw]:
    raws = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except ValueError as exc:
            raise BatchItemsError(f"{path} line {number}: not JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise BatchItemsError(f"{path} line {number}: a JSON object is needed, "
                                  f"not {type(fields).__name__}")
        raws.append(_Raw(number, fields))
    return raws


def _csv(path: Path, text: str) -> list[_Raw]:
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return []
    header = [name.strip() for name in rows[0]]
    if not any(header) or len(set(header)) != len(header) or "" in header:
        raise BatchItemsError(f"{path}: the first row must name each column once (e.g. prompt,seed), "
                              f"got {rows[0]}")
    raws = []
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise BatchItemsError(f"{path} line {number}: {len(row)} cells, the header names {len(header)}")
        fields = {name: cell if name in (*TEXT_KEYS, ID_KEY) else parse_value(cell)
                  for name, cell in zip(header, row, strict=True) if cell.strip()}
        raws.append(_Raw(number, fields))
    return raws


class _Resolver:
    """Turns an item's keys into ``NODE.INPUT`` overrides of one workflow."""

    def __init__(self, workflow: Workflow, prompt_targets: tuple[str, ...]) -> None:
        self.workflow = workflow
        self._targets: dict[str, tuple[str, ...]] = {}
        if prompt_targets:
            self._targets["prompt"] = tuple(_checked_target(workflow, t) for t in prompt_targets)

    def item(self, raw: _Raw, *, width: int) -> BatchItem:
        fields = dict(raw.fields)
        key = self._key(fields.pop(ID_KEY, None), raw.line, width)
        overrides: dict[str, Any] = {}
        prompt = None
        for name in TEXT_KEYS:
            if name not in fields:
                continue
            text = fields.pop(name)
            if not isinstance(text, str):
                raise BatchItemsError(f"{name!r} must be text, not {type(text).__name__}")
            if name == "prompt":
                prompt = text
            for target in self.text_targets(name):
                overrides[target] = text
        for name, value in fields.items():
            if not isinstance(name, str) or not name:
                raise BatchItemsError(f"key {name!r} is not an input name")
            for target in self.targets(name):
                overrides[target] = value
        return BatchItem(raw.line, key, prompt, tuple(sorted(overrides.items())))

    def _key(self, given: Any, line: int, width: int) -> str:
        if given is None:
            return f"{line:0{width}d}"
        text = str(given) if isinstance(given, int) and not isinstance(given, bool) else given
        if not isinstance(text, str) or not _ID_PATTERN.match(text):
            raise BatchItemsError(f"id {given!r} must be 1-100 letters, digits, '.', '_' or '-' "
                                  "(it names the item's images)")
        return text

    def text_targets(self, name: str) -> tuple[str, ...]:
        if name not in self._targets:
            self._targets[name] = _encoder_text_inputs(self.workflow, "positive" if name == "prompt"
                                                       else "negative")
        return self._targets[name]

    def targets(self, name: str) -> tuple[str, ...]:
        if "." in name:
            return (_checked_target(self.workflow, name),)
        spellings = ALIASES.get(name, (name,))
        matches = [f"{node.id}.{input_name}" for node in self.workflow.nodes.values()
                   for input_name in spellings if _is_widget(node, input_name)]
        if not matches:
            raise BatchItemsError(f"no node of the workflow has an input {name!r}; "
                                  "name it as NODE.INPUT (e.g. 3.seed)")
        if len(matches) > 1:
            raise BatchItemsError(f"{name!r} is an input of several nodes ({', '.join(matches)}); "
                                  "name one as NODE.INPUT")
        return tuple(matches)


def _is_widget(node: Node, input_name: str) -> bool:
    return input_name in node.inputs and not isinstance(node.inputs[input_name], Link)


def _checked_target(workflow: Workflow, target: str) -> str:
    node_id, dot, input_name = target.partition(".")
    node = workflow.nodes.get(node_id)
    if not dot or node is None:
        raise BatchItemsError(f"{target!r}: no node {node_id!r} in the workflow (NODE.INPUT names a node id)")
    if not _is_widget(node, input_name):
        widgets = sorted(name for name in node.inputs if _is_widget(node, name))
        raise BatchItemsError(f"{target!r}: node {node_id} ({node.class_type}) has no widget input "
                              f"{input_name!r}; it has: {', '.join(widgets) or '(none)'}")
    return target


def _encoder_text_inputs(workflow: Workflow, side: str) -> tuple[str, ...]:
    """The text widgets of the encoders feeding the samplers' ``side`` (``positive``/``negative``)."""
    found: list[str] = []
    for node in workflow.nodes.values():
        link = node.inputs.get(side)
        if not isinstance(link, Link):
            continue
        for source in _text_sources(workflow, link.node_id, depth=0):
            if source not in found:
                found.append(source)
    if not found:
        raise BatchItemsError(f"no sampler's {side!r} input comes from a text encoder with a text widget; "
                              "say where the text goes with --prompt-input NODE.INPUT")
    return tuple(found)


def _text_sources(workflow: Workflow, node_id: str, depth: int) -> Iterable[str]:
    """Text widgets of ``node_id``, or of the conditioning nodes it combines (a few levels up)."""
    node = workflow.nodes.get(node_id)
    if node is None or depth > 4:
        return []
    own = [f"{node.id}.{name}" for name in ("text", "text_g", "text_l") if _is_widget(node, name)]
    if own:
        return own
    upstream: list[str] = []
    for value in node.inputs.values():
        if isinstance(value, Link):
            upstream.extend(_text_sources(workflow, value.node_id, depth + 1))
    return upstream
