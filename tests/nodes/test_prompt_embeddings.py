"""Textual inversion: ``embedding:name`` in prompts, as ComfyUI tokenizes and encodes it."""

from __future__ import annotations

import copy
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.models.embeddings import read_embedding
from diffsplit.engine.models.tiny_embeddings import (
    SD15_EMBEDDING_FILE,
    SDXL_EMBEDDING_FILE,
    tiny_embedding_tensors,
    write_tiny_embeddings,
)
from diffsplit.engine.models.tokenizers import clip_tokenizer
from diffsplit.engine.nodes.conditioning import CLIP_TEXT_ENCODE, CLIP_TEXT_ENCODE_SDXL
from diffsplit.engine.nodes.prompt_embeddings import embedding_stamp, match_embedding, split_embedding_words
from diffsplit.engine.nodes.text_encoding import CHUNK_LENGTH, tokenize_prompt
from diffsplit.engine.store import ModelStore
from diffsplit.engine.types import TextEncoders

BOS, EOS = 49406, 49407
LOGGER = "diffsplit.engine.nodes.prompt_embeddings"
TENSORS = tiny_embedding_tensors(0)
SD15_VECTORS = TENSORS[SD15_EMBEDDING_FILE]["emb_params"]
SDXL_L = TENSORS[SDXL_EMBEDDING_FILE]["clip_l"]
SDXL_G = TENSORS[SDXL_EMBEDDING_FILE]["clip_g"]


@dataclass
class StoreContext:
    """The part of a NodeContext the text encoders use: a node id and a real store."""

    store: ModelStore
    node_id: str = "6"

    def model_path(self, folder: str, name: str) -> Path:
        return self.store.resolve(folder, name)


class _OpensAFile:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with the tiny embeddings, the same vectors as .pt files, a poisoned .pt and a file outside."""
    root = tmp_path_factory.mktemp("embedding-store")
    folder = root / "embeddings"
    write_tiny_embeddings(folder, 0)
    torch.save({"string_to_param": {"*": torch.nn.Parameter(SD15_VECTORS.clone())}, "name": "a1111",
                "step": 500}, folder / "a1111.pt")
    torch.save(SD15_VECTORS.clone(), folder / "bare.pt")
    torch.save([{"*": SD15_VECTORS.clone()}], folder / "listed.pt")
    (folder / "styles").mkdir()
    shutil.copy(folder / SD15_EMBEDDING_FILE, folder / "styles" / "nested.safetensors")
    torch.save({"string_to_param": {"*": _OpensAFile(root / "unpickled-marker")}}, folder / "poisoned.pt")
    (root / "loras").mkdir()
    shutil.copy(folder / SD15_EMBEDDING_FILE, root / "loras" / "outside.safetensors")
    return root


@pytest.fixture(scope="module")
def ctx(store_root: Path) -> StoreContext:
    return StoreContext(ModelStore(store_root))


@pytest.fixture(scope="module")
def sd15_clip(models_dir: Path) -> TextEncoders:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").clip


@pytest.fixture(scope="module")
def sdxl_clip(models_dir: Path) -> TextEncoders:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sdxl.safetensors").clip


def _encode(ctx: StoreContext | None, clip: TextEncoders, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    ((cond, extras),) = CLIP_TEXT_ENCODE.function(ctx, text=text, clip=clip)[0]
    return cond, extras["pooled_output"]


def _ids(kind: str, text: str) -> list[int]:
    return clip_tokenizer(kind)(text, add_special_tokens=False, verbose=False)["input_ids"]


def _extended(encoder: torch.nn.Module, vectors: torch.Tensor) -> tuple[torch.nn.Module, int]:
    """A copy of ``encoder`` whose vocabulary has ``vectors`` appended (ids from the returned first id)."""
    clone = copy.deepcopy(encoder)
    table = encoder.get_input_embeddings().weight.detach()
    grown = torch.nn.Embedding(table.shape[0] + len(vectors), table.shape[1])
    with torch.no_grad():
        grown.weight.copy_(torch.cat([table, vectors.to(table.dtype)]))
    clone.set_input_embeddings(grown)
    return clone, table.shape[0]


def _hand_ids(kind: str, before: str, new_ids: list[int], after: str, pad: int) -> tuple[list[int], int]:
    body = [BOS, *_ids(kind, before), *new_ids, *_ids(kind, after)]
    return [*body, EOS, *[pad] * (CHUNK_LENGTH - len(body) - 1)], len(body)


# --- prompt syntax -------------------------------------------------------------------------


def test_prompts_are_cut_before_embedding_after_whitespace_only() -> None:
    assert split_embedding_words("a photo embedding:x cat") == ["a photo ", "embedding:x cat"]
    assert split_embedding_words("a\nembedding:x") == ["a\n", "embedding:x"]
    assert split_embedding_words("embedding:x") == ["embedding:x"]
    assert split_embedding_words("a,embedding:x") == ["a,embedding:x"]


def test_names_end_at_whitespace_or_brackets_and_lose_commas_when_needed() -> None:
    known = {"style.safetensors": Path("/store/embeddings/style.safetensors")}

    def model_path(folder: str, name: str) -> Path:
        if folder == "embeddings" and name in known:
            return known[name]
        raise ModelFileError(f"{name} not found")

    plain = match_embedding(model_path, "style a cat")
    assert (plain.name, plain.leftover, plain.path) == ("style", "a cat", known["style.safetensors"])
    comma = match_embedding(model_path, "style, a cat")
    assert (comma.path, comma.leftover) == (known["style.safetensors"], ", a cat")
    bracket = match_embedding(model_path, "style<lora:x:1> more")
    assert (bracket.name, bracket.leftover, bracket.path is not None) == ("style", "<lora:x:1> more", True)
    assert match_embedding(model_path, "   ").path is None


# --- tokenization ---------------------------------------------------------------------------


def _fixed_lookup(count: int):
    vectors = torch.arange(count * 64, dtype=torch.float32).reshape(count, 64)
    return vectors, lambda reference: (vectors, " ".join(reference.split()[1:]))


def test_each_vector_takes_one_token_slot_with_the_segment_weight() -> None:
    vectors, lookup = _fixed_lookup(3)
    (chunk,) = tokenize_prompt(clip_tokenizer("clip_l"), "a (embedding:x:1.2) cat", pad_with_end=True,
                               embeddings=lookup)
    a, cat = _ids("clip_l", "a"), _ids("clip_l", "cat")
    assert chunk.ids[:7] == (BOS, *a, EOS, EOS, EOS, *cat, EOS)[:7]
    assert chunk.end_index == 1 + len(a) + 3 + len(cat)
    assert [position for position, _ in chunk.vectors] == [2, 3, 4]
    assert all(torch.equal(vector, vectors[i]) for i, (_, vector) in enumerate(chunk.vectors))
    assert chunk.weights[2:5] == (1.2, 1.2, 1.2) and chunk.weights[1] == 1.0 and chunk.weights[5] == 1.0


def test_a_short_embedding_that_does_not_fit_starts_the_next_chunk() -> None:
    _, lookup = _fixed_lookup(3)
    first, second = tokenize_prompt(clip_tokenizer("clip_l"), "cat " * 74 + "embedding:x", pad_with_end=True,
                                    embeddings=lookup)
    assert first.vectors == () and first.end_index == 75
    assert [position for position, _ in second.vectors] == [1, 2, 3] and second.end_index == 4


def test_an_embedding_of_eight_vectors_or_more_is_cut_across_chunks() -> None:
    vectors, lookup = _fixed_lookup(10)
    first, second = tokenize_prompt(clip_tokenizer("clip_l"), "cat " * 74 + "embedding:x", pad_with_end=True,
                                    embeddings=lookup)
    assert [position for position, _ in first.vectors] == [75] and first.end_index == 76
    assert [position for position, _ in second.vectors] == list(range(1, 10))
    assert torch.equal(second.vectors[0][1], vectors[1])


def test_without_a_lookup_the_reference_stays_text() -> None:
    (chunk,) = tokenize_prompt(clip_tokenizer("clip_l"), "a embedding:x", pad_with_end=True)
    assert chunk.vectors == ()
    assert chunk.ids[1:chunk.end_index] == (*_ids("clip_l", "a"), *_ids("clip_l", "embedding:x"))


# --- encoding --------------------------------------------------------------------------------


def test_sd15_embedding_equals_vectors_written_into_the_token_table(
    ctx: StoreContext, sd15_clip: TextEncoders
) -> None:
    cond, pooled = _encode(ctx, sd15_clip, "a photo of embedding:tiny-sd15-embedding cat")
    plain, _ = _encode(ctx, sd15_clip, "a photo of cat")
    assert not torch.equal(cond, plain)
    encoder, first = _extended(sd15_clip.encoders[0], SD15_VECTORS)
    ids, end = _hand_ids("clip_l", "a photo of", [first, first + 1, first + 2], "cat", EOS)
    with torch.no_grad():
        expected = encoder(input_ids=torch.tensor([ids])).last_hidden_state
    assert torch.equal(cond, expected)
    assert torch.equal(pooled, expected[:, end])


def test_names_with_and_without_extension_and_every_file_format_agree(
    ctx: StoreContext, sd15_clip: TextEncoders
) -> None:
    reference, _ = _encode(ctx, sd15_clip, "a photo of embedding:tiny-sd15-embedding cat")
    for name in ("tiny-sd15-embedding.safetensors", "a1111", "a1111.pt", "bare", "listed", "styles/nested"):
        cond, _ = _encode(ctx, sd15_clip, f"a photo of embedding:{name} cat")
        assert torch.equal(cond, reference), name


def test_weights_apply_to_the_embedding_vectors(ctx: StoreContext, sd15_clip: TextEncoders) -> None:
    plain, _ = _encode(ctx, sd15_clip, "a photo of embedding:tiny-sd15-embedding cat")
    weighted, _ = _encode(ctx, sd15_clip, "a photo of (embedding:tiny-sd15-embedding:1.2) cat")
    empty, _ = _encode(ctx, sd15_clip, "")
    slots = [1 + len(_ids("clip_l", "a photo of")) + i for i in range(3)]
    expected = (plain[:, slots] - empty[:, slots]) * 1.2 + empty[:, slots]
    torch.testing.assert_close(weighted[:, slots], expected)
    others = [i for i in range(CHUNK_LENGTH) if i not in slots]
    assert torch.equal(weighted[:, others], plain[:, others])


def test_sdxl_embedding_gives_each_encoder_its_own_vectors(
    ctx: StoreContext, sdxl_clip: TextEncoders
) -> None:
    cond, pooled = _encode(ctx, sdxl_clip, "a photo of embedding:tiny-sdxl-embedding cat")
    l_encoder, l_first = _extended(sdxl_clip.encoders[0], SDXL_L)
    g_encoder, g_first = _extended(sdxl_clip.encoders[1], SDXL_G)
    l_ids, _ = _hand_ids("clip_l", "a photo of", [l_first, l_first + 1], "cat", EOS)
    g_ids, g_end = _hand_ids("clip_g", "a photo of", [g_first, g_first + 1], "cat", 0)
    with torch.no_grad():
        l_out = l_encoder(input_ids=torch.tensor([l_ids]), output_hidden_states=True)
        g_out = g_encoder(input_ids=torch.tensor([g_ids]), output_hidden_states=True)
        g_pooled = g_encoder.text_projection(g_out.last_hidden_state[:, g_end])
    assert torch.equal(cond[..., :64], l_out.hidden_states[-2])
    assert torch.equal(cond[..., 64:], g_out.hidden_states[-2])
    assert torch.equal(pooled, g_pooled)
    (conditioning,) = CLIP_TEXT_ENCODE_SDXL.function(
        ctx, clip=sdxl_clip, width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024,
        target_height=1024, text_g="a photo of embedding:tiny-sdxl-embedding cat", text_l="a photo of cat",
    )  # fmt: skip
    plain, _ = _encode(ctx, sdxl_clip, "a photo of cat")
    assert torch.equal(conditioning[0][0][..., 64:], cond[..., 64:])
    assert torch.equal(conditioning[0][0][..., :64], plain[..., :64])


def test_a_vector_width_the_encoder_lacks_is_left_out_with_a_warning(
    ctx: StoreContext, sdxl_clip: TextEncoders, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cond, _ = _encode(ctx, sdxl_clip, "a photo of embedding:tiny-sd15-embedding cat")
    plain, _ = _encode(ctx, sdxl_clip, "a photo of cat")
    assert torch.equal(cond[..., 64:], plain[..., 64:])  # CLIP-G: 64-wide vectors do not fit
    assert not torch.equal(cond[..., :64], plain[..., :64])  # CLIP-L takes emb_params
    (record,) = caplog.records
    assert "node 6 (CLIPTextEncode)" in record.message and "'tiny-sd15-embedding'" in record.message
    assert "128" in record.message


def test_missing_embedding_warns_once_and_the_prompt_goes_on_without_it(
    ctx: StoreContext, sd15_clip: TextEncoders, sdxl_clip: TextEncoders, caplog: pytest.LogCaptureFixture
) -> None:
    for clip in (sd15_clip, sdxl_clip):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            cond, pooled = _encode(ctx, clip, "a photo of embedding:nowhere-to-be-found cat")
        plain, plain_pooled = _encode(ctx, clip, "a photo of cat")
        assert torch.equal(cond, plain) and torch.equal(pooled, plain_pooled)
        (record,) = caplog.records
        assert record.levelno == logging.WARNING and "\n" not in record.message
        assert "node 6 (CLIPTextEncode)" in record.message and "'nowhere-to-be-found'" in record.message


@pytest.mark.parametrize("name", ["../loras/outside", "../loras/outside.safetensors", "styles/../bare"])
def test_names_that_leave_the_embeddings_folder_are_refused(
    ctx: StoreContext, store_root: Path, sd15_clip: TextEncoders, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cond, _ = _encode(ctx, sd15_clip, f"a photo of embedding:{name} cat")
        absolute, _ = _encode(ctx, sd15_clip, f"a photo of embedding:{store_root}/loras/outside cat")
    plain, _ = _encode(ctx, sd15_clip, "a photo of cat")
    assert torch.equal(cond, plain) and torch.equal(absolute, plain)
    assert len(caplog.records) == 2 and all("refused" in record.message for record in caplog.records)


def test_a_pickle_holding_more_than_tensors_is_refused_unopened(
    ctx: StoreContext, store_root: Path, sd15_clip: TextEncoders, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ModelFileError, match="not a tensors-only torch file"):
        read_embedding(store_root / "embeddings" / "poisoned.pt")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cond, _ = _encode(ctx, sd15_clip, "a photo of embedding:poisoned cat")
    plain, _ = _encode(ctx, sd15_clip, "a photo of cat")
    assert torch.equal(cond, plain)
    assert not (store_root / "unpickled-marker").exists()
    (record,) = caplog.records
    assert "'poisoned'" in record.message and "not a tensors-only torch file" in record.message


def test_an_sdxl_embedding_on_sd15_takes_its_clip_l_part(ctx: StoreContext, sd15_clip: TextEncoders) -> None:
    cond, _ = _encode(ctx, sd15_clip, "embedding:tiny-sdxl-embedding")
    encoder, first = _extended(sd15_clip.encoders[0], SDXL_L)
    ids, _ = _hand_ids("clip_l", "", [first, first + 1], "", EOS)
    with torch.no_grad():
        assert torch.equal(cond, encoder(input_ids=torch.tensor([ids])).last_hidden_state)


def test_the_cache_stamp_follows_the_embedding_files(tmp_path: Path) -> None:
    write_tiny_embeddings(tmp_path / "embeddings", 0)
    store = ModelStore(tmp_path)
    text = "a photo of embedding:tiny-sd15-embedding embedding:later"
    first = embedding_stamp(CLIP_TEXT_ENCODE, text, store.resolve)
    assert first and SD15_EMBEDDING_FILE in first
    assert embedding_stamp(CLIP_TEXT_ENCODE, "a photo of cat", store.resolve) is None
    shutil.copy(tmp_path / "embeddings" / SDXL_EMBEDDING_FILE, tmp_path / "embeddings" / "later.safetensors")
    second = embedding_stamp(CLIP_TEXT_ENCODE, text, store.resolve)
    assert second != first and "later.safetensors" in second


def test_concurrent_encodes_on_one_clip_do_not_see_each_others_vectors(
    ctx: StoreContext, sd15_clip: TextEncoders
) -> None:
    prompts = ["a photo of embedding:tiny-sd15-embedding cat", "a photo of cat",
               "embedding:tiny-sdxl-embedding dog", "a (embedding:a1111:0.7) fox"] * 3
    expected = [_encode(ctx, sd15_clip, prompt)[0] for prompt in prompts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda prompt: _encode(ctx, sd15_clip, prompt)[0], prompts))
    assert all(torch.equal(a, b) for a, b in zip(results, expected, strict=True))


def test_an_embedding_added_between_runs_reruns_the_prompt_from_the_execution_cache(
    models_dir: Path, tmp_path: Path
) -> None:
    from diffsplit.engine.execution_cache import ExecutionCache
    from diffsplit.engine.executor import Executor
    from diffsplit.engine.formats import load_workflow
    from diffsplit.engine.nodes.registry import default_registry

    root = tmp_path / "models"
    shutil.copytree(models_dir / "checkpoints", root / "checkpoints")
    (root / "embeddings").mkdir()
    registry = default_registry()
    document = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a embedding:later cat", "clip": ["1", 1]}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
    }
    workflow = load_workflow(document, registry)
    executor = Executor(registry, ModelStore(root), output_dir=tmp_path / "out")
    cache = ExecutionCache()
    first = executor.run(workflow, cache=cache, targets=["2"])
    assert executor.run(workflow, cache=cache, targets=["2"]).executed == ()
    shutil.copy(models_dir / "embeddings" / SD15_EMBEDDING_FILE, root / "embeddings" / "later.safetensors")
    third = executor.run(workflow, cache=cache, targets=["2"])
    assert third.executed == ("2",)
    assert not torch.equal(first.outputs["2"][0][0][0], third.outputs["2"][0][0][0])
