"""CLIPTextEncode (+SDXL variants), prompt weighting and the conditioning edit nodes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.models.tokenizers import clip_tokenizer
from diffsplit.engine.nodes.conditioning import (
    CLIP_TEXT_ENCODE,
    CLIP_TEXT_ENCODE_SDXL,
    CLIP_TEXT_ENCODE_SDXL_REFINER,
    CONDITIONING_COMBINE,
    CONDITIONING_SET_AREA,
    CONDITIONING_ZERO_OUT,
)
from diffsplit.engine.nodes.loaders import CLIP_SET_LAST_LAYER, LORA_LOADER
from diffsplit.engine.nodes.prompt_weights import WeightedSegment, parse_prompt_weights
from diffsplit.engine.nodes.text_encoding import CHUNK_LENGTH, tokenize_prompt
from diffsplit.engine.store import ModelStore
from diffsplit.engine.types import TextEncoders

BOS, EOS = 49406, 49407


@dataclass
class StoreContext:
    """The part of a NodeContext that loader nodes use: model files from a real store."""

    store: ModelStore
    node_id: str = "1"

    def model_path(self, folder: str, name: str) -> Path:
        return self.store.resolve(folder, name)


@pytest.fixture(scope="module")
def sd15_clip(models_dir: Path) -> TextEncoders:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").clip


@pytest.fixture(scope="module")
def sdxl_clip(models_dir: Path) -> TextEncoders:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sdxl.safetensors").clip


@pytest.fixture(scope="module")
def refiner_clip(models_dir: Path) -> TextEncoders:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sdxl-refiner.safetensors").clip


def _encode(clip: TextEncoders, text: str) -> list:
    (conditioning,) = CLIP_TEXT_ENCODE.function(None, text=text, clip=clip)
    return conditioning


# --- prompt syntax -----------------------------------------------------------------


def test_weight_syntax_sets_multiplies_and_escapes() -> None:
    assert parse_prompt_weights("a (red:1.5) cat") == (
        WeightedSegment("a ", 1.0),
        WeightedSegment("red", 1.5),
        WeightedSegment(" cat", 1.0),
    )
    (nested,) = parse_prompt_weights("((big))")
    assert nested.text == "big" and nested.weight == pytest.approx(1.21)
    # a non-numeric suffix is text; the group still gets the default emphasis
    assert parse_prompt_weights("(time:now)") == (WeightedSegment("time:now", pytest.approx(1.1)),)
    assert parse_prompt_weights(r"\(not weighted\)") == (WeightedSegment("(not weighted)", 1.0),)


# --- tokenization ----------------------------------------------------------------


def test_long_prompt_is_cut_into_77_token_chunks() -> None:
    chunks = tokenize_prompt(clip_tokenizer("clip_l"), "cat " * 100, pad_with_end=True)
    assert [len(chunk.ids) for chunk in chunks] == [CHUNK_LENGTH, CHUNK_LENGTH]
    first, second = chunks
    assert first.ids[0] == BOS and first.ids[76] == EOS and first.end_index == 76
    assert second.ids[0] == BOS and second.end_index == 1 + 25
    assert set(second.ids[27:]) == {EOS}


def test_short_group_that_does_not_fit_moves_to_the_next_chunk() -> None:
    tokenizer = clip_tokenizer("clip_l")
    chunks = tokenize_prompt(tokenizer, "cat " * 74 + "(red dog:1.2)", pad_with_end=True)
    assert len(chunks) == 2
    assert chunks[0].end_index == 75 and chunks[0].ids[75:] == (EOS, EOS)
    red_dog = tokenizer("red dog", add_special_tokens=False)["input_ids"]
    assert list(chunks[1].ids[1:3]) == red_dog
    assert chunks[1].weights[1:3] == (1.2, 1.2)


def test_clip_g_pads_with_zero_and_clip_l_with_eos() -> None:
    (g_chunk,) = tokenize_prompt(clip_tokenizer("clip_g"), "a cat", pad_with_end=False)
    (l_chunk,) = tokenize_prompt(clip_tokenizer("clip_l"), "a cat", pad_with_end=True)
    assert g_chunk.ids[:4] == l_chunk.ids[:4] == (BOS, 320, 2368, EOS)
    assert set(g_chunk.ids[4:]) == {0}
    assert set(l_chunk.ids[4:]) == {EOS}


# --- CLIPTextEncode ----------------------------------------------------------------


def test_sd15_encode_is_last_hidden_state_and_pooled_eos(sd15_clip: TextEncoders) -> None:
    ((cond, extras),) = _encode(sd15_clip, "a photo of a cat")
    assert cond.shape == (1, 77, 64) and cond.dtype == torch.float32
    (chunk,) = tokenize_prompt(sd15_clip.tokenizers[0], "a photo of a cat", pad_with_end=True)
    with torch.no_grad():
        direct = sd15_clip.encoders[0](input_ids=torch.tensor([chunk.ids]))
    torch.testing.assert_close(cond, direct.last_hidden_state)
    torch.testing.assert_close(extras["pooled_output"], direct.last_hidden_state[:, chunk.end_index])


def test_prompt_longer_than_75_tokens_gives_154_tokens(sd15_clip: TextEncoders) -> None:
    ((cond, extras),) = _encode(sd15_clip, "cat " * 80)
    assert cond.shape == (1, 154, 64)
    assert extras["pooled_output"].shape == (1, 64)


def test_weighted_token_moves_away_from_the_empty_prompt(sd15_clip: TextEncoders) -> None:
    ((plain, _),) = _encode(sd15_clip, "a cat")
    ((weighted, _),) = _encode(sd15_clip, "a (cat:1.5)")
    ((empty, _),) = _encode(sd15_clip, "")
    cat = 2  # BOS, "a", "cat"
    torch.testing.assert_close(weighted[:, cat], (plain[:, cat] - empty[:, cat]) * 1.5 + empty[:, cat])
    others = [i for i in range(77) if i != cat]
    assert torch.equal(weighted[:, others], plain[:, others])


def test_clip_set_last_layer_changes_the_embedding(sd15_clip: TextEncoders) -> None:
    (last,) = CLIP_SET_LAST_LAYER.function(None, clip=sd15_clip, stop_at_clip_layer=-1)
    (penultimate,) = CLIP_SET_LAST_LAYER.function(None, clip=sd15_clip, stop_at_clip_layer=-2)
    ((default_cond, _),) = _encode(sd15_clip, "a cat")
    ((last_cond, _),) = _encode(last, "a cat")
    ((penultimate_cond, penultimate_extras),) = _encode(penultimate, "a cat")
    assert torch.equal(last_cond, default_cond)  # SD 1.x: -1 is the normed last layer
    assert not torch.allclose(penultimate_cond, last_cond)
    assert penultimate_cond.shape == last_cond.shape
    # the pooled output always comes from the last layer
    ((_, last_extras),) = _encode(last, "a cat")
    torch.testing.assert_close(penultimate_extras["pooled_output"], last_extras["pooled_output"])
    assert sd15_clip.layer_idx is None and penultimate.layer_idx == -2


def test_sdxl_encode_concatenates_l_and_g(sdxl_clip: TextEncoders) -> None:
    ((cond, extras),) = _encode(sdxl_clip, "a photo of a cat")
    assert cond.shape == (1, 77, 64 + 128)
    assert extras["pooled_output"].shape == (1, 128)
    ((long_cond, _),) = _encode(sdxl_clip, "cat " * 80)
    assert long_cond.shape == (1, 154, 192)


def test_sdxl_uses_penultimate_layers_without_norm_and_g_text_embeds(sdxl_clip: TextEncoders) -> None:
    ((cond, extras),) = _encode(sdxl_clip, "a cat")
    (l_chunk,) = tokenize_prompt(sdxl_clip.tokenizers[0], "a cat", pad_with_end=True)
    (g_chunk,) = tokenize_prompt(sdxl_clip.tokenizers[1], "a cat", pad_with_end=False)
    with torch.no_grad():
        l_out = sdxl_clip.encoders[0](input_ids=torch.tensor([l_chunk.ids]), output_hidden_states=True)
        g_out = sdxl_clip.encoders[1](input_ids=torch.tensor([g_chunk.ids]), output_hidden_states=True)
    torch.testing.assert_close(cond[..., :64], l_out.hidden_states[-2])
    torch.testing.assert_close(cond[..., 64:], g_out.hidden_states[-2])
    torch.testing.assert_close(extras["pooled_output"], g_out.text_embeds)


def test_clip_text_encode_sdxl_routes_prompts_and_pads_chunks(sdxl_clip: TextEncoders) -> None:
    (conditioning,) = CLIP_TEXT_ENCODE_SDXL.function(
        None, clip=sdxl_clip, width=1024, height=768, crop_w=0, crop_h=16,
        target_width=1024, target_height=768, text_g="a cat", text_l="cat " * 80,
    )  # fmt: skip
    ((cond, extras),) = conditioning
    assert cond.shape == (1, 154, 192)
    sizes = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")
    assert [extras[key] for key in sizes] == [1024, 768, 0, 16, 1024, 768]
    ((same_g, same_extras),) = _encode(sdxl_clip, "a cat")
    # the G half of the first chunk and the pooled output come from text_g alone
    torch.testing.assert_close(cond[:, :77, 64:], same_g[:, :, 64:])
    torch.testing.assert_close(extras["pooled_output"], same_extras["pooled_output"])
    assert not torch.allclose(cond[:, :77, :64], same_g[:, :, :64])


def test_clip_text_encode_sdxl_rejects_an_sd15_clip(sd15_clip: TextEncoders) -> None:
    with pytest.raises(WorkflowError, match="SDXL base"):
        CLIP_TEXT_ENCODE_SDXL.function(
            None, clip=sd15_clip, width=1024, height=1024, crop_w=0, crop_h=0,
            target_width=1024, target_height=1024, text_g="a", text_l="b",
        )  # fmt: skip


def test_refiner_encode_has_aesthetic_score(refiner_clip: TextEncoders) -> None:
    (conditioning,) = CLIP_TEXT_ENCODE_SDXL_REFINER.function(
        None, ascore=2.5, width=896, height=1152, text="a cat", clip=refiner_clip
    )
    ((cond, extras),) = conditioning
    assert cond.shape == (1, 77, 128)
    assert extras["pooled_output"].shape == (1, 128)
    assert (extras["aesthetic_score"], extras["width"], extras["height"]) == (2.5, 896, 1152)


def test_lora_strength_clip_zero_is_identical_and_positive_differs(
    sd15_clip: TextEncoders, models_dir: Path, tmp_path: Path
) -> None:
    context = StoreContext(ModelStore(models_dir, index_path=tmp_path / "index.json"))
    model = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").model
    lora_name = "tiny-sd15-lora.safetensors"
    _, clip_off = LORA_LOADER.function(
        context, model=model, clip=sd15_clip, lora_name=lora_name, strength_model=1.0, strength_clip=0.0
    )
    _, clip_on = LORA_LOADER.function(
        context, model=model, clip=sd15_clip, lora_name=lora_name, strength_model=1.0, strength_clip=0.8
    )
    ((base, _),) = _encode(sd15_clip, "a cat")
    ((off, _),) = _encode(clip_off, "a cat")
    ((on, _),) = _encode(clip_on, "a cat")
    assert torch.equal(off, base)
    assert not torch.allclose(on, base)
    ((base_again, _),) = _encode(sd15_clip, "a cat")
    assert torch.equal(base_again, base)  # the base CLIP was not patched in place


# --- conditioning edits ------------------------------------------------------------


def _toy_conditioning() -> list:
    return [[torch.ones(1, 77, 8), {"pooled_output": torch.ones(1, 8), "width": 512}]]


def test_conditioning_combine_concatenates() -> None:
    first, second = _toy_conditioning(), _toy_conditioning()
    (combined,) = CONDITIONING_COMBINE.function(None, conditioning_1=first, conditioning_2=second)
    assert len(combined) == 2
    assert combined[0][0] is first[0][0] and combined[1][0] is second[0][0]
    assert len(first) == 1 and len(second) == 1


def test_conditioning_set_area_copies_entries() -> None:
    original = _toy_conditioning()
    (updated,) = CONDITIONING_SET_AREA.function(
        None, conditioning=original, width=256, height=128, x=64, y=32, strength=0.7
    )
    ((cond, extras),) = updated
    assert extras["area"] == (16, 32, 4, 8)
    assert extras["strength"] == 0.7 and extras["width"] == 512
    assert "area" not in original[0][1]
    assert cond is original[0][0]


def test_conditioning_zero_out_zeroes_copies() -> None:
    original = _toy_conditioning()
    (zeroed,) = CONDITIONING_ZERO_OUT.function(None, conditioning=original)
    ((cond, extras),) = zeroed
    assert torch.count_nonzero(cond) == 0 and torch.count_nonzero(extras["pooled_output"]) == 0
    assert extras["width"] == 512
    assert torch.equal(original[0][0], torch.ones(1, 77, 8))
    assert torch.equal(original[0][1]["pooled_output"], torch.ones(1, 8))


def test_declared_widget_order_matches_comfyui() -> None:
    def widgets(node):
        return [spec.name for spec in node.widget_inputs]

    assert widgets(CLIP_TEXT_ENCODE_SDXL) == [
        "width", "height", "crop_w", "crop_h", "target_width", "target_height", "text_g", "text_l",
    ]  # fmt: skip
    assert CLIP_TEXT_ENCODE_SDXL.inputs[0].name == "clip"
    assert widgets(CLIP_TEXT_ENCODE_SDXL_REFINER) == ["ascore", "width", "height", "text"]
    assert widgets(CONDITIONING_SET_AREA) == ["width", "height", "x", "y", "strength"]
    assert CLIP_TEXT_ENCODE.input("text").multiline
