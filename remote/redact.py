"""Keeping the worker's own paths out of what it tells peers: the last line of defence.

Error texts are written without local paths where they are made (recipe
refusals, the builder's load failures name files as the recipe does); what a
library or an engine loader still puts in a message or a traceback is
rewritten here before it leaves the worker:

- a path inside the model store becomes its store name (``<root>/loras/x``
  → ``loras/x``; an extra folder's directory → its folder name);
- the Python installation becomes ``<python>``, this package's source tree
  ``<diffsplit>``, the home directory ``~``;
- any other absolute path keeps only its last segment (``…/name``), so a
  reply never tells where something lies on this machine, nor whether a path
  a peer guessed exists.
"""

from __future__ import annotations

import contextlib
import re
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffsplit.remote

_SEGMENT = r"[^\s'\"`/:;,()\[\]{}<>|]"
#: An absolute path not already rewritten: a '/' not preceded by a word, '.', '~', ':', '/', '<' or '>'.
_ABSOLUTE = re.compile(rf"(?<![\w.~:/<>-])/(?:{_SEGMENT}+/)+({_SEGMENT}*)")


@dataclass(frozen=True)
class _Prefix:
    path: str
    replacement: str


class PathRedactor:
    """Rewrites the local paths in texts bound for peers (see the module docstring)."""

    def __init__(self, prefixes: Iterable[tuple[Path | str, str]]) -> None:
        found: dict[str, str] = {}
        for path, replacement in prefixes:
            for form in _forms(Path(path)):
                if len(form) > 1:
                    found.setdefault(form, replacement)
        ordered = sorted(found.items(), key=lambda item: len(item[0]), reverse=True)
        self._prefixes = tuple(_Prefix(path, replacement) for path, replacement in ordered)
        self._pattern = (
            re.compile("|".join(f"({re.escape(p.path)})(?![\\w.-])(/)?" for p in self._prefixes))
            if self._prefixes
            else None
        )

    @classmethod
    def for_store(cls, root: Path, extra_folders: Mapping[str, Sequence[Path]] | None = None) -> PathRedactor:
        """A redactor for a worker serving the store at ``root`` (with ComfyUI extra folders)."""
        prefixes: list[tuple[Path | str, str]] = [(root, "<models>")]
        for folder, paths in (extra_folders or {}).items():
            prefixes.extend((path, folder) for path in paths)
        installed = sysconfig.get_paths()
        libraries = (installed.get(key, "") for key in ("stdlib", "purelib", "platlib"))
        python = {sys.prefix, sys.base_prefix, sys.exec_prefix, *libraries}
        prefixes.extend((path, "<python>") for path in python if path)
        prefixes.append((Path(diffsplit.remote.__file__).resolve().parent.parent, "<diffsplit>"))
        prefixes.append((Path.home(), "~"))
        return cls(prefixes)

    def text(self, text: str) -> str:
        """``text`` with local paths rewritten."""
        if self._pattern is not None:
            text = self._pattern.sub(self._replace, text)
        return _ABSOLUTE.sub(lambda match: "…/" + match.group(1), text)

    def _replace(self, match: re.Match[str]) -> str:
        groups = match.groups()
        for index, prefix in enumerate(self._prefixes):
            if groups[2 * index] is not None:
                slash = groups[2 * index + 1] is not None
                if prefix.replacement == "<models>":
                    return "" if slash else prefix.replacement  # inside the store: the store name
                return prefix.replacement + ("/" if slash else "")
        return match.group(0)

    def reply(self, reply: Mapping[str, Any]) -> dict[str, Any]:
        """An error reply with every text (and list of texts) in it rewritten."""
        cleaned: dict[str, Any] = {}
        for key, value in reply.items():
            if isinstance(value, str):
                cleaned[key] = self.text(value)
            elif isinstance(value, list):
                cleaned[key] = [self.text(item) if isinstance(item, str) else item for item in value]
            else:
                cleaned[key] = value
        return cleaned


def _forms(path: Path) -> set[str]:
    """The ways a path may be spelled in a message: as given, absolute, and with links resolved."""
    forms = {str(path), str(path.absolute())}
    with contextlib.suppress(OSError, RuntimeError):
        forms.add(str(path.resolve()))
    return {form.rstrip("/") for form in forms if form.startswith("/")}
