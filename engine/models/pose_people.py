"""People from an OpenPose body model's maps: heat-map peaks become part candidates, part affinity
fields join candidates into limbs, and limbs that share parts become people (the method of CMU's
OpenPose, as the common preprocessor pack runs it).

- **Peaks**: each of the 18 part heat maps is smoothed (Gaussian, sigma 3); a pixel that is at least
  each of its four neighbours and above ``PEAK_THRESHOLD`` is a candidate.
- **Limbs**: for each of the 19 limbs, every pair of candidates of its two parts is scored by the
  field sampled at ``LIMB_SAMPLES`` points along the segment, projected on its direction, plus a
  penalty for segments longer than half the image's height. A pair is kept when most samples
  (over 80%) exceed ``FIELD_THRESHOLD`` and its score is positive; pairs are then taken
  best-first, each candidate at most once per limb.
- **People**: limbs are joined into people by the parts they share (two partial people that meet
  on disjoint parts merge); people with fewer than 4 parts, or a mean score under 0.4, are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PARTS = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
         "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
         "right_eye", "left_eye", "right_ear", "left_ear")
#: (part, part) of each limb, and the field channels (x, y) that point along it
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)
LIMB_FIELDS: tuple[tuple[int, int], ...] = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
    (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)
#: limbs after these only add parts to people, they never start one (the ear-to-shoulder links)
STARTING_LIMBS = 17
PEAK_THRESHOLD = 0.1
FIELD_THRESHOLD = 0.05
LIMB_SAMPLES = 10
SMOOTHING_SIGMA = 3.0
MIN_PARTS = 4
MIN_MEAN_SCORE = 0.4
#: a hostile or untrained model can light up every pixel: candidates kept per part, best first
MAX_CANDIDATES_PER_PART = 64


@dataclass(frozen=True)
class Keypoint:
    """A detected body part: position in the maps' pixels and its heat-map score."""

    x: float
    y: float
    score: float


@dataclass(frozen=True)
class Person:
    """One person's 18 parts (None where not found) and the sum of its part and limb scores."""

    parts: tuple[Keypoint | None, ...]
    score: float


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _mirror_pad(maps: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Pad ``dim`` by ``radius`` mirrored samples (edge sample included), for any size."""
    while maps.shape[dim] < radius:
        maps = torch.cat([maps, maps.flip(dim)], dim=dim)
    length = maps.shape[dim]
    before = maps.narrow(dim, 0, radius).flip(dim)
    after = maps.narrow(dim, length - radius, radius).flip(dim)
    return torch.cat([before, maps, after], dim=dim)


def smooth(maps: torch.Tensor, sigma: float = SMOOTHING_SIGMA) -> torch.Tensor:
    """``maps`` ``[C, H, W]`` blurred by a separable Gaussian with mirrored edges."""
    kernel = _gaussian_kernel(sigma)
    radius = kernel.numel() // 2
    channels = maps.shape[0]
    rows = _mirror_pad(maps.unsqueeze(0), radius, 3)
    rows = torch.nn.functional.conv2d(rows, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1),
                                      groups=channels)
    cols = _mirror_pad(rows, radius, 2)
    return torch.nn.functional.conv2d(cols, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1),
                                      groups=channels)[0]


def find_peaks(heatmaps: torch.Tensor) -> list[list[Keypoint]]:
    """The candidates of each of the 18 parts in ``heatmaps`` ``[19, H, W]`` (the last map is the
    background), best first."""
    smoothed = smooth(heatmaps[: len(PARTS)].float())
    padded = torch.nn.functional.pad(smoothed, (1, 1, 1, 1), value=-math.inf)
    centre = padded[:, 1:-1, 1:-1]
    peaks = ((centre >= padded[:, :-2, 1:-1]) & (centre >= padded[:, 2:, 1:-1])
             & (centre >= padded[:, 1:-1, :-2]) & (centre >= padded[:, 1:-1, 2:]) & (centre > PEAK_THRESHOLD))
    found: list[list[Keypoint]] = []
    for part in range(len(PARTS)):
        ys, xs = torch.nonzero(peaks[part], as_tuple=True)
        scores = heatmaps[part, ys, xs].float()
        order = torch.argsort(scores, descending=True, stable=True)[:MAX_CANDIDATES_PER_PART]
        found.append([Keypoint(float(xs[i]), float(ys[i]), float(scores[i])) for i in order.tolist()])
    return found


@dataclass(frozen=True)
class _Link:
    first: int
    second: int
    score: float


def _limb_links(fields: torch.Tensor, firsts: list[Keypoint], seconds: list[Keypoint],
                channels: tuple[int, int], height: int) -> list[_Link]:
    if not firsts or not seconds:
        return []
    width = fields.shape[-1]
    scored: list[tuple[float, int, int]] = []
    steps = torch.linspace(0, 1, LIMB_SAMPLES, dtype=torch.float64)
    for i, a in enumerate(firsts):
        for j, b in enumerate(seconds):
            dx, dy = b.x - a.x, b.y - a.y
            norm = max(math.hypot(dx, dy), 1e-3)
            xs = (a.x + steps * dx).round().long().clamp(0, width - 1)
            ys = (a.y + steps * dy).round().long().clamp(0, fields.shape[-2] - 1)
            along = (fields[channels[0], ys, xs].double() * (dx / norm)
                     + fields[channels[1], ys, xs].double() * (dy / norm))
            score = float(along.mean()) + min(0.5 * height / norm - 1, 0.0)
            if int((along > FIELD_THRESHOLD).sum()) > 0.8 * LIMB_SAMPLES and score > 0:
                scored.append((score, i, j))
    scored.sort(key=lambda item: (-item[0], item[1], item[2]))
    links: list[_Link] = []
    used_first: set[int] = set()
    used_second: set[int] = set()
    for score, i, j in scored:
        if i not in used_first and j not in used_second:
            links.append(_Link(i, j, score))
            used_first.add(i)
            used_second.add(j)
            if len(links) == min(len(firsts), len(seconds)):
                break
    return links


@dataclass
class _Draft:
    parts: list[int]  # candidate index per part, -1 where none
    score: float
    count: int


def find_people(fields: torch.Tensor, heatmaps: torch.Tensor) -> list[Person]:
    """The people in an OpenPose body model's ``fields`` ``[38, H, W]`` and ``heatmaps`` ``[19, H, W]``."""
    candidates = find_peaks(heatmaps)
    height = heatmaps.shape[-2]
    drafts: list[_Draft] = []
    for limb, ((part_a, part_b), channels) in enumerate(zip(LIMBS, LIMB_FIELDS, strict=True)):
        for link in _limb_links(fields, candidates[part_a], candidates[part_b], channels, height):
            holding = [d for d in drafts if d.parts[part_a] == link.first or d.parts[part_b] == link.second]
            shared = len(holding) == 2 and any(
                a >= 0 and b >= 0 for a, b in zip(holding[0].parts, holding[1].parts, strict=True))
            if len(holding) == 2 and not shared:
                keep, gone = holding
                keep.parts = [max(a, b) for a, b in zip(keep.parts, gone.parts, strict=True)]
                keep.score += gone.score + link.score
                keep.count += gone.count
                drafts.remove(gone)
            elif holding:
                draft = holding[0]
                if draft.parts[part_b] != link.second:
                    draft.parts[part_b] = link.second
                    draft.count += 1
                    draft.score += candidates[part_b][link.second].score + link.score
            elif limb < STARTING_LIMBS:
                parts = [-1] * len(PARTS)
                parts[part_a], parts[part_b] = link.first, link.second
                score = (candidates[part_a][link.first].score + candidates[part_b][link.second].score
                         + link.score)
                drafts.append(_Draft(parts, score, 2))
    people = []
    for draft in drafts:
        if draft.count < MIN_PARTS or draft.score / draft.count < MIN_MEAN_SCORE:
            continue
        parts = tuple(candidates[part][index] if index >= 0 else None
                      for part, index in enumerate(draft.parts))
        people.append(Person(parts=parts, score=draft.score))
    return people
