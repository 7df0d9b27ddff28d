"""Which files a loader call read: Python opens seen by an audit hook, native reads by their callers.

A folder recipe should name the files its loader read, not every file of the
folder. Two sources tell which files those are, while a :func:`reading` block
is open on the thread that runs the loader:

- the ``open`` audit event (:pep:`578`), raised by every Python-level open:
  configs, tokenizer files, index files, pickled checkpoints;
- reads that never pass through Python's ``open`` (safetensors maps files from
  Rust): the recorder sees the call of the library's own Python function that
  hands the file to native code (:data:`NATIVE_READERS`) and reports its path
  argument with :func:`note_read`.

An audit hook cannot be removed, so one is installed for the process the first
time a block opens, and costs one comparison per event outside blocks.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ``module:Qualified.name`` → the argument naming the file (or list of files) the function reads natively.
NATIVE_READERS: dict[str, str] = {
    "safetensors.torch:load_file": "filename",
    "transformers.modeling_utils:PreTrainedModel._load_pretrained_model": "checkpoint_files",
    "diffusers.models.model_loading_utils:load_state_dict": "checkpoint_file",
    "sentencepiece:SentencePieceProcessor.Load": "model_file",
    # the tokenizer files (vocab, merges, tokenizer.json) a tokenizer hands to the Rust tokenizers library
    "transformers.tokenization_utils_base:PreTrainedTokenizerBase._from_pretrained": "resolved_vocab_files",
}

_install_lock = threading.Lock()
_installed = False
_open_blocks = 0  # blocks open on any thread: the hook's fast exit


class _Blocks(threading.local):
    def __init__(self) -> None:
        self.stack: list[set[str]] = []


_blocks = _Blocks()


@dataclass(frozen=True)
class FilesRead:
    """The files a block saw read, as absolute paths (not resolved: links stay as named)."""

    paths: frozenset[Path]

    def inside(self, folder: Path) -> tuple[Path, ...]:
        """The files read that lie inside ``folder`` (by name, or once links are resolved), sorted."""
        folder = Path(os.path.abspath(folder))
        real = folder.resolve()
        found = set()
        for path in self.paths:
            if path.is_relative_to(folder):
                found.add(path)
            elif path.resolve().is_relative_to(real):
                found.add(folder / path.resolve().relative_to(real))
        return tuple(sorted(path for path in found if path.is_file()))


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _open_blocks or event != "open":
        return
    stack = _blocks.stack
    if stack:
        _note(args[0] if args else None, args[1] if len(args) > 1 else None, stack)


def _note(value: Any, mode: Any, stack: list[set[str]]) -> None:
    if isinstance(mode, str) and any(flag in mode for flag in "wax"):
        return  # a write, not a read
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if isinstance(value, str | os.PathLike):
        path = os.path.abspath(os.fspath(value))
        for block in stack:
            block.add(path)


def note_read(value: Any) -> None:
    """Report a file (a list of files, or a mapping to files) a native reader is about to read."""
    stack = _blocks.stack
    if not stack:
        return
    values: Iterable[Any] = (value,)
    if isinstance(value, list | tuple):
        values = value
    elif isinstance(value, Mapping):
        values = value.values()
    for item in values:
        _note(item, None, stack)


def _install() -> None:
    global _installed
    with _install_lock:
        if not _installed:
            sys.addaudithook(_audit)
            _installed = True


class ReadBlock:
    """The files opened for reading on one thread between :meth:`start` and :meth:`stop`.

    Blocks nest: an outer block also sees what an inner one saw.
    """

    def __init__(self) -> None:
        self._paths: set[str] = set()
        self._started = False

    def start(self) -> ReadBlock:
        """Begin collecting on the calling thread."""
        global _open_blocks
        if self._started:
            raise RuntimeError("this read block is already collecting")
        _install()
        self._started = True
        _blocks.stack.append(self._paths)
        with _install_lock:
            _open_blocks += 1
        return self

    def stop(self) -> FilesRead:
        """Stop collecting (on the thread that started) and return what was read."""
        global _open_blocks
        if self._started:
            self._started = False
            with _install_lock:
                _open_blocks -= 1
            stack = _blocks.stack
            for position in range(len(stack) - 1, -1, -1):
                if stack[position] is self._paths:
                    del stack[position]
                    break
        return FilesRead(frozenset(Path(path) for path in self._paths))


@contextmanager
def reading() -> Iterator[ReadBlock]:
    """A :class:`ReadBlock` collecting for the duration of the ``with`` block."""
    block = ReadBlock().start()
    try:
        yield block
    finally:
        block.stop()
