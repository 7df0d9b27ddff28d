"""VAEDecodeTiled and VAEEncodeTiled with the tiny SD 1.5 VAE, against VAEDecode and VAEEncode."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.nodes.latent import VAE_DECODE, VAE_ENCODE
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.nodes.tiling import tile_count
from diffsplit.engine.nodes.vae_tiled import VAE_DECODE_TILED, VAE_ENCODE_TILED, decode_passes
from diffsplit.engine.types import Vae


@dataclass
class ProgressContext:
    """The part of a NodeContext these nodes use: progress reports."""

    node_id: str = "8"
    reports: list[tuple[int, int]] = field(default_factory=list)

    def progress(self, step: int, total: int) -> None:
        self.reports.append((step, total))


@pytest.fixture(autouse=True)
def single_thread(one_torch_thread: None) -> None:
    """Tiny models run fastest on one thread on a shared machine (``one_torch_thread``)."""


@pytest.fixture(scope="module")
def vae(models_dir: Path) -> Vae:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").vae


def _latent(height: int, width: int, batch: int = 1) -> dict[str, torch.Tensor]:
    return {"samples": torch.randn((batch, 4, height, width), generator=torch.Generator().manual_seed(1))}


def _image(height: int, width: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([rows, cols, (rows * 7).sin() * 0.5 + 0.5], dim=-1)[None]


def test_declarations_match_comfyui() -> None:
    registry = default_registry()
    assert registry["VAEDecodeTiled"] is VAE_DECODE_TILED and registry["VAEEncodeTiled"] is VAE_ENCODE_TILED
    expected = [("tile_size", 512, 64, 32), ("overlap", 64, 0, 32), ("temporal_size", 64, 8, 4),
                ("temporal_overlap", 8, 4, 4)]
    decode = [(i.name, i.default, i.min, i.step) for i in VAE_DECODE_TILED.inputs[2:]]
    encode = [(i.name, i.default, i.min, i.step) for i in VAE_ENCODE_TILED.inputs[2:]]
    assert decode == expected
    assert encode == [("tile_size", 512, 64, 64), *expected[1:]]
    assert [(i.name, i.type) for i in VAE_DECODE_TILED.inputs[:2]] == [("samples", "LATENT"), ("vae", "VAE")]
    assert [(i.name, i.type) for i in VAE_ENCODE_TILED.inputs[:2]] == [("pixels", "IMAGE"), ("vae", "VAE")]
    assert [o.type for o in VAE_DECODE_TILED.outputs] == ["IMAGE"]
    assert [o.type for o in VAE_ENCODE_TILED.outputs] == ["LATENT"]


def test_decode_within_one_tile_equals_vae_decode_exactly(vae: Vae) -> None:
    samples = _latent(8, 12, batch=2)
    (plain,) = VAE_DECODE.function(ProgressContext(), samples=samples, vae=vae)
    (tiled,) = VAE_DECODE_TILED.function(
        ProgressContext(), samples=samples, vae=vae, tile_size=256, overlap=64
    )
    assert tiled.shape == (2, 64, 96, 3) and torch.equal(tiled, plain)


def test_tiled_decode_stays_close_to_vae_decode(vae: Vae) -> None:
    samples = _latent(24, 20)
    context = ProgressContext()
    (plain,) = VAE_DECODE.function(ProgressContext(), samples=samples, vae=vae)
    (tiled,) = VAE_DECODE_TILED.function(context, samples=samples, vae=vae, tile_size=128, overlap=32)
    assert tiled.shape == plain.shape == (1, 192, 160, 3)
    assert tiled.min() >= 0.0 and tiled.max() <= 1.0
    difference = (tiled - plain).abs()
    assert not torch.equal(tiled, plain)  # three passes of several tiles each ran
    assert difference.mean() < 0.03 and difference.mean() < 0.2 * (plain - plain.mean()).abs().mean()
    tiles = sum(tile_count(24, 20, tile, 4) for tile in decode_passes(16))
    assert context.reports[-1] == (tiles, tiles) and tiles > 3


def test_decode_overlap_above_a_quarter_tile_is_cut_to_a_quarter_and_temporal_inputs_are_ignored(
    vae: Vae,
) -> None:
    samples = _latent(12, 12)

    def decode(overlap: int, **temporal: int) -> torch.Tensor:
        node_inputs = {"samples": samples, "vae": vae, "tile_size": 64, "overlap": overlap, **temporal}
        return VAE_DECODE_TILED.function(ProgressContext(), **node_inputs)[0]

    quarter, too_big = decode(16), decode(64, temporal_size=8, temporal_overlap=4)
    no_overlap = decode(0)
    assert torch.equal(quarter, too_big)
    assert not torch.equal(quarter, no_overlap)


def test_encode_within_one_tile_equals_vae_encode_exactly_after_the_same_crop(vae: Vae) -> None:
    pixels = _image(70, 60)  # centre-cropped to 64 x 56 by both
    (plain,) = VAE_ENCODE.function(ProgressContext(), pixels=pixels, vae=vae)
    (tiled,) = VAE_ENCODE_TILED.function(ProgressContext(), pixels=pixels, vae=vae, tile_size=512, overlap=64)
    assert tiled["samples"].shape == (1, 4, 8, 7) and torch.equal(tiled["samples"], plain["samples"])


def test_tiled_encode_gives_a_latent_of_the_same_shape_near_vae_encode(vae: Vae) -> None:
    pixels = _image(160, 136)
    (plain,) = VAE_ENCODE.function(ProgressContext(), pixels=pixels, vae=vae)
    (tiled,) = VAE_ENCODE_TILED.function(ProgressContext(), pixels=pixels, vae=vae, tile_size=128, overlap=32)
    a, b = plain["samples"], tiled["samples"]
    assert b.shape == a.shape == (1, 4, 20, 17) and torch.isfinite(b).all() and not torch.equal(a, b)
    correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert correlation > 0.5


def test_encode_overlap_too_large_for_the_half_tiles_names_the_input(vae: Vae) -> None:
    pixels = _image(128, 128)
    expected = "input 'overlap': a tile of 32 must be larger than its overlap of 32"
    with pytest.raises(WorkflowError, match=expected):
        VAE_ENCODE_TILED.function(ProgressContext(), pixels=pixels, vae=vae, tile_size=64, overlap=32)
