"""VAEDecodeTiled and VAEEncodeTiled: the VAE over overlapping tiles, blended as ComfyUI blends them.

As ComfyUI's ``VAE.decode_tiled_``/``encode_tiled_`` do for image VAEs, each
runs three tiled passes with tiles of ``t x t``, ``t/2 x 2t`` and ``2t x t/2``
(:func:`~diffsplit.engine.nodes.tiling.tiled_scale`, feathered over the
overlap) and averages them, so no tile seam lines up in all three. Decoding
averages the decoder's raw output, then maps it to [0, 1]; encoding averages
the scaled posterior means (the LATENT convention of
:mod:`~diffsplit.engine.nodes.latent`). VAEDecodeTiled takes ``tile_size``
and ``overlap`` in pixels and works in latent units (``/ 8``), shrinking an
overlap above a quarter of the tile to a quarter, as ComfyUI does.

When the whole latent (or image) fits one tile of all three passes, the
three passes would each process it whole: it is then decoded (encoded) once,
exactly as VAEDecode (VAEEncode) does. ComfyUI averages the three equal
results, which differs from one by at most a float rounding step.

``temporal_size`` and ``temporal_overlap`` are for video VAEs, as in ComfyUI;
image VAEs ignore them.
"""

from __future__ import annotations

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.latent import VAE_DOWNSCALE, Latent, vae_decode, vae_encode
from diffsplit.engine.nodes.tiling import TileFunction, tile_count, tiled_scale
from diffsplit.engine.nodes.upscale import crop_to_multiple
from diffsplit.engine.types import Vae

MAX_TILE = 4096

Passes = tuple[tuple[int, int], ...]


def _placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def decode_passes(tile: int) -> Passes:
    """The (height, width) tiles of ComfyUI's three decode passes, in its order of summing."""
    return ((tile * 2, tile // 2), (tile // 2, tile * 2), (tile, tile))


def encode_passes(tile: int) -> Passes:
    """The (height, width) tiles of ComfyUI's three encode passes, in its order of summing."""
    return ((tile, tile), (tile // 2, tile * 2), (tile * 2, tile // 2))


def _fits_every_pass(height: int, width: int, passes: Passes) -> bool:
    return all(height <= rows and width <= cols for rows, cols in passes)


def _averaged_passes(
    samples: torch.Tensor,
    function: TileFunction,
    passes: Passes,
    *,
    overlap: int,
    scale: float,
    out_channels: int,
    ctx: NodeContext | None,
) -> torch.Tensor:
    """The three tiled passes summed in order and divided by 3; progress counts every tile."""
    height, width = samples.shape[-2:]
    try:  # only the tiling's geometry is checked here, before any tile runs
        counts = [samples.shape[0] * tile_count(height, width, tile, overlap) for tile in passes]
    except ValueError as error:
        reason = f"{error}; use a smaller overlap or a larger tile_size"
        raise WorkflowError(reason, input_name="overlap") from None
    total = sum(counts)
    results = []
    for number, tile in enumerate(passes):
        offset = sum(counts[:number])

        def report(done: int, _: int, offset: int = offset) -> None:
            if ctx is not None:
                ctx.progress(offset + done, total)

        results.append(tiled_scale(
            samples, function, tile=tile, overlap=overlap, scale=scale, out_channels=out_channels,
            progress=report,
        ))
    first, *rest = results
    for blended in rest:
        first.add_(blended)
    return first.div_(3.0)


def vae_decode_tiled(
    vae: Vae, samples: torch.Tensor, *, tile: int, overlap: int, ctx: NodeContext | None = None
) -> torch.Tensor:
    """Scaled latents ``[B, 4, h, w]`` → IMAGE ``[B, 8h, 8w, 3]``, ``tile``/``overlap`` in latent cells."""
    height, width = samples.shape[-2:]
    if _fits_every_pass(height, width, decode_passes(tile)):
        return vae_decode(vae, samples)
    device, dtype = _placement(vae.model)

    def decode(piece: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = (piece / vae.scaling_factor).to(device=device, dtype=dtype).contiguous()
            return vae.model.decode(latents).sample.float().cpu()

    decoded = _averaged_passes(
        samples, decode, decode_passes(tile), overlap=overlap, scale=VAE_DOWNSCALE,
        out_channels=vae.model.config.out_channels, ctx=ctx,
    )
    return ((decoded + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)


def vae_encode_tiled(
    vae: Vae, pixels: torch.Tensor, *, tile: int, overlap: int, ctx: NodeContext | None = None
) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` → scaled latents, centre-cropped to multiples of 8 first; sizes in pixels."""
    pixels = crop_to_multiple(pixels, VAE_DOWNSCALE)
    height, width = pixels.shape[1:3]
    if _fits_every_pass(height, width, encode_passes(tile)):
        return vae_encode(vae, pixels)
    device, dtype = _placement(vae.model)

    def encode(piece: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            signed = (piece * 2.0 - 1.0).to(device=device, dtype=dtype).contiguous()
            posterior = vae.model.encode(signed).latent_dist
        return (posterior.mean.float() * vae.scaling_factor).cpu()

    return _averaged_passes(
        pixels[..., :3].movedim(-1, 1), encode, encode_passes(tile), overlap=overlap, scale=1 / VAE_DOWNSCALE,
        out_channels=vae.model.config.latent_channels, ctx=ctx,
    )


def vae_decode_tiled_node(
    ctx: NodeContext,
    *,
    samples: Latent,
    vae: Vae,
    tile_size: int,
    overlap: int,
    temporal_size: int = 64,
    temporal_overlap: int = 8,
) -> tuple[torch.Tensor]:
    """ComfyUI VAEDecodeTiled (``temporal_*`` only matter for video VAEs)."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    images = vae_decode_tiled(
        vae, samples["samples"], tile=tile_size // VAE_DOWNSCALE, overlap=overlap // VAE_DOWNSCALE, ctx=ctx
    )
    return (images,)


def vae_encode_tiled_node(
    ctx: NodeContext,
    *,
    pixels: torch.Tensor,
    vae: Vae,
    tile_size: int,
    overlap: int,
    temporal_size: int = 64,
    temporal_overlap: int = 8,
) -> tuple[Latent]:
    """ComfyUI VAEEncodeTiled (``temporal_*`` only matter for video VAEs)."""
    return ({"samples": vae_encode_tiled(vae, pixels, tile=tile_size, overlap=overlap, ctx=ctx)},)


def _temporal_inputs() -> tuple[InputSpec, InputSpec]:
    return (
        InputSpec("temporal_size", "INT", default=64, min=8, max=MAX_TILE, step=4),
        InputSpec("temporal_overlap", "INT", default=8, min=4, max=MAX_TILE, step=4),
    )


VAE_DECODE_TILED = NodeClass(
    name="VAEDecodeTiled",
    inputs=(
        InputSpec("samples", "LATENT"),
        InputSpec("vae", "VAE"),
        InputSpec("tile_size", "INT", default=512, min=64, max=MAX_TILE, step=32),
        InputSpec("overlap", "INT", default=64, min=0, max=MAX_TILE, step=32),
        *_temporal_inputs(),
    ),
    outputs=(OutputSpec("IMAGE", "IMAGE"),),
    function=vae_decode_tiled_node,
    category="latent",
    description="Decode latents with the VAE in overlapping tiles (less memory for large images).",
)

VAE_ENCODE_TILED = NodeClass(
    name="VAEEncodeTiled",
    inputs=(
        InputSpec("pixels", "IMAGE"),
        InputSpec("vae", "VAE"),
        InputSpec("tile_size", "INT", default=512, min=64, max=MAX_TILE, step=64),
        InputSpec("overlap", "INT", default=64, min=0, max=MAX_TILE, step=32),
        *_temporal_inputs(),
    ),
    outputs=(OutputSpec("LATENT", "LATENT"),),
    function=vae_encode_tiled_node,
    category="latent",
    description="Encode images with the VAE in overlapping tiles (less memory for large images).",
)

NODES: tuple[NodeClass, ...] = (VAE_DECODE_TILED, VAE_ENCODE_TILED)
