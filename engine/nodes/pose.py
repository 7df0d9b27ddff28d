"""OpenposePreprocessor (the common preprocessor pack's node, inputs and outputs) on an OpenPose body
model from the ``preprocessors`` folder: ``ckpt_name`` (not a widget of the pack, which reads a fixed
file) defaults to the pack's ``body_pose_model.pth``, whose ``.safetensors`` twin serves too.

The image is resized so its short side is ``resolution`` (sides multiples of 8), and the body
model runs on it as the pack does: scaled so its height is 184 px (half of OpenPose's 368 px box),
BGR, ``pixel / 256 - 0.5``, padded to a multiple of 8; its maps are resized back to that image,
people are found (:mod:`diffsplit.engine.models.pose_people`) and drawn on black in OpenPose's
colours: limbs as ellipses 4 px wide at 60% colour, parts as dots of radius 4. The drawing is
resized to the input's size. ``scale_stick_for_xinsr_cn`` widens the sticks on large images for
xinsr's pose ControlNet (x1 under 500 px, else 2 + side // 1000, at most 7). The second output,
POSE_KEYPOINT, is the people in OpenPose's JSON form (``pose_keypoints_2d`` as x, y, score in the
input's pixels, zeros where a part was not found) per image.

Hands and faces need the pack's separate hand and face models, which this node does not run:
``detect_hand`` / ``detect_face`` = ``enable`` is refused with that reason rather than drawing
something else than the pack would.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.pose_model import BodyPoseNetwork, load_body_pose_model
from diffsplit.engine.models.pose_people import LIMBS, PARTS, STARTING_LIMBS, Person, find_people
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
#: the height the body model sees: half of OpenPose's 368 px box, its one search scale here
NETWORK_HEIGHT = 184
STRIDE = 8
STICK_WIDTH = 4
DOT_RADIUS = 4
LIMB_SHADE = 0.6
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


def draw_people(people: list[Person], height: int, width: int, stick: int = 1) -> torch.Tensor:
    """OpenPose's drawing of ``people`` on black, ``[3, H, W]`` in [0, 1]."""
    canvas = torch.zeros(3, height, width, dtype=torch.float32)
    for limb, (part_a, part_b) in enumerate(LIMBS[:STARTING_LIMBS]):
        colour = tuple(channel * LIMB_SHADE / 255 for channel in COLOURS[limb])
        for person in people:
            a, b = person.parts[part_a], person.parts[part_b]
            if a is not None and b is not None:
                _draw_ellipse(canvas, (a.x, a.y), (b.x, b.y), STICK_WIDTH * stick, colour)
    for part in range(len(PARTS)):
        colour = tuple(channel / 255 for channel in COLOURS[part])
        for person in people:
            point = person.parts[part]
            if point is not None:
                _draw_ellipse(canvas, (point.x, point.y), (point.x, point.y), DOT_RADIUS, colour)
    return canvas


def keypoint_json(people: list[Person], height: int, width: int, sy: float, sx: float) -> dict[str, Any]:
    """OpenPose's JSON of ``people`` (positions scaled by ``sx``, ``sy`` to a ``height x width`` canvas)."""
    entries = []
    for person in people:
        flat: list[float] = []
        for point in person.parts:
            flat += [point.x * sx, point.y * sy, point.score] if point is not None else [0.0, 0.0, 0.0]
        entries.append({"pose_keypoints_2d": flat})
    return {"people": entries, "canvas_height": height, "canvas_width": width}


def openpose(ctx: NodeContext, *, image: torch.Tensor, detect_hand: str = "disable",
             detect_body: str = "enable", detect_face: str = "disable", resolution: int = 512,
             scale_stick_for_xinsr_cn: str = "disable", ckpt_name: str = BODY_MODEL
             ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The drawn body poses of ``image`` and their keypoints."""
    for name, value in (("detect_hand", detect_hand), ("detect_face", detect_face)):
        if value == "enable":
            raise WorkflowError(f"{name} = enable needs the pack's {name.removeprefix('detect_')} model, "
                                "which diffsplit does not run; set it to disable (bodies are drawn as the "
                                "pack draws them)", input_name=name)
    height, width = image.shape[1:3]
    resized = resized_rgb(image, resolution, STRIDE, "bilinear")
    size = (resized.shape[-2], resized.shape[-1])
    network = None
    if detect_body == "enable":
        network = load_body_pose_model(find_model_file(ctx.model_path, PREPROCESSORS, ckpt_name))
    drawings, keypoints = [], []
    for picture in resized:
        people = find_people(*body_maps(picture, network)) if network is not None else []
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
        ),
        (OutputSpec("IMAGE", "IMAGE"), OutputSpec("POSE_KEYPOINT", "POSE_KEYPOINT")),
        openpose,
        category="image/preprocessors",
        description="OpenPose body poses drawn on black, and their keypoints.",
    ),
)
