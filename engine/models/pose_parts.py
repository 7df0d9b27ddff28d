"""Hands and faces of the people an OpenPose body model found, as the common preprocessor pack finds
them (CMU OpenPose's hand and face detectors driven by the body's keypoints).

- **Boxes**: a hand's square box is centred a third of the forearm past the wrist, 1.5 times the
  longer of the forearm and 0.9 of the upper arm wide (left hand from parts 5-7, right from 2-4); a
  face's box is centred on the nose, three times the widest nose-to-eye or 1.5 times the widest
  nose-to-ear distance on each side. Boxes are clipped to the image (keeping the pack's arithmetic)
  and dropped under 20 pixels.
- **Hand points**: the box (blurred, sigma 0.8) runs through the hand network at 184, 368, 552 and
  736 pixels; the 22 heat maps, averaged at 128 x 128, give each of the 21 points: the map smoothed
  (sigma 3) over 0.05 is split into 8-connected regions, the region holding most of the map wins
  and its highest pixel is the point.
- **Face points**: the box at 384 x 384 through the face network; every one of its 71 maps (the
  background's too, as the pack does) whose highest value is over 0.05 gives a point there.

A point that lands on the box's top or left edge is "not found", as in the pack. Images are the
pack's BGR in [0, 255], scaled ``/ 256 - 0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy
import scipy.ndimage
import torch
from diffsplit.engine.models.keypoint_model import KeypointNetwork
from diffsplit.engine.models.pose_people import Keypoint, smooth

HAND_SCALES = (0.5, 1.0, 1.5, 2.0)
HAND_BOX = 368
HAND_MAP_SIZE = 128
HAND_POINTS = 21
HAND_THRESHOLD = 0.05
HAND_BLUR = 0.8
FACE_SIZE = 384
FACE_THRESHOLD = 0.05
MIN_BOX = 20
_STRIDE = 8
_WRIST_REACH = 0.33
#: (shoulder, elbow, wrist) of the left and the right arm, in the body's COCO parts
LEFT_ARM, RIGHT_ARM = (5, 6, 7), (2, 3, 4)
NOSE, FACE_PARTS = 0, ((14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5))  # eyes, ears: how far a face reaches


@dataclass(frozen=True)
class Box:
    """A square crop: top-left corner and side, in the image's pixels."""

    x: int
    y: int
    side: int


@dataclass(frozen=True)
class Point:
    """A hand or face point in the image's pixels."""

    x: float
    y: float


def hand_boxes(parts: Sequence[Keypoint | None], height: int, width: int) -> tuple[Box | None, Box | None]:
    """The (left, right) hand boxes of one person's body parts (None where an arm is not found or
    the box is too small)."""
    boxes: list[Box | None] = []
    for shoulder, elbow, wrist in (LEFT_ARM, RIGHT_ARM):
        points = [parts[shoulder], parts[elbow], parts[wrist]]
        if any(point is None for point in points):
            boxes.append(None)
            continue
        (x1, y1), (x2, y2), (x3, y3) = ((point.x, point.y) for point in points if point is not None)
        side = 1.5 * max(math.hypot(x3 - x2, y3 - y2), 0.9 * math.hypot(x2 - x1, y2 - y1))
        x = max(x3 + _WRIST_REACH * (x3 - x2) - side / 2, 0.0)
        y = max(y3 + _WRIST_REACH * (y3 - y2) - side / 2, 0.0)
        side = min(side if x + side <= width else width - x, side if y + side <= height else height - y)
        boxes.append(Box(int(x), int(y), int(side)) if side >= MIN_BOX else None)
    return boxes[0], boxes[1]


def face_box(parts: Sequence[Keypoint | None], height: int, width: int) -> Box | None:
    """The face box of one person's body parts (None without a nose and an eye or ear, or too small)."""
    nose = parts[NOSE]
    if nose is None or all(parts[index] is None for index, _ in FACE_PARTS):
        return None
    reach = 0.0
    for index, factor in FACE_PARTS:
        part = parts[index]
        if part is not None:
            reach = max(reach, max(abs(nose.x - part.x), abs(nose.y - part.y)) * factor)
    x, y = max(nose.x - reach, 0.0), max(nose.y - reach, 0.0)
    # the pack compares the corner plus one reach (not two) with the image's sides
    side = min(2 * reach if x + reach <= width else width - x,
               2 * reach if y + reach <= height else height - y)
    return Box(int(x), int(y), int(side)) if side >= MIN_BOX else None


def crop(bgr: torch.Tensor, box: Box) -> torch.Tensor:
    """``box`` of a BGR ``[3, H, W]`` image in [0, 255]."""
    return bgr[:, box.y: box.y + box.side, box.x: box.x + box.side]


def _resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    shrinking = size[0] * size[1] < image.shape[-2] * image.shape[-1]
    return torch.nn.functional.interpolate(image[None], size=size, mode="bicubic", align_corners=False,
                                           antialias=shrinking)[0]


def _run(network: KeypointNetwork, bgr: torch.Tensor) -> torch.Tensor:
    parameter = next(network.parameters())
    with torch.no_grad():
        maps = network((bgr[None] / 256 - 0.5).to(device=parameter.device, dtype=parameter.dtype))
    return maps[0].float().cpu()


def _components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected regions of a boolean map: each pixel the label of its region (0 outside)."""
    labels, _ = scipy.ndimage.label(mask.numpy(), structure=numpy.ones((3, 3), dtype=bool))
    return torch.from_numpy(labels.astype(numpy.int64))


def _hand_point(heatmap: torch.Tensor) -> tuple[int, int] | None:
    """The (x, y) of one hand point in its averaged map, or None."""
    above = smooth(heatmap[None], 3.0)[0] > HAND_THRESHOLD
    if not bool(above.any()):
        return None
    labels = _components(above)
    regions = labels.unique()
    regions = regions[regions > 0]
    sums = torch.stack([heatmap[labels == region].sum() for region in regions])
    kept = torch.where(labels == regions[int(torch.argmax(sums))], heatmap, torch.zeros(()))
    index = int(torch.argmax(kept))
    return index % kept.shape[1], index // kept.shape[1]


def hand_points(network: KeypointNetwork, bgr: torch.Tensor, box: Box) -> tuple[Point | None, ...]:
    """The 21 points of the hand in ``box`` of a BGR image (None where not found)."""
    blurred = smooth(crop(bgr, box), HAND_BLUR)
    average = torch.zeros(HAND_POINTS + 1, HAND_MAP_SIZE, HAND_MAP_SIZE)
    for scale in HAND_SCALES:
        side = int(HAND_BOX * scale)
        maps = _run(network, _resized(blurred, (side, side)))
        maps = torch.nn.functional.interpolate(maps[None], scale_factor=_STRIDE, mode="bicubic",
                                               align_corners=False)[0][:, :side, :side]
        average += _resized(maps, (HAND_MAP_SIZE, HAND_MAP_SIZE)) / len(HAND_SCALES)
    points: list[Point | None] = []
    for part in range(HAND_POINTS):
        found = _hand_point(average[part])
        if found is None:
            points.append(None)
            continue
        x, y = int(found[0] * box.side / HAND_MAP_SIZE), int(found[1] * box.side / HAND_MAP_SIZE)
        points.append(Point(float(x + box.x), float(y + box.y)) if x > 0 and y > 0 else None)
    return tuple(points)


def face_points(network: KeypointNetwork, bgr: torch.Tensor, box: Box) -> tuple[Point, ...]:
    """The face points in ``box`` of a BGR image: one per map whose highest value is over 0.05 (the box
    may run past the image's right or bottom edge: the maps cover the part inside, as in the pack)."""
    face = crop(bgr, box)
    height, width = face.shape[-2:]
    maps = _run(network, _resized(face, (FACE_SIZE, FACE_SIZE)))
    maps = torch.nn.functional.interpolate(maps[None], size=(height, width), mode="bilinear",
                                           align_corners=True)[0]
    points = []
    for heatmap in maps:
        if float(heatmap.max()) <= FACE_THRESHOLD:
            continue
        index = int(torch.argmax(heatmap))
        x, y = index % width, index // width
        if x > 0 and y > 0:
            points.append(Point(float(x + box.x), float(y + box.y)))
    return tuple(points)
