"""CLIP tokenizers built from the BPE merges shipped with the package.

Single-file checkpoints carry no tokenizer. SD 1.x, SDXL and the SDXL refiner
all use OpenAI CLIP's byte-level BPE (49,408 tokens), shipped here as
``engine/data/bpe_simple_vocab_16e6.txt.gz`` (MIT, from open_clip). This module
turns those merges into the ``vocab.json``/``merges.txt`` pair that
transformers' ``CLIPTokenizer`` reads, exactly as CLIP's simple tokenizer
numbers them:

1. the 256 byte-to-unicode characters, in CLIP's byte order;
2. the same 256 characters followed by ``</w>``;
3. the first 48,894 merges, each pair joined;
4. ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

The two kinds differ only in padding: ``clip_l`` pads with ``<|endoftext|>``
(SD 1.x and SDXL ``tokenizer``), ``clip_g`` pads with ``!`` (id 0, SDXL
``tokenizer_2`` and the refiner).
"""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from diffsplit.engine.user_cache import cache_root
from transformers import CLIPTokenizer

TokenizerKind = Literal["clip_l", "clip_g"]

BPE_DATA_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
MERGES_HEADER = "#version: 0.2"
#: Number of merges CLIP keeps from the file (49152 - 256 - 2).
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2
#: Bumped when the files written here change, so stale caches are rebuilt.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TokenizerStyle:
    """What distinguishes the two CLIP tokenizer kinds."""

    pad_token: str


STYLES: dict[str, TokenizerStyle] = {
    "clip_l": TokenizerStyle(pad_token=END_TOKEN),
    "clip_g": TokenizerStyle(pad_token="!"),
}


def byte_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the rest are shifted to code
    points from 256 upwards, in byte order. The dict's insertion order is the
    order of the first 256 vocabulary entries.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def read_bpe_merges() -> list[tuple[str, str]]:
    """The 48,894 merges CLIP uses, read from the packaged data file."""
    data = resources.files("diffsplit.engine").joinpath("data", BPE_DATA_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is a header; CLIP keeps the next MERGE_COUNT lines.
    selected = lines[1 : 1 + MERGE_COUNT]
    merges = []
    for line in selected:
        first, second = line.split()
        merges.append((first, second))
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token → id, numbered the way CLIP's simple tokenizer numbers them."""
    byte_chars = list(byte_to_unicode().values())
    tokens = [*byte_chars, *(char + WORD_END for char in byte_chars)]
    tokens.extend(first + second for first, second in merges)
    tokens.extend([START_TOKEN, END_TOKEN])
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


def _tokenizer_config(kind: TokenizerKind) -> dict[str, object]:
    style = STYLES[kind]
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": style.pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }


def _special_tokens_map(kind: TokenizerKind) -> dict[str, str]:
    return {
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": STYLES[kind].pad_token,
    }


def _write_json(path: Path, payload: object, *, indent: int | None = 2) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def write_tokenizer_files(dest: Path, kind: TokenizerKind) -> Path:
    """Write a diffusers/transformers tokenizer folder for ``kind`` into ``dest``.

    Writes ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (the layout of the real SD repos' ``tokenizer/``
    folders) and returns ``dest``. Output is byte-identical across runs.
    """
    if kind not in STYLES:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(STYLES)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    merges = read_bpe_merges()
    _write_json(dest / "vocab.json", build_vocab(merges), indent=None)
    merge_lines = [MERGES_HEADER, *(f"{first} {second}" for first, second in merges)]
    (dest / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    _write_json(dest / "tokenizer_config.json", _tokenizer_config(kind))
    _write_json(dest / "special_tokens_map.json", _special_tokens_map(kind))
    return dest


def cached_tokenizer_dir(kind: TokenizerKind) -> Path:
    """A folder holding the tokenizer files of ``kind``, built on first use.

    The folder is built in a temporary sibling and renamed into place, so a
    reader never sees a half-written folder and concurrent builders are safe.
    """
    target = cache_root() / "tokenizers" / f"{kind}-v{FORMAT_VERSION}"
    if (target / "merges.txt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target.parent))
    try:
        write_tokenizer_files(staging, kind)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first (or a stale empty folder is in the way).
            if not (target / "merges.txt").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.cache
def clip_tokenizer(kind: TokenizerKind) -> CLIPTokenizer:
    """The CLIP tokenizer of ``kind`` (``clip_l`` or ``clip_g``), loaded offline.

    Memoized per process: callers share one instance and must not mutate it.
    """
    if kind not in STYLES:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(STYLES)}")
    return CLIPTokenizer.from_pretrained(str(cached_tokenizer_dir(kind)), local_files_only=True)
