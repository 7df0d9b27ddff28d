"""OpenPose hands and faces: the boxes the body's parts give, the points the networks' maps give at
the right places, the drawing, the files, and the node with both enabled."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.keypoint_model import FACE, HAND, KeypointNetwork, load_keypoint_model
from diffsplit.engine.models.pose_parts import (
    HAND_POINTS,
    Box,
    Point,
    face_box,
    face_points,
    hand_boxes,
    hand_points,
)
from diffsplit.engine.models.pose_people import Keypoint, Person
from diffsplit.engine.nodes.pose import (
    COLOURS,
    HAND_BONES,
    Figure,
    draw_people,
    figures_of,
    hand_colour,
    keypoint_json,
    openpose,
)
from diffsplit.engine.store import ModelStore


def context(models_dir: Path) -> Any:
    return SimpleNamespace(node_id="41", model_path=ModelStore(models_dir).resolve)


def body(points: dict[int, tuple[float, float]]) -> Person:
    parts = tuple(Keypoint(*points[i], 1.0) if i in points else None for i in range(18))
    return Person(parts=parts, score=9.0)


#: shoulder, elbow, wrist of each arm, a nose, eyes and ears
ARMS = {5: (60.0, 40.0), 6: (70.0, 70.0), 7: (80.0, 100.0), 2: (30.0, 40.0), 3: (28.0, 52.0), 4: (26.0, 60.0)}
HEAD = {0: (45.0, 20.0), 14: (41.0, 17.0), 15: (49.0, 17.0), 16: (37.0, 19.0), 17: (53.0, 19.0)}


def test_hand_boxes_follow_the_forearm_and_drop_small_ones() -> None:
    left, right = hand_boxes(body(ARMS).parts, 200, 200)
    forearm, upper = math.hypot(10, 30), math.hypot(10, 30)
    side = 1.5 * max(forearm, 0.9 * upper)
    assert left == Box(int(80 + 0.33 * 10 - side / 2), int(100 + 0.33 * 30 - side / 2), int(side))
    assert right is None  # 1.5 * max(8.2, 0.9 * 12.2) = 16.5 px: under 20
    # clipped at the image's right edge: the side shrinks to what is left
    (clipped, _) = hand_boxes(body({5: (160.0, 40.0), 6: (175.0, 70.0), 7: (190.0, 100.0)}).parts, 200, 200)
    assert clipped is not None and clipped.x + clipped.side <= 200
    assert hand_boxes(body({5: (60.0, 40.0), 7: (80.0, 100.0)}).parts, 200, 200) == (None, None)


def test_the_face_box_is_the_nose_with_the_widest_reach() -> None:
    box = face_box(body(HEAD).parts, 100, 100)
    reach = max(4.0 * 3.0, 8.0 * 1.5)  # an eye 4 px away (x3), an ear 8 px away (x1.5)
    assert box == Box(int(45 - reach), int(20 - reach), int(2 * reach))
    assert face_box(body({0: (45.0, 20.0)}).parts, 100, 100) is None
    assert face_box(body({0: (45.0, 20.0), 14: (44.0, 19.0)}).parts, 100, 100) is None  # 6 px: too small


class PeakNetwork(KeypointNetwork):
    """A stand-in whose maps peak where ``places`` say (fractions of its input's sides), recording what
    it is given: the geometry from box to maps to points is what is tested."""

    def __init__(self, maps: int, places: dict[int, tuple[float, float]]) -> None:
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.maps, self.places, self.seen = maps, places, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        side = x.shape[-1] // 8
        grid = torch.arange(side, dtype=torch.float32)
        maps = torch.zeros(1, self.maps, side, side)
        for part, (fx, fy) in self.places.items():
            spread = max(side / 40, 0.7)
            squared = (grid.view(1, -1) - fx * side) ** 2 + (grid.view(-1, 1) - fy * side) ** 2
            maps[0, part] = torch.exp(-squared / (2 * spread**2))
        return maps


def test_hand_points_come_back_at_their_places_in_the_image() -> None:
    places = {part: (0.2 + 0.03 * part, 0.7 - 0.025 * part) for part in range(HAND_POINTS) if part != 9}
    network = PeakNetwork(22, places)
    bgr = torch.rand(3, 120, 160, generator=torch.Generator().manual_seed(1)) * 255
    box = Box(30, 10, 96)
    points = hand_points(network, bgr, box)
    assert len(points) == HAND_POINTS and points[9] is None
    for part, (fx, fy) in places.items():
        point = points[part]
        assert point is not None
        assert abs(point.x - (box.x + fx * box.side)) <= 2.5 and abs(point.y - (box.y + fy * box.side)) <= 2.5
    # four scales of the pack's 368 px box, BGR / 256 - 0.5
    assert [tuple(x.shape) for x in network.seen] == [(1, 3, s, s) for s in (184, 368, 552, 736)]
    assert all(float(x.min()) >= -0.5 and float(x.max()) < 0.5 for x in network.seen)


def test_face_points_are_each_map_over_the_threshold() -> None:
    places = {part: (0.1 + 0.011 * part, 0.5) for part in range(0, 70, 3)}
    network = PeakNetwork(71, places)
    box = Box(5, 7, 60)
    points = face_points(network, torch.rand(3, 80, 80) * 255, box)
    assert len(points) == len(places)  # the flat background map gives none
    for point, (fx, fy) in zip(points, places.values(), strict=True):
        assert abs(point.x - (box.x + fx * box.side)) <= 2.0 and abs(point.y - (box.y + fy * box.side)) <= 2.0
    assert [tuple(x.shape) for x in network.seen] == [(1, 3, 384, 384)]
    # a box past the right edge (the pack's face box can be): the maps cover the 35 px inside
    network = PeakNetwork(71, {0: (0.5, 0.5)})
    (point,) = face_points(network, torch.rand(3, 80, 100) * 255, Box(65, 10, 60))
    assert abs(point.x - (65 + 0.5 * 35)) <= 1.5 and abs(point.y - (10 + 0.5 * 60)) <= 1.5


def test_figures_look_for_hands_and_faces_only_where_asked() -> None:
    person = body({**ARMS, **HEAD, 1: (45.0, 35.0)})
    picture = torch.rand(3, 200, 200)
    hand = PeakNetwork(22, {part: (0.5, 0.5) for part in range(21)})
    face = PeakNetwork(71, {part: (0.5, 0.5) for part in range(70)})
    (both,) = figures_of([person], picture, hand, face)
    assert both.left_hand is not None and both.right_hand is None and both.face is not None
    (plain,) = figures_of([person], picture, None, None)
    assert plain == Figure(person)


def test_the_drawing_has_rainbow_bones_blue_hand_dots_white_face_dots_and_round_body_dots() -> None:
    assert hand_colour(0) == (1.0, 0.0, 0.0)
    assert hand_colour(5) == pytest.approx((0.5, 1.0, 0.0))
    assert len(HAND_BONES) == 20 and HAND_BONES[:5] == ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5))
    hand: list[Point | None] = [None] * 21
    hand[0], hand[1] = Point(20.0, 60.0), Point(60.0, 60.0)
    person = body({1: (80.0, 20.0)})
    figure = Figure(person, left_hand=tuple(hand), face=(Point(10.0, 10.0),))
    canvas = draw_people([figure], 90, 100)
    assert canvas[:, 60, 40].tolist() == [1.0, 0.0, 0.0]  # the first bone, away from its dots
    assert canvas[:, 61, 40].tolist() == [1.0, 0.0, 0.0] and canvas[:, 63, 40].sum() == 0  # 2 px wide
    assert canvas[:, 60, 20].tolist() == [0.0, 0.0, 1.0] and canvas[:, 63, 60].tolist() == [0.0, 0.0, 1.0]
    assert canvas[:, 10, 12].tolist() == [1.0, 1.0, 1.0] and canvas[:, 10, 14].sum() == 0  # radius 3
    neck = [c / 255 for c in COLOURS[1]]
    for dx, dy in ((0, 0), (3, 0), (-3, 0), (0, 3), (0, -3), (2, 2)):  # a disc of radius 4
        assert canvas[:, 20 + dy, 80 + dx].tolist() == pytest.approx(neck)
    assert canvas[:, 20, 85].sum() == 0


def test_the_json_has_the_hands_and_the_face_in_the_inputs_pixels() -> None:
    hand: list[Point | None] = [None] * 21
    hand[3] = Point(10.0, 20.0)
    figure = Figure(body({1: (5.0, 5.0)}), right_hand=tuple(hand), face=(Point(4.0, 8.0),))
    (entry,) = keypoint_json([figure], 200, 100, 2.0, 0.5)["people"]
    assert entry["hand_left_keypoints_2d"] is None
    assert entry["hand_right_keypoints_2d"][9:12] == [5.0, 40.0, 1.0]
    right = entry["hand_right_keypoints_2d"]
    assert right[:3] == [0.0, 0.0, 0.0] and len(right) == 63
    assert entry["face_keypoints_2d"] == [2.0, 16.0, 1.0]


def test_the_tiny_hand_and_face_files_load_and_the_wrong_kind_is_refused(models_dir: Path,
                                                                          tmp_path: Path) -> None:
    folder = models_dir / "preprocessors"
    hand = load_keypoint_model(folder / "hand_pose_model.safetensors", HAND)
    face = load_keypoint_model(folder / "facenet.safetensors", FACE)
    assert hand(torch.rand(1, 3, 64, 64)).shape == (1, 22, 8, 8)
    assert face(torch.rand(1, 3, 64, 64)).shape == (1, 71, 8, 8)
    with pytest.raises(ModelFileError, match="conv6_2_CPM gives 71 maps, an OpenPose hand model gives 22"):
        load_keypoint_model(folder / "facenet.safetensors", HAND)
    with pytest.raises(ModelFileError, match="not an OpenPose face model: no 3x3 conv conv4_3"):
        load_keypoint_model(folder / "body_pose_model.safetensors", FACE)
    # the pack's hand module keys (model1_0.conv1_1, model1_1.conv6_1_CPM, model2.Mconv1_stage2), weights-only
    state = {}
    for key, value in hand.file_state_dict().items():
        layer = key.split(".")[0]
        module = ("model1_1" if layer.startswith("conv6") else "model1_0" if layer.startswith("conv")
                  else f"model{layer.split('_stage')[1]}")
        state[f"{module}.{key}"] = value
    torch.save(state, tmp_path / "hand_pose_model.pth")
    again = load_keypoint_model(tmp_path / "hand_pose_model.pth", HAND)
    pixels = torch.rand(1, 3, 32, 32)
    assert torch.equal(again(pixels), hand(pixels))


def test_the_node_runs_hands_and_faces_and_names_the_missing_file(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import diffsplit.engine.nodes.pose as pose_node

    # the tiny body model finds nobody in noise: the people come from the body's maps, stood in here
    person = body({**ARMS, **HEAD, 1: (45.0, 35.0)})
    monkeypatch.setattr(pose_node, "find_people", lambda fields, heatmaps: [person])
    calls: list[str] = []
    for name in ("hand_points", "face_points"):
        real = getattr(pose_node, name)
        monkeypatch.setattr(pose_node, name, lambda *args, _real=real, _name=name: calls.append(_name)
                            or _real(*args))
    image = torch.rand(1, 200, 200, 3, generator=torch.Generator().manual_seed(2))
    drawing, keypoints = openpose(context(models_dir), image=image, resolution=200, detect_hand="enable",
                                  detect_face="enable")
    assert drawing.shape == (1, 200, 200, 3)
    assert calls == ["hand_points", "face_points"]  # the left hand (the right arm is too short) and the face
    (entry,) = keypoints[0]["people"]
    assert entry["hand_right_keypoints_2d"] is None
    assert entry["hand_left_keypoints_2d"] is None or len(entry["hand_left_keypoints_2d"]) == 63
    bare = tmp_path / "models"
    (bare / "preprocessors").mkdir(parents=True)
    (bare / "preprocessors" / "body_pose_model.safetensors").write_bytes(
        (models_dir / "preprocessors" / "body_pose_model.safetensors").read_bytes())
    openpose(context(bare), image=image, resolution=64)  # hands and faces off: their files are not read
    with pytest.raises(ModelFileError, match=r"hand_pose_model\.pth"):
        openpose(context(bare), image=image, resolution=64, detect_hand="enable")


def test_hands_and_faces_are_looked_for_on_the_best_sixteen_people_only() -> None:
    people = [Person(parts=body({**ARMS, **HEAD}).parts, score=float(i)) for i in range(20)]
    hand = PeakNetwork(22, {})
    figures = figures_of(people, torch.rand(3, 200, 200), hand, None)
    assert len(figures) == 20 and len(hand.seen) == 16 * 4  # one hand each, four scales
    assert [f.left_hand is not None for f in figures] == [i >= 4 for i in range(20)]


@pytest.mark.parametrize(("body_on", "hand", "face", "files"), [
    ("enable", "disable", "disable", {"body_pose_model.pth"}),
    ("enable", "enable", "disable", {"body_pose_model.pth", "hand_pose_model.pth"}),
    ("enable", "enable", "enable", {"body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"}),
    ("disable", "enable", "enable", {"body_pose_model.pth"}),  # hands and faces need a body
])
def test_a_worker_is_sent_only_the_files_the_call_reads(models_dir: Path, body_on: str, hand: str, face: str,
                                                       files: set[str]) -> None:
    from diffsplit.engine.executor import NodeCall
    from diffsplit.engine.nodes.registry import default_registry
    from diffsplit.engine.run_files import model_input_files

    node_class = default_registry()["OpenposePreprocessor"]
    inputs = {"detect_body": body_on, "detect_hand": hand, "detect_face": face}
    call = NodeCall(node=None, node_class=node_class, inputs=inputs,  # type: ignore[arg-type]
                    context=context(models_dir), workflow=None)  # type: ignore[arg-type]
    found = model_input_files(call)
    assert {name for _, name in found} == files
    assert all(path.suffix == ".safetensors" for path in found.values())  # the tiny set's twins
