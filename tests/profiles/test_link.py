"""The link model: parsing --link, fitting probes, and probing a real worker."""

from __future__ import annotations

import pytest
from diffsplit.profiles.link import LinkModel, LinkSpecError, ProbeSample, fit_link, parse_link, probe_link


def test_rate_and_rtt_set_both_directions() -> None:
    link = parse_link("100mbit,20ms")
    assert link == LinkModel(rtt_s=0.020, up_bytes_per_s=12.5e6, down_bytes_per_s=12.5e6, source="given")


@pytest.mark.parametrize(("text", "rtt", "up", "down"), [
    ("up=20mbit,down=100mbit,rtt=30ms", 0.030, 2.5e6, 12.5e6),
    ("12.5MB/s, 500us", 0.0005, 12.5e6, 12.5e6),
    ("1gbit", 0.0, 1.25e8, 1.25e8),
    ("rate=1MiB/s,rtt=0.1s", 0.1, 1048576.0, 1048576.0),
    ("100Mbps,20ms", 0.020, 12.5e6, 12.5e6),
])
def test_link_forms(text: str, rtt: float, up: float, down: float) -> None:
    link = parse_link(text)
    assert link.rtt_s == pytest.approx(rtt)
    assert (link.up_bytes_per_s, link.down_bytes_per_s) == (pytest.approx(up), pytest.approx(down))


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty"),
    ("20ms", "names no bandwidth for up"),
    ("100mbit,20", "'20' is not a number with a unit"),
    ("100 parsecs,20ms", "unknown unit 'parsecs'"),
    ("100mbit,20ms,30ms", "gives the round-trip time twice"),
    ("up=20mbit,rtt=30ms", "names no bandwidth for down"),
    ("speed=20mbit", "unknown key 'speed'"),
    ("rtt=20mbit", "rtt= needs a time"),
    ("0mbit,1ms", "a rate must be above zero"),
])
def test_bad_links_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(LinkSpecError, match="--link") as caught:
        parse_link(text)
    assert message in str(caught.value)


def test_fit_recovers_rtt_and_bandwidths_from_exact_samples() -> None:
    rtt, up, down = 0.004, 50e6, 200e6
    samples = [ProbeSample(u, d, rtt + u / up + d / down)
               for u, d in [(0, 0), (1 << 20, 0), (4 << 20, 0), (0, 1 << 20), (0, 4 << 20)]]
    link = fit_link(samples)
    assert link.source == "measured"
    assert link.rtt_s == pytest.approx(rtt, rel=1e-6)
    assert link.up_bytes_per_s == pytest.approx(up, rel=1e-6)
    assert link.down_bytes_per_s == pytest.approx(down, rel=1e-6)


def test_in_series_adds_latency_and_per_byte_cost() -> None:
    link = parse_link("100mbit,20ms").in_series(parse_link("100mbit,10ms"))
    assert link.rtt_s == pytest.approx(0.030)
    assert link.up_bytes_per_s == pytest.approx(6.25e6)


def test_probing_a_real_worker_gives_a_positive_link(worker_address: str) -> None:
    link, samples = probe_link(worker_address, sizes=(0, 64 << 10, 1 << 20), repeats=2)
    assert link.source == "measured"
    assert len(samples) == 5, "three sizes up (zero included), two down"
    assert all(sample.seconds > 0 for sample in samples)
    assert link.up_bytes_per_s > 1e6 and link.down_bytes_per_s > 1e6, "loopback moves more than 1 MB/s"
    assert 0 <= link.rtt_s < 1.0
