"""GLIGENLoader and GLIGENTextBoxApply with the tiny SD 1.5 model and the tiny GLIGEN file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.checkpoint import CheckpointParts, load_checkpoint
from diffsplit.engine.models.gligen import MAX_OBJECTS, GligenModel
from diffsplit.engine.models.tiny_gligen import TINY_GLIGEN_FILE
from diffsplit.engine.nodes.conditioning import clip_text_encode
from diffsplit.engine.nodes.gligen import (
    GLIGEN_LOADER,
    GLIGEN_TEXTBOX_APPLY,
    NODES,
    gligen_loader,
    gligen_textbox_apply,
    unprojected_pooled,
)
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore


@dataclass
class StoreContext:
    """The parts of a NodeContext these nodes use: model files from a real store."""

    store: ModelStore
    node_id: str = "21"

    def model_path(self, folder: str, name: str) -> Path:
        return self.store.resolve(folder, name)


@pytest.fixture(autouse=True)
def single_thread(one_torch_thread: None) -> None:
    """Tiny models run fastest on one thread on a shared machine (``one_torch_thread``)."""


@pytest.fixture(scope="module")
def context(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> StoreContext:
    index = tmp_path_factory.mktemp("gligen-index") / "index.json"
    return StoreContext(ModelStore(models_dir, index_path=index))


@pytest.fixture(scope="module")
def sd15(models_dir: Path) -> CheckpointParts:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")


@pytest.fixture(scope="module")
def gligen(context: StoreContext) -> GligenModel:
    (model,) = gligen_loader(context, gligen_name=TINY_GLIGEN_FILE)
    return model


def test_nodes_are_declared_as_in_comfyui() -> None:
    registry = default_registry()
    assert registry["GLIGENLoader"] is GLIGEN_LOADER
    assert registry["GLIGENTextBoxApply"] is GLIGEN_TEXTBOX_APPLY
    assert GLIGEN_LOADER.is_loader
    loader_inputs = [(s.name, s.type, s.model_folder) for s in GLIGEN_LOADER.inputs]
    assert loader_inputs == [("gligen_name", "COMBO", "gligen")]
    assert [o.type for o in GLIGEN_LOADER.outputs] == ["GLIGEN"]
    assert [(s.name, s.type) for s in GLIGEN_TEXTBOX_APPLY.inputs] == [
        ("conditioning_to", "CONDITIONING"), ("clip", "CLIP"), ("gligen_textbox_model", "GLIGEN"),
        ("text", "STRING"), ("width", "INT"), ("height", "INT"), ("x", "INT"), ("y", "INT")]
    assert [s.name for s in GLIGEN_TEXTBOX_APPLY.widget_inputs] == ["text", "width", "height", "x", "y"]
    assert [o.type for o in GLIGEN_TEXTBOX_APPLY.outputs] == ["CONDITIONING"]
    assert len(NODES) == 2


def test_text_box_apply_appends_boxes_in_latent_units_to_every_entry(
    context: StoreContext, sd15: CheckpointParts, gligen: GligenModel
) -> None:
    (base,) = clip_text_encode(context, text="a landscape", clip=sd15.clip)
    two_entries = [*base, [base[0][0] * 2, {"strength": 0.5}]]
    (once,) = gligen_textbox_apply(context, conditioning_to=two_entries, clip=sd15.clip,
                                   gligen_textbox_model=gligen, text="a bottle", width=192, height=304,
                                   x=176, y=272)
    (twice,) = gligen_textbox_apply(context, conditioning_to=once, clip=sd15.clip,
                                    gligen_textbox_model=gligen, text="sun", width=148, height=150,
                                    x=419, y=23)
    assert len(twice) == 2
    for source, entry in zip(two_entries, twice, strict=True):
        assert entry[0] is source[0]
        kind, model, boxes = entry[1]["gligen"]
        assert kind == "position" and model is gligen
        assert [box[1:] for box in boxes] == [(38, 24, 34, 22), (18, 18, 2, 52)]  # (h, w, y, x) // 8
        assert boxes[0][0].shape == (1, 64)
    assert twice[1][1]["strength"] == 0.5
    assert "gligen" not in base[0][1] and len(once[0][1]["gligen"][2]) == 1  # inputs are not changed
    # SD 1.5's CLIP-L has no text projection: the unprojected pooled output is CLIPTextEncode's
    (bottle,) = clip_text_encode(context, text="a bottle", clip=sd15.clip)
    assert torch.equal(twice[0][1]["gligen"][2][0][0], bottle[0][1]["pooled_output"])
    assert not torch.equal(twice[0][1]["gligen"][2][0][0], twice[0][1]["gligen"][2][1][0])


def test_unprojected_pooled_skips_the_projection_of_sdxl_clip_g(
    models_dir: Path, context: StoreContext
) -> None:
    clip = load_checkpoint(models_dir / "checkpoints" / "tiny-sdxl.safetensors").clip
    (encoded,) = clip_text_encode(context, text="sun", clip=clip)
    pooled = unprojected_pooled(clip, "sun")
    projected = encoded[0][1]["pooled_output"]
    assert pooled.shape == projected.shape == (1, 128)
    assert torch.allclose(clip.encoders[-1].text_projection(pooled), projected, atol=1e-5)
    assert not torch.allclose(pooled, projected)


def test_a_clip_of_another_width_is_refused_naming_the_node_and_input(
    models_dir: Path, context: StoreContext, sd15: CheckpointParts, gligen: GligenModel
) -> None:
    clip = load_checkpoint(models_dir / "checkpoints" / "tiny-sdxl.safetensors").clip
    (base,) = clip_text_encode(context, text="x", clip=sd15.clip)
    expected = r"node 21 \(GLIGENTextBoxApply\) input 'clip'.*128 wide.*takes 64"
    with pytest.raises(WorkflowError, match=expected):
        gligen_textbox_apply(context, conditioning_to=base, clip=clip, gligen_textbox_model=gligen,
                             text="sun", width=64, height=64, x=0, y=0)


def test_more_boxes_than_gligen_takes_are_refused(
    context: StoreContext, sd15: CheckpointParts, gligen: GligenModel
) -> None:
    (conditioning,) = clip_text_encode(context, text="x", clip=sd15.clip)
    pooled = conditioning[0][1]["pooled_output"]
    full = [[conditioning[0][0], {"gligen": ("position", gligen, [(pooled, 1, 1, 0, 0)] * MAX_OBJECTS)}]]
    with pytest.raises(WorkflowError, match="at most 30 boxes"):
        gligen_textbox_apply(context, conditioning_to=full, clip=sd15.clip, gligen_textbox_model=gligen,
                             text="sun", width=64, height=64, x=0, y=0)
