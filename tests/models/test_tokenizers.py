"""CLIP tokenizers built from the packaged BPE merges match the real CLIP vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffsplit.engine.models.tokenizers import (
    VOCAB_SIZE,
    cached_tokenizer_dir,
    clip_tokenizer,
    write_tokenizer_files,
)

# Token ids of the real openai/clip-vit-large-patch14 tokenizer.
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "Hello   WORLD": [49406, 3306, 1002, 49407],
    "an astronaut riding a horse": [49406, 550, 18376, 6765, 320, 4558, 49407],
}


@pytest.fixture(scope="module")
def clip_l_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_files(tmp_path_factory.mktemp("tok") / "tokenizer", "clip_l")


def test_vocab_has_the_clip_layout(clip_l_files: Path) -> None:
    vocab = json.loads((clip_l_files / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    assert vocab["!"] == 0
    assert vocab["!</w>"] == 256
    assert vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407


def test_merges_file_has_header_and_all_merges(clip_l_files: Path) -> None:
    lines = (clip_l_files / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) == 1 + 48894
    assert lines[1] == "i n"
    assert all(len(line.split(" ")) == 2 for line in lines[1:])


def test_tokenizer_files_are_deterministic(clip_l_files: Path, tmp_path: Path) -> None:
    again = write_tokenizer_files(tmp_path / "again", "clip_l")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (clip_l_files / name).read_bytes()


@pytest.mark.parametrize("kind", ["clip_l", "clip_g"])
@pytest.mark.parametrize(("text", "ids"), sorted(KNOWN_IDS.items()))
def test_known_token_ids(kind: str, text: str, ids: list[int]) -> None:
    tokenizer = clip_tokenizer(kind)
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer(text).input_ids == ids


def test_clip_l_pads_with_end_of_text() -> None:
    tokenizer = clip_tokenizer("clip_l")
    assert tokenizer.model_max_length == 77
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[:7] == KNOWN_IDS["a photo of a cat"]
    assert set(ids[7:]) == {49407}


def test_clip_g_pads_with_exclamation_mark() -> None:
    tokenizer = clip_tokenizer("clip_g")
    assert tokenizer.pad_token == "!"
    assert tokenizer.pad_token_id == 0
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[:7] == KNOWN_IDS["a photo of a cat"]
    assert set(ids[7:]) == {0}


@pytest.mark.parametrize("kind", ["clip_l", "clip_g"])
def test_long_prompts_truncate_to_77_ending_with_end_of_text(kind: str) -> None:
    ids = clip_tokenizer(kind)("cat " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == 49406
    assert ids[-1] == 49407
    assert set(ids[1:-1]) == {2368}


def test_clip_tokenizer_is_memoized() -> None:
    assert clip_tokenizer("clip_l") is clip_tokenizer("clip_l")
    assert clip_tokenizer("clip_l") is not clip_tokenizer("clip_g")


def test_cache_dir_follows_env_and_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFSPLIT_CACHE", str(tmp_path / "cache"))
    folder = cached_tokenizer_dir("clip_g")
    assert folder.parent == tmp_path / "cache" / "tokenizers"
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert cached_tokenizer_dir("clip_g") == folder
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp
    # Only the finished folder is left behind (staging folders are renamed or removed).
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["pad_token"] == "!"


def test_unknown_kind_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        write_tokenizer_files(tmp_path, "t5")  # type: ignore[arg-type]
