"""Node outputs in one layout (what the wire delivers), identities kept."""

from __future__ import annotations

import torch
from diffsplit.engine.layout import contiguous_value


def test_non_contiguous_tensors_become_contiguous_and_shared_ones_stay_shared() -> None:
    channels_last = torch.randn(1, 4, 8, 8).to(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    plain = torch.randn(3)
    latent = {"samples": channels_last, "extra": plain}
    out = contiguous_value(({"a": latent, "b": latent}, [channels_last]))
    assert out[0]["a"]["samples"].is_contiguous() and torch.equal(out[0]["a"]["samples"], channels_last)
    assert out[0]["a"] is out[0]["b"]  # one dict met twice is one dict after
    assert out[0]["a"]["samples"] is out[1][0]  # and one tensor is one copy
    assert out[0]["a"]["extra"] is plain


def test_values_without_changes_come_back_as_the_same_objects() -> None:
    conditioning = [[torch.randn(1, 77, 8), {"pooled_output": torch.randn(1, 8)}]]
    assert contiguous_value(conditioning) is conditioning
    assert contiguous_value("text") == "text" and contiguous_value(None) is None
