"""ConditioningAverage, ConditioningConcat, ConditioningSetMask, ConditioningSetTimestepRange."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffsplit.engine.nodes.conditioning_edits import (
    conditioning_average,
    conditioning_concat,
    conditioning_set_mask,
    conditioning_set_timestep_range,
)

CTX = SimpleNamespace(node_id="9")


def _cond(seed: int, tokens: int = 77, pooled: bool = True) -> list[list[Any]]:
    generator = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": torch.randn((1, 8), generator=generator)} if pooled else {}
    return [[torch.randn((1, tokens, 16), generator=generator), extras]]


def test_average_mixes_embeddings_and_pooled_outputs() -> None:
    to, source = _cond(1), _cond(2)
    (mixed,) = conditioning_average(
        CTX, conditioning_to=to, conditioning_from=source, conditioning_to_strength=0.25
    )
    assert torch.allclose(mixed[0][0], to[0][0] * 0.25 + source[0][0] * 0.75)
    assert torch.allclose(mixed[0][1]["pooled_output"], to[0][1]["pooled_output"] * 0.25
                          + source[0][1]["pooled_output"] * 0.75)
    (same,) = conditioning_average(
        CTX, conditioning_to=to, conditioning_from=source, conditioning_to_strength=1.0
    )
    assert torch.equal(same[0][0], to[0][0])
    assert mixed[0][1] is not to[0][1] and "pooled_output" in to[0][1]  # the input is not changed


def test_average_pads_a_shorter_source_with_zeros_and_cuts_a_longer_one() -> None:
    to = _cond(1, tokens=154)
    (mixed,) = conditioning_average(CTX, conditioning_to=to, conditioning_from=_cond(2, 77),
                                    conditioning_to_strength=0.5)
    assert mixed[0][0].shape == (1, 154, 16)
    assert torch.allclose(mixed[0][0][:, 77:], to[0][0][:, 77:] * 0.5)
    (cut,) = conditioning_average(CTX, conditioning_to=_cond(3, 77), conditioning_from=to,
                                  conditioning_to_strength=0.5)
    assert cut[0][0].shape == (1, 77, 16)


def test_average_takes_the_sources_pooled_output_when_the_target_has_none() -> None:
    source = _cond(2)
    (mixed,) = conditioning_average(CTX, conditioning_to=_cond(1, pooled=False), conditioning_from=source,
                                    conditioning_to_strength=0.3)
    assert torch.allclose(mixed[0][1]["pooled_output"], source[0][1]["pooled_output"])


def test_concat_appends_the_first_source_embedding(caplog: pytest.LogCaptureFixture) -> None:
    to, source = _cond(1), [*_cond(2), *_cond(3)]
    (joined,) = conditioning_concat(CTX, conditioning_to=to, conditioning_from=source)
    assert joined[0][0].shape == (1, 154, 16)
    assert torch.equal(joined[0][0][:, 77:], source[0][0])
    assert any("only the first is used" in record.getMessage() for record in caplog.records)


def test_set_mask_and_timestep_range_set_the_sampler_keys() -> None:
    mask = torch.ones((8, 8))
    (masked,) = conditioning_set_mask(CTX, conditioning=_cond(1), mask=mask, strength=0.7,
                                      set_cond_area="mask bounds")
    extras = masked[0][1]
    assert extras["mask"].shape == (1, 8, 8) and extras["mask_strength"] == 0.7
    assert extras["set_area_to_bounds"]
    (windowed,) = conditioning_set_timestep_range(CTX, conditioning=_cond(1), start=0.2, end=0.6)
    assert (windowed[0][1]["start_percent"], windowed[0][1]["end_percent"]) == (0.2, 0.6)
