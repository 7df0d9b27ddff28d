"""LatentComposite(Masked), ImageCompositeMasked, ImageScaleToTotalPixels, ImagePadForOutpaint."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffsplit.engine.nodes.compositing import (
    image_composite_masked,
    image_pad_for_outpaint,
    image_scale_to_total_pixels,
    latent_composite,
    latent_composite_masked,
)

CTX = SimpleNamespace(node_id="3")


def _latent(value: float, height: int = 8, width: int = 8) -> dict:
    return {"samples": torch.full((1, 4, height, width), value)}


def test_latent_composite_pastes_at_latent_cells_and_clips_at_the_edge() -> None:
    target, source = _latent(0.0), _latent(1.0, 4, 4)
    (out,) = latent_composite(CTX, samples_to=target, samples_from=source, x=48, y=16, feather=0)
    samples = out["samples"]
    assert torch.equal(samples[:, :, 2:6, 6:8], torch.ones(1, 4, 4, 2))  # cut at the right edge
    assert float(samples.sum()) == 4 * 4 * 2 and float(target["samples"].sum()) == 0


def test_latent_composite_feathers_only_inner_edges() -> None:
    (out,) = latent_composite(CTX, samples_to=_latent(0.0), samples_from=_latent(1.0, 4, 4), x=16, y=0,
                              feather=16)
    row = out["samples"][0, 0, 0, 2:6].tolist()
    assert row == [0.5, 1.0, 1.0, 0.5]  # left and right edges are inside the target: feathered
    column = out["samples"][0, 0, 0:4, 3].tolist()
    assert column == [1.0, 1.0, 1.0, 0.5]  # the top edge touches the border: not feathered


def test_latent_composite_masked_blends_through_the_mask() -> None:
    mask = torch.zeros((32, 32))
    mask[:, :16] = 1.0
    (out,) = latent_composite_masked(CTX, destination=_latent(0.0), source=_latent(2.0, 4, 4), x=0, y=0,
                                     resize_source=False, mask=mask)
    patch = out["samples"][0, 0, :4, :4]
    assert torch.equal(patch[:, 0], torch.full((4,), 2.0)) and torch.equal(patch[:, 3], torch.zeros(4))
    (resized,) = latent_composite_masked(CTX, destination=_latent(0.0), source=_latent(2.0, 4, 4), x=0, y=0,
                                         resize_source=True)
    assert torch.equal(resized["samples"], torch.full((1, 4, 8, 8), 2.0))


def test_image_composite_masked_works_in_pixels_on_channels_last_images() -> None:
    destination = torch.zeros((1, 10, 10, 3))
    source = torch.ones((1, 3, 3, 3))
    (out,) = image_composite_masked(
        CTX, destination=destination, source=source, x=7, y=1, resize_source=False
    )
    assert out.shape == (1, 10, 10, 3)
    assert torch.equal(out[0, 1:4, 7:10], torch.ones(3, 3, 3)) and float(out.sum()) == 27


def test_scale_to_total_pixels_keeps_the_aspect_ratio() -> None:
    image = torch.rand((1, 64, 128, 3))
    (out,) = image_scale_to_total_pixels(CTX, image=image, upscale_method="bilinear", megapixels=0.03125)
    assert out.shape == (1, 128, 256, 3)  # 0.03125 * 2**20 = 32768 pixels at 1:2


def test_pad_for_outpaint_grows_the_canvas_and_feathers_the_mask() -> None:
    image = torch.rand((1, 20, 20, 3))
    canvas, mask = image_pad_for_outpaint(CTX, image=image, left=8, top=0, right=0, bottom=4, feathering=4)
    assert canvas.shape == (1, 24, 28, 3) and mask.shape == (24, 28)
    assert torch.equal(canvas[:, 0:20, 8:28], image) and float(canvas[0, 22, 0, 0]) == 0.5
    assert float(mask[0, 0]) == 1.0 and float(mask[23, 27]) == 1.0  # the new margins are painted
    assert float(mask[10, 8]) == 1.0  # distance 0 from the left margin: (4 - 0) / 4, squared
    assert float(mask[10, 9]) == (3 / 4) ** 2 and float(mask[10, 12]) == 0.0
    assert float(mask[0, 15]) == 0.0  # the top had no margin: no feathering there
    _, unfeathered = image_pad_for_outpaint(CTX, image=image, left=8, top=0, right=0, bottom=0, feathering=0)
    assert float(unfeathered[:, 8:].sum()) == 0.0
