"""The link to a worker: round-trip time and bandwidth each way, given or measured.

Given: ``--link 100mbit,20ms`` (a rate sets both directions; ``up=``/``down=``
set one; ``rtt=`` names the round trip). Rates take ``bit``/``kbit``/``mbit``/
``gbit`` (decimal bits per second) or ``B/s``, ``kB/s``, ``MB/s``, ``GB/s``,
``KiB/s``, ``MiB/s``, ``GiB/s`` (bytes); times ``us``, ``ms`` or ``s``.

Measured: :func:`probe_link` sends ``echo`` probes to a worker (k bytes up, n
bytes back, a few sizes each way, best of a few repeats) and fits
``t = rtt + k / up + n / down`` by least squares.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffsplit.transport.auth import ClientCurve
from diffsplit.transport.errors import DiffsplitError
from diffsplit.transport.pool import shared_pool
from diffsplit.transport.protocol import Settings
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_ops import Echo

#: Bandwidth used when a fit finds no measurable cost per byte (a loopback link).
MAX_BYTES_PER_S = 1e11
PROBE_SIZES = (0, 256 << 10, 1 << 20, 3 << 20)

_RATE_UNITS = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "b/s": 1.0, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9,
    "kib/s": 1024.0, "mib/s": 1024.0**2, "gib/s": 1024.0**3,
}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_UNITS = "(rates: bit kbit mbit gbit B/s kB/s MB/s GB/s KiB/s MiB/s GiB/s; times: us ms s)"
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z/]+)\s*$", re.IGNORECASE)


class LinkSpecError(DiffsplitError):
    """A ``--link`` value that cannot be read."""


@dataclass(frozen=True)
class LinkModel:
    """Round-trip time (s) and bandwidth each way (bytes/s) of the link to a worker."""

    rtt_s: float
    up_bytes_per_s: float
    down_bytes_per_s: float
    source: Literal["given", "measured"] = "given"

    def __post_init__(self) -> None:
        if self.rtt_s < 0 or self.up_bytes_per_s <= 0 or self.down_bytes_per_s <= 0:
            raise LinkSpecError(f"a link needs rtt >= 0 and bandwidths > 0, got {self}")

    def up_s(self, n_bytes: int) -> float:
        """Seconds to push ``n_bytes`` up (bandwidth only, no latency)."""
        return n_bytes / self.up_bytes_per_s

    def down_s(self, n_bytes: int) -> float:
        """Seconds to pull ``n_bytes`` down (bandwidth only, no latency)."""
        return n_bytes / self.down_bytes_per_s

    def round_trip_s(self, up_bytes: int, down_bytes: int) -> float:
        """A request of ``up_bytes`` answered with ``down_bytes``: rtt plus both transfers."""
        return self.rtt_s + self.up_s(up_bytes) + self.down_s(down_bytes)

    def in_series(self, other: LinkModel) -> LinkModel:
        """This link then ``other`` (an emulated link over a real one): latencies and per-byte costs add."""
        return LinkModel(
            rtt_s=self.rtt_s + other.rtt_s,
            up_bytes_per_s=1.0 / (1.0 / self.up_bytes_per_s + 1.0 / other.up_bytes_per_s),
            down_bytes_per_s=1.0 / (1.0 / self.down_bytes_per_s + 1.0 / other.down_bytes_per_s),
            source=other.source,
        )

    def describe(self) -> str:
        """``"12.5 MB/s up, 12.5 MB/s down, 20.0 ms RTT (given)"``."""
        return (f"{format_rate(self.up_bytes_per_s)} up, {format_rate(self.down_bytes_per_s)} down, "
                f"{self.rtt_s * 1e3:.1f} ms RTT ({self.source})")


def format_rate(bytes_per_s: float) -> str:
    """A bandwidth for people: ``Mbit/s`` below 1 GB/s, else ``GB/s``."""
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.1f} GB/s"
    return f"{bytes_per_s * 8 / 1e6:.1f} Mbit/s"


def parse_link(text: str) -> LinkModel:
    """``"100mbit,20ms"`` → a LinkModel; LinkSpecError naming the bad part otherwise."""
    up = down = rtt = None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise LinkSpecError(f"--link {text!r} is empty; write e.g. 100mbit,20ms")
    for part in parts:
        key, _, value = part.rpartition("=")
        key = key.strip().lower()
        if key not in ("", "up", "down", "rate", "rtt"):
            raise LinkSpecError(f"--link {text!r}: unknown key {key!r} (use up=, down=, rate= or rtt=)")
        kind, amount = _quantity(value, text)
        if (key == "rtt" and kind != "time") or (key in ("up", "down", "rate") and kind != "rate"):
            raise LinkSpecError(f"--link {text!r}: {key}= needs a {'time' if key == 'rtt' else 'rate'}")
        if kind == "time":
            rtt = _once(rtt, amount, "round-trip time", text)
        elif key == "up":
            up = _once(up, amount, "up rate", text)
        elif key == "down":
            down = _once(down, amount, "down rate", text)
        else:
            up, down = _once(up, amount, "rate", text), _once(down, amount, "rate", text)
    if up is None or down is None:
        raise LinkSpecError(f"--link {text!r} names no bandwidth for {'up' if up is None else 'down'}; "
                            "add a rate such as 100mbit or 12.5MB/s")
    return LinkModel(rtt_s=rtt or 0.0, up_bytes_per_s=up, down_bytes_per_s=down, source="given")


def _quantity(value: str, text: str) -> tuple[str, float]:
    match = _QUANTITY.match(value)
    if match is None:
        raise LinkSpecError(f"--link {text!r}: {value.strip()!r} is not a number with a unit {_UNITS}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit in ("bps", "mbps", "gbps", "kbps"):
        unit = unit[:-3] + "bit" if unit != "bps" else "bit"
    if unit in _RATE_UNITS:
        if number <= 0:
            raise LinkSpecError(f"--link {text!r}: a rate must be above zero, got {value.strip()!r}")
        return "rate", number * _RATE_UNITS[unit]
    if unit in _TIME_UNITS:
        return "time", number * _TIME_UNITS[unit]
    raise LinkSpecError(f"--link {text!r}: unknown unit {match.group(2)!r} in {value.strip()!r} {_UNITS}")


def _once(previous: float | None, value: float, what: str, text: str) -> float:
    if previous is not None:
        raise LinkSpecError(f"--link {text!r} gives the {what} twice")
    return value


@dataclass(frozen=True)
class ProbeSample:
    """One echo probe: bytes up, bytes down, best round-trip seconds over the repeats."""

    up_bytes: int
    down_bytes: int
    seconds: float


def probe_link(
    address: str,
    *,
    sizes: tuple[int, ...] = PROBE_SIZES,
    repeats: int = 3,
    timeout_s: float = 30.0,
    settings: Settings | None = None,
    curve: ClientCurve | None = None,
) -> tuple[LinkModel, tuple[ProbeSample, ...]]:
    """Measure the link to the worker at ``address`` with echo probes; the fit and its samples."""
    points = [(size, 0) for size in sizes] + [(0, size) for size in sizes if size]
    samples: list[ProbeSample] = []
    with shared_pool().lease(address, settings=settings or Settings(), curve=curve) as client:
        _echo(client, 0, 0, timeout_s)  # connect and warm up
        for up_bytes, down_bytes in points:
            best = min(_echo(client, up_bytes, down_bytes, timeout_s) for _ in range(repeats))
            samples.append(ProbeSample(up_bytes, down_bytes, best))
    return fit_link(samples), tuple(samples)


def fit_link(samples: list[ProbeSample] | tuple[ProbeSample, ...]) -> LinkModel:
    """Least-squares fit of ``t = rtt + up/bw_up + down/bw_down`` (non-negative terms)."""
    matrix = np.array([[1.0, s.up_bytes, s.down_bytes] for s in samples])
    seconds = np.array([s.seconds for s in samples])
    coefficients, *_ = np.linalg.lstsq(matrix, seconds, rcond=None)
    rtt, per_up, per_down = (float(c) for c in coefficients)
    if rtt < 0:
        rtt = float(min(seconds))
    up = 1.0 / per_up if per_up > 1.0 / MAX_BYTES_PER_S else MAX_BYTES_PER_S
    down = 1.0 / per_down if per_down > 1.0 / MAX_BYTES_PER_S else MAX_BYTES_PER_S
    return LinkModel(rtt_s=max(0.0, rtt), up_bytes_per_s=up, down_bytes_per_s=down, source="measured")


def _echo(client: Client, up_bytes: int, down_bytes: int, timeout_s: float) -> float:
    payload = torch.zeros(up_bytes, dtype=torch.uint8) if up_bytes else b""
    started = time.perf_counter()
    reply = client.request(Echo(reply_bytes=down_bytes, data=payload).header(), timeout=timeout_s)
    elapsed = time.perf_counter() - started
    if reply.get("op") != "result":
        raise DiffsplitError(f"the worker refused the link probe: {reply.get('error')}")
    return elapsed
