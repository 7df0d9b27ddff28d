"""OpenposePreprocessor: people found in synthetic OpenPose maps, the drawing, the body model's layout
from its keys (safetensors and the pack's .pth), the files and settings refused, and the node."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.pose_model import (
    BodyPoseNetwork,
    layer_channels,
    load_body_pose_model,
)
from diffsplit.engine.models.pose_people import (
    LIMB_FIELDS,
    LIMBS,
    PARTS,
    Keypoint,
    Person,
    find_peaks,
    find_people,
)
from diffsplit.engine.nodes.pose import (
    COLOURS,
    LIMB_SHADE,
    Figure,
    body_maps,
    draw_people,
    openpose,
    stick_scale,
)
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore

HEIGHT, WIDTH = 96, 128

#: a standing figure, (x, y) per COCO part
FIGURE = ((40, 12), (40, 24), (32, 24), (28, 38), (26, 52), (48, 24), (52, 38), (54, 52), (34, 52),
          (34, 68), (34, 84), (46, 52), (46, 68), (46, 84), (37, 10), (43, 10), (34, 11), (46, 11))


def context(models_dir: Path) -> Any:
    return SimpleNamespace(node_id="40", model_path=ModelStore(models_dir).resolve)


def synthetic_maps(figures: list[tuple[tuple[int, int], ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenPose maps of ``figures``: a Gaussian peak per part and unit fields along each limb."""
    ys = torch.arange(HEIGHT, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(WIDTH, dtype=torch.float32).view(1, -1)
    heatmaps = torch.zeros(19, HEIGHT, WIDTH)
    fields = torch.zeros(38, HEIGHT, WIDTH)
    for figure in figures:
        for part, (x, y) in enumerate(figure):
            heatmaps[part] = torch.maximum(heatmaps[part], torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 8))
        for (a, b), (cx, cy) in zip(LIMBS, LIMB_FIELDS, strict=True):
            (ax, ay), (bx, by) = figure[a], figure[b]
            length = math.hypot(bx - ax, by - ay)
            ux, uy = (bx - ax) / length, (by - ay) / length
            along = (xs - ax) * ux + (ys - ay) * uy
            across = ((xs - ax) * uy - (ys - ay) * ux).abs()
            band = (along >= -1) & (along <= length + 1) & (across <= 1.5)
            fields[cx][band] = ux
            fields[cy][band] = uy
    return fields, heatmaps


def shifted(figure: tuple[tuple[int, int], ...], dx: int) -> tuple[tuple[int, int], ...]:
    return tuple((x + dx, y) for x, y in figure)


def test_every_part_of_a_figure_is_found_at_its_place() -> None:
    (person,) = find_people(*synthetic_maps([FIGURE]))
    for part, (x, y) in enumerate(FIGURE):
        point = person.parts[part]
        assert point is not None, PARTS[part]
        assert (point.x, point.y) == (x, y)
        assert point.score == pytest.approx(1.0, abs=1e-3)


def test_two_figures_are_two_people_and_never_mixed() -> None:
    people = find_people(*synthetic_maps([FIGURE, shifted(FIGURE, 50)]))
    assert len(people) == 2
    for person in people:
        xs = {point.x for point in person.parts if point is not None}
        assert max(xs) - min(xs) < 40  # all on one figure
    assert sorted(person.parts[0].x for person in people if person.parts[0]) == [40, 90]


def test_parts_with_no_fields_between_them_are_not_a_person() -> None:
    fields, heatmaps = synthetic_maps([FIGURE])
    assert find_people(torch.zeros_like(fields), heatmaps) == []
    assert [len(found) for found in find_peaks(heatmaps)] == [1] * len(PARTS)
    assert find_peaks(heatmaps * 0.05) == [[] for _ in PARTS]  # under the peak threshold


def test_a_limb_against_its_field_is_not_joined() -> None:
    fields, heatmaps = synthetic_maps([FIGURE])
    assert find_people(-fields, heatmaps) == []  # every field points the other way


def test_the_drawing_has_the_part_colours_at_the_parts_and_shaded_limbs() -> None:
    people = [Person(parts=tuple(Keypoint(float(x), float(y), 1.0) for x, y in FIGURE), score=30.0)]
    canvas = draw_people([Figure(person) for person in people], HEIGHT, WIDTH)
    for part, (x, y) in enumerate(FIGURE):
        if part in (14, 15, 16, 17, 0):  # the face's dots overlap each other
            continue
        assert canvas[:, y, x].tolist() == pytest.approx([c / 255 for c in COLOURS[part]], abs=1e-6)
    # the middle of the right upper leg (limb 7: right hip to right knee), away from any dot
    assert canvas[:, 60, 34].tolist() == pytest.approx([c * LIMB_SHADE / 255 for c in COLOURS[7]], abs=1e-6)
    assert float(canvas[:, 90:, :].abs().sum()) == 0.0  # below the feet
    assert float(draw_people([], HEIGHT, WIDTH).abs().sum()) == 0.0


def test_sticks_widen_on_large_images_only_for_xinsr() -> None:
    assert stick_scale(512, 512, False) == 1
    assert stick_scale(400, 480, True) == 1
    scales = (stick_scale(512, 768, True), stick_scale(1024, 2048, True), stick_scale(8000, 9000, True))
    assert scales == (2, 4, 7)


def test_the_node_draws_at_the_input_size_with_keypoints_per_image(models_dir: Path) -> None:
    image = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(3))
    drawing, keypoints = openpose(context(models_dir), image=image, resolution=64)
    assert drawing.shape == (2, 40, 56, 3) and float(drawing.min()) >= 0 and float(drawing.max()) <= 1
    assert [(entry["canvas_height"], entry["canvas_width"]) for entry in keypoints] == [(40, 56)] * 2
    for entry in keypoints:
        for person in entry["people"]:
            assert len(person["pose_keypoints_2d"]) == 3 * len(PARTS)
    # the default name is the pack's body_pose_model.pth; the tiny set's .safetensors twin serves it
    assert not (models_dir / "preprocessors" / "body_pose_model.pth").exists()
    off, none = openpose(context(models_dir), image=image, detect_body="disable", resolution=64)
    assert float(off.abs().sum()) == 0.0 and all(entry["people"] == [] for entry in none)


def test_the_network_sees_the_pack_input(models_dir: Path) -> None:
    network = load_body_pose_model(models_dir / "preprocessors" / "body_pose_model.safetensors")
    seen: list[torch.Size] = []
    handle = network.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    try:
        fields, heatmaps = body_maps(torch.rand(3, 64, 80), network)
    finally:
        handle.remove()
    # 184 px high (half of OpenPose's 368 px box), 230 wide padded to 232
    assert seen == [torch.Size([1, 3, 184, 232])]
    assert fields.shape == (38, 64, 80) and heatmaps.shape == (19, 64, 80)


def test_a_pth_of_the_pack_layout_loads_weights_only(models_dir: Path, tmp_path: Path) -> None:
    tiny = load_body_pose_model(models_dir / "preprocessors" / "body_pose_model.safetensors")
    image = torch.rand(3, 48, 48)
    for keys in ("file", "module"):
        state = tiny.file_state_dict()
        if keys == "module":
            state = {module_key(key): value for key, value in state.items()}
        path = tmp_path / f"{keys}.pth"
        torch.save(state, path)
        loaded = load_body_pose_model(path)
        for got, expected in zip(body_maps(image, loaded), body_maps(image, tiny), strict=True):
            assert torch.equal(got, expected)


def module_key(key: str) -> str:
    """The key of the pack's module for a file key: model0.conv1_1..., model1_2.conv5_1_CPM_L2...,
    model2_1.Mconv1_stage2_L1..."""
    layer = key.split(".")[0]
    if "_L" not in layer:
        return f"model0.{key}"
    branch = layer[-1]
    stage = layer.split("_stage")[1][0] if "_stage" in layer else "1"
    return f"model{stage}_{branch}.{key}"


def test_what_is_not_a_body_model_is_refused(models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not an OpenPose body model: no 3x3 conv conv1_1"):
        load_body_pose_model(models_dir / "controlnet" / "tiny-sd15-controlnet.safetensors")
    tiny = load_body_pose_model(models_dir / "preprocessors" / "body_pose_model.safetensors")
    shapes = {key: tuple(value.shape) for key, value in tiny.file_state_dict().items()}
    wrong_maps = dict(shapes, **{"Mconv7_stage6_L2.weight": (18, 4, 1, 1), "Mconv7_stage6_L2.bias": (18,)})
    with pytest.raises(ModelFileError, match="Mconv7_stage6_L2 gives 18 maps, an OpenPose body model gives"):
        layer_channels(wrong_maps)
    broken_chain = dict(shapes, **{"conv2_1.weight": (8, 5, 3, 3)})
    with pytest.raises(ModelFileError, match="conv2_1 takes 5 channels where the layer before gives 4"):
        layer_channels(broken_chain)
    state = tiny.file_state_dict()
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(ModelFileError, match="keys an OpenPose body model does not have"):
        load_body_pose_model(path)
    assert isinstance(tiny, BodyPoseNetwork)


def test_the_pack_widget_order_with_the_file_last() -> None:
    node = default_registry()["OpenposePreprocessor"]
    assert [spec.name for spec in node.inputs] == [
        "image", "detect_hand", "detect_body", "detect_face", "resolution", "scale_stick_for_xinsr_cn",
        "ckpt_name", "hand_ckpt_name", "face_ckpt_name"]
    assert [output.type for output in node.outputs] == ["IMAGE", "POSE_KEYPOINT"]
    assert node.category == "image/preprocessors"
