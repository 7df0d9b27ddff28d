"""What a receiver accepts; checked before anything is allocated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffsplit.transport.errors import MessageTooLarge


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. Checked before anything is allocated; the sender
    checks the same limits so an oversized message fails where it is made."""

    max_header_bytes: int = 4 * 1024 * 1024
    max_frames: int = 256
    max_total_bytes: int = 2 * 1024 * 1024 * 1024
    max_tensor_dims: int = 8


DEFAULT_LIMITS = Limits()


def check_sizes(header_bytes: int, frame_sizes: Sequence[int], limits: Limits) -> None:
    """Raise MessageTooLarge, naming the limit, if a message of these sizes is over ``limits``."""
    if len(frame_sizes) > limits.max_frames:
        raise MessageTooLarge(
            f"{len(frame_sizes)} tensor frames exceed Limits.max_frames={limits.max_frames}"
        )
    if header_bytes > limits.max_header_bytes:
        raise MessageTooLarge(
            f"header of {header_bytes} bytes exceeds Limits.max_header_bytes={limits.max_header_bytes}"
        )
    total = header_bytes + sum(frame_sizes)
    if total > limits.max_total_bytes:
        raise MessageTooLarge(
            f"message of {total} bytes exceeds Limits.max_total_bytes={limits.max_total_bytes}"
        )
