"""A switch that makes the denoiser a smooth function of sigma, for samplers that differentiate it.

ComfyUI (and so the denoiser here) feeds a discrete-time UNet the training
timestep nearest to sigma and takes sigma as a plain number: exact for
sampling, but the result is then piecewise constant in the timestep and its
derivative in sigma is lost. Inside ``with continuous_time():`` the denoiser
keeps sigma as a tensor and uses the fractional timestep interpolated in
log-sigma (k-diffusion's unquantized ``sigma_to_t``), so forward-mode autodiff
and finite differences see the model's continuous-time trajectory. The flag is
per thread: concurrent jobs on a worker do not see each other's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Flag(threading.local):
    def __init__(self) -> None:
        self.on = False


_FLAG = _Flag()


@contextmanager
def continuous_time() -> Iterator[None]:
    """Within the block (on this thread) the denoiser is smooth in sigma."""
    previous = _FLAG.on
    _FLAG.on = True
    try:
        yield
    finally:
        _FLAG.on = previous


def is_continuous() -> bool:
    """Whether this thread is inside :func:`continuous_time`."""
    return _FLAG.on
