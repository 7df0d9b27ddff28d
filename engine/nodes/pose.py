"""OpenposePreprocessor (the common preprocessor pack's node, inputs and outputs) on the OpenPose body,
hand and face models from the ``preprocessors`` folder: ``ckpt_name``, ``hand_ckpt_name`` and
``face_ckpt_name`` (not widgets of the pack, which reads fixed files) default to the pack's
``body_pose_model.pth``, ``hand_pose_model.pth`` and ``facenet.pth``, whose ``.safetensors`` twins
serve too; the hand and face files are read only with ``detect_hand`` / ``detect_face`` enabled.

The image is resized so its short side is ``resolution`` (sides multiples of 8), and the body
model runs on it as the pack does: scaled so its height is 184 px (half of OpenPose's 368 px box),
BGR, ``pixel / 256 - 0.5``, padded to a multiple of 8; its maps are resized back to that image,
people are found (:mod:`diffsplit.engine.models.pose_people`) and drawn on black in OpenPose's
colours: limbs as ellipses 4 px wide at 60% colour, parts as dots of radius 4. With hands and faces
enabled each person's hands and face are found from its body parts
(:mod:`diffsplit.engine.models.pose_parts`) and drawn after its body: a hand's 20 bones as 2 px lines
in a rainbow of hues and its points as blue dots of radius 4, a face's points as white dots of
radius 3. The drawing is resized to the input's size. ``scale_stick_for_xinsr_cn`` widens the
sticks on large images for xinsr's pose ControlNet (x1 under 500 px, else 2 + side // 1000, at
most 7).

The second output, POSE_KEYPOINT, is the people of each image in OpenPose's JSON form, in the
input's pixels: ``pose_keypoints_2d`` as x, y, score (zeros where a part was not found);
``hand_left_keypoints_2d`` / ``hand_right_keypoints_2d`` as x, y, 1 (zeros where a point was not
found) and ``face_keypoints_2d`` (the face points found), each null where not looked for or not
found.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.models.keypoint_model import FACE, HAND, KeypointNetwork, load_keypoint_model
from diffsplit.engine.models.pose_model import BodyPoseNetwork, load_body_pose_model
from diffsplit.engine.models.pose_parts import Point, face_box, face_points, hand_boxes, hand_points
from diffsplit.engine.models.pose_people import LIMBS, STARTING_LIMBS, Keypoint, Person, find_people
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.model_files import find_model_file
from diffsplit.engine.nodes.network_input import (
    PREPROCESSORS,
    for_network,
    network_file_input,
    resized_rgb,
    resolution_input,
)

BODY_MODEL = "body_pose_model.pth"
HAND_MODEL = "hand_pose_model.pth"
FACE_MODEL = "facenet.pth"
#: hands and faces are looked for on the best-scored people only (each hand is four network runs)
MAX_PEOPLE_WITH_PARTS = 16
#: the height the body model sees: half of OpenPose's 368 px box, its one search scale here
NETWORK_HEIGHT = 184
STRIDE = 8
STICK_WIDTH = 4
DOT_RADIUS = 4
LIMB_SHADE = 0.6
HAND_LINE_RADIUS = 1.0
HAND_DOT_RADIUS = 4
FACE_DOT_RADIUS = 3
#: the hand's bones: wrist (0) to each finger's four points
HAND_BONES: tuple[tuple[int, int], ...] = tuple(
    pair for finger in range(5) for pair in ((0 if j == 0 else 4 * finger + j, 4 * finger + j + 1)
                                             for j in range(4))
)
COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)


def body_maps(pixels: torch.Tensor, network: BodyPoseNetwork) -> tuple[torch.Tensor, torch.Tensor]:
    """The (fields, heat maps) of one RGB image ``[3, H, W]`` in [0, 1], at ``H x W``."""
    height, width = pixels.shape[-2:]
    scale = NETWORK_HEIGHT / height
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    scaled = torch.nn.functional.interpolate(pixels[None], size=size, mode="bicubic", align_corners=False)
    bgr = (scaled.clamp(0, 1) * 255).flip(1) / 256 - 0.5
    pad_h, pad_w = (-size[0]) % STRIDE, (-size[1]) % STRIDE
    padded = torch.nn.functional.pad(bgr, (0, pad_w, 0, pad_h), value=128 / 256 - 0.5)
    with torch.no_grad():
        fields, heatmaps = network(for_network(padded, network))
    maps = torch.cat([fields, heatmaps], dim=1).float().cpu()
    maps = torch.nn.functional.interpolate(maps, scale_factor=STRIDE, mode="bicubic", align_corners=False)
    maps = maps[..., : size[0], : size[1]]
    maps = torch.nn.functional.interpolate(maps, size=(height, width), mode="bicubic", align_corners=False)[0]
    return maps[: fields.shape[1]], maps[fields.shape[1]:]


def stick_scale(height: int, width: int, xinsr: bool) -> int:
    """How many times wider than 4 px the limbs are drawn."""
    side = max(height, width)
    if not xinsr or side < 500:
        return 1
    return min(2 + side // 1000, 7)


def _fill(canvas: torch.Tensor, inside: torch.Tensor, top: int, left: int, colour: tuple[float, ...]) -> None:
    region = canvas[:, top: top + inside.shape[0], left: left + inside.shape[1]]
    region[:, inside] = torch.tensor(colour, dtype=canvas.dtype).view(3, 1)


def _draw_ellipse(canvas: torch.Tensor, a: tuple[float, float], b: tuple[float, float], half_width: float,
                  colour: tuple[float, ...]) -> None:
    (ax, ay), (bx, by) = a, b
    cx, cy = (ax + bx) / 2, (ay + by) / 2
    half_length = max(math.hypot(bx - ax, by - ay) / 2, 0.5)
    angle = math.atan2(by - ay, bx - ax)
    reach = half_length + half_width
    height, width = canvas.shape[-2:]
    top, bottom = max(0, math.floor(cy - reach)), min(height, math.ceil(cy + reach) + 1)
    left, right = max(0, math.floor(cx - reach)), min(width, math.ceil(cx + reach) + 1)
    if top >= bottom or left >= right:
        return
    ys = torch.arange(top, bottom, dtype=torch.float64).view(-1, 1) - cy
    xs = torch.arange(left, right, dtype=torch.float64).view(1, -1) - cx
    along = xs * math.cos(angle) + ys * math.sin(angle)
    across = -xs * math.sin(angle) + ys * math.cos(angle)
    _fill(canvas, (along / half_length) ** 2 + (across / half_width) ** 2 <= 1, top, left, colour)


def _draw_near(canvas: torch.Tensor, a: tuple[float, float], b: tuple[float, float], radius: float,
               colour: tuple[float, ...]) -> None:
    """Fill the pixels within ``radius`` of the segment ``a``-``b`` (a dot where they meet)."""
    (ax, ay), (bx, by) = a, b
    height, width = canvas.shape[-2:]
    top, bottom = max(0, math.floor(min(ay, by) - radius)), min(height, math.ceil(max(ay, by) + radius) + 1)
    left, right = max(0, math.floor(min(ax, bx) - radius)), min(width, math.ceil(max(ax, bx) + radius) + 1)
    if top >= bottom or left >= right:
        return
    ys = torch.arange(top, bottom, dtype=torch.float64).view(-1, 1)
    xs = torch.arange(left, right, dtype=torch.float64).view(1, -1)
    dx, dy = bx - ax, by - ay
    along = ((xs - ax) * dx + (ys - ay) * dy) / max(dx * dx + dy * dy, 1e-12)
    along = along.clamp(0, 1)
    distance = (xs - ax - along * dx) ** 2 + (ys - ay - along * dy) ** 2
    _fill(canvas, distance <= radius * radius, top, left, colour)


def _dot(canvas: torch.Tensor, point: Keypoint | Point, radius: float, colour: tuple[float, ...]) -> None:
    _draw_near(canvas, (point.x, point.y), (point.x, point.y), radius, colour)


def hand_colour(bone: int) -> tuple[float, float, float]:
    """The hue of bone ``bone`` of 20 at full saturation and value, as RGB in [0, 1]."""
    return colorsys.hsv_to_rgb(bone / len(HAND_BONES), 1.0, 1.0)


@dataclass(frozen=True)
class Figure:
    """One person: the body, and where looked for, the hands' 21 points and the face's points."""

    body: Person
    left_hand: tuple[Point | None, ...] | None = None
    right_hand: tuple[Point | None, ...] | None = None
    face: tuple[Point, ...] | None = None


def _draw_hand(canvas: torch.Tensor, hand: tuple[Point | None, ...]) -> None:
    for bone, (first, second) in enumerate(HAND_BONES):
        a, b = hand[first], hand[second]
        if a is not None and b is not None:
            _draw_near(canvas, (a.x, a.y), (b.x, b.y), HAND_LINE_RADIUS, hand_colour(bone))
    for point in hand:
        if point is not None:
            _dot(canvas, point, HAND_DOT_RADIUS, (0.0, 0.0, 1.0))


def draw_people(people: Sequence[Figure], height: int, width: int, stick: int = 1) -> torch.Tensor:
    """OpenPose's drawing of ``people`` on black, ``[3, H, W]`` in [0, 1]: each person's limbs, then
    its parts, hands and face."""
    canvas = torch.zeros(3, height, width, dtype=torch.float32)
    for figure in people:
        parts = figure.body.parts
        for limb, (part_a, part_b) in enumerate(LIMBS[:STARTING_LIMBS]):
            a, b = parts[part_a], parts[part_b]
            if a is not None and b is not None:
                colour = tuple(channel * LIMB_SHADE / 255 for channel in COLOURS[limb])
                _draw_ellipse(canvas, (a.x, a.y), (b.x, b.y), STICK_WIDTH * stick, colour)
        for part, point in enumerate(parts):
            if point is not None:
                _dot(canvas, point, DOT_RADIUS, tuple(channel / 255 for channel in COLOURS[part]))
        for hand in (figure.left_hand, figure.right_hand):
            if hand is not None:
                _draw_hand(canvas, hand)
        for point in figure.face or ():
            _dot(canvas, point, FACE_DOT_RADIUS, (1.0, 1.0, 1.0))
    return canvas


def _flat_points(points: tuple[Point | None, ...] | None, sy: float, sx: float) -> list[float] | None:
    if not points:
        return None
    flat: list[float] = []
    for point in points:
        flat += [point.x * sx, point.y * sy, 1.0] if point is not None else [0.0, 0.0, 0.0]
    return flat


def keypoint_json(people: Sequence[Figure], height: int, width: int, sy: float, sx: float
                  ) -> dict[str, Any]:
    """OpenPose's JSON of ``people`` (positions scaled by ``sx``, ``sy`` to a ``height x width`` canvas)."""
    entries = []
    for figure in people:
        flat: list[float] = []
        for point in figure.body.parts:
            flat += [point.x * sx, point.y * sy, point.score] if point is not None else [0.0, 0.0, 0.0]
        entries.append({"pose_keypoints_2d": flat, "face_keypoints_2d": _flat_points(figure.face, sy, sx),
                        "hand_left_keypoints_2d": _flat_points(figure.left_hand, sy, sx),
                        "hand_right_keypoints_2d": _flat_points(figure.right_hand, sy, sx)})
    return {"people": entries, "canvas_height": height, "canvas_width": width}


def figures_of(people: list[Person], picture: torch.Tensor, hand: KeypointNetwork | None,
               face: KeypointNetwork | None) -> list[Figure]:
    """``people`` found in one RGB image ``[3, H, W]`` in [0, 1], with their hands and faces where a
    network for them is given."""
    if hand is None and face is None:
        return [Figure(person) for person in people]
    looked_for = set(sorted(range(len(people)), key=lambda i: -people[i].score)[:MAX_PEOPLE_WITH_PARTS])
    bgr = picture.flip(0) * 255
    height, width = picture.shape[-2:]
    figures = []
    for index, person in enumerate(people):
        if index not in looked_for:
            figures.append(Figure(person))
            continue
        left = right = face_found = None
        if hand is not None:
            left_box, right_box = hand_boxes(person.parts, height, width)
            left = None if left_box is None else hand_points(hand, bgr, left_box)
            right = None if right_box is None else hand_points(hand, bgr, right_box)
        if face is not None:
            box = face_box(person.parts, height, width)
            face_found = None if box is None else face_points(face, bgr, box) or None
        figures.append(Figure(person, left, right, face_found))
    return figures


def openpose(ctx: NodeContext, *, image: torch.Tensor, detect_hand: str = "disable",
             detect_body: str = "enable", detect_face: str = "disable", resolution: int = 512,
             scale_stick_for_xinsr_cn: str = "disable", ckpt_name: str = BODY_MODEL,
             hand_ckpt_name: str = HAND_MODEL, face_ckpt_name: str = FACE_MODEL,
             ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The drawn poses of ``image`` (bodies; hands and faces where enabled) and their keypoints.

    Hands and faces are found from the bodies' parts, so with ``detect_body`` disabled nothing is
    drawn, as in the pack."""
    height, width = image.shape[1:3]
    resized = resized_rgb(image, resolution, STRIDE, "bilinear")
    size = (resized.shape[-2], resized.shape[-1])
    body = hand = face = None
    if detect_body == "enable":
        body = load_body_pose_model(find_model_file(ctx.model_path, PREPROCESSORS, ckpt_name))
        if detect_hand == "enable":
            hand = load_keypoint_model(find_model_file(ctx.model_path, PREPROCESSORS, hand_ckpt_name), HAND)
        if detect_face == "enable":
            face = load_keypoint_model(find_model_file(ctx.model_path, PREPROCESSORS, face_ckpt_name), FACE)
    drawings, keypoints = [], []
    for picture in resized:
        people = [] if body is None else figures_of(find_people(*body_maps(picture, body)), picture, hand,
                                                    face)
        canvas = draw_people(people, *size, stick=stick_scale(*size, scale_stick_for_xinsr_cn == "enable"))
        drawings.append(torch.nn.functional.interpolate(canvas[None], size=(height, width), mode="bilinear",
                                                        align_corners=False)[0].clamp(0, 1))
        keypoints.append(keypoint_json(people, height, width, height / size[0], width / size[1]))
    return torch.stack(drawings).movedim(1, -1).contiguous(), keypoints


_SWITCH = ("enable", "disable")

NODES: tuple[NodeClass, ...] = (
    NodeClass(
        "OpenposePreprocessor",
        (
            InputSpec("image", "IMAGE"),
            InputSpec("detect_hand", "COMBO", default="disable", choices=_SWITCH),
            InputSpec("detect_body", "COMBO", default="enable", choices=_SWITCH),
            InputSpec("detect_face", "COMBO", default="disable", choices=_SWITCH),
            resolution_input(),
            InputSpec("scale_stick_for_xinsr_cn", "COMBO", default="disable", choices=_SWITCH, optional=True),
            network_file_input(BODY_MODEL),
            InputSpec("hand_ckpt_name", "COMBO", default=HAND_MODEL, model_folder=PREPROCESSORS,
                      optional=True, read_when=(("detect_body", "enable"), ("detect_hand", "enable"))),
            InputSpec("face_ckpt_name", "COMBO", default=FACE_MODEL, model_folder=PREPROCESSORS,
                      optional=True, read_when=(("detect_body", "enable"), ("detect_face", "enable"))),
        ),
        (OutputSpec("IMAGE", "IMAGE"), OutputSpec("POSE_KEYPOINT", "POSE_KEYPOINT")),
        openpose,
        category="image/preprocessors",
        description="OpenPose body, hand and face poses drawn on black, and their keypoints.",
    ),
)
