"""Edit-model guidance on micro UNets: DualCFGGuider's formulas and the InstructPix2Pix image latent."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffsplit.engine.models.tiny import reinitialize
from diffsplit.engine.sampling.denoiser import CFGDenoiser
from diffsplit.engine.sampling.dual_cfg import DualCFGDenoiser
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.types import DiffusionModel
from diffusers import UNet2DConditionModel

from .conftest import CONTEXT_DIM, conditioning

SHAPE = (1, 4, 8, 8)
SIGMA = torch.tensor(2.0)


def _x(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.0


def _alone(model: DiffusionModel, cond: Any, x: torch.Tensor) -> torch.Tensor:
    """The prediction of one conditioning on its own (cfg 1, no negative: exactly the cond prediction)."""
    return CFGDenoiser.build(model, cond, [], 1.0, x.shape)(x, SIGMA)


def _dual(model: DiffusionModel, x: torch.Tensor, *, cfg: float, cfg_middle: float, nested: bool,
          negative: Any = None) -> torch.Tensor:
    denoiser = DualCFGDenoiser.build_dual(
        model, conditioning(1), conditioning(2), negative if negative is not None else conditioning(3),
        x.shape, cfg=cfg, cfg_middle=cfg_middle, nested=nested,
    )
    return denoiser(x, SIGMA)


@pytest.mark.parametrize("nested", [False, True], ids=["regular", "nested"])
def test_dual_cfg_combines_the_three_predictions_as_comfyui(sd15: DiffusionModel, nested: bool) -> None:
    x = _x()
    positive, middle, negative = (_alone(sd15, conditioning(seed), x) for seed in (1, 2, 3))
    assert not torch.allclose(positive, middle) and not torch.allclose(middle, negative)
    ours = _dual(sd15, x, cfg=4.0, cfg_middle=1.5, nested=nested)
    if nested:
        text = middle + (positive - middle) * 4.0
        expected = negative + (text - negative) * 1.5
    else:
        expected = negative + (middle - negative) * 1.5 + (positive - middle) * 4.0
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_dual_cfg_skips_the_negative_at_cfg_middle_one(sd15: DiffusionModel) -> None:
    x = _x(1)
    # an embedding the UNet cannot take: running the negative at all would raise
    unusable = [[torch.zeros(1, 77, CONTEXT_DIM + 3), {}]]
    ours = _dual(sd15, x, cfg=3.0, cfg_middle=1.0, nested=False, negative=unusable)
    positive, middle = _alone(sd15, conditioning(1), x), _alone(sd15, conditioning(2), x)
    torch.testing.assert_close(ours, middle + (positive - middle) * 3.0, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError):
        _dual(sd15, x, cfg=3.0, cfg_middle=1.0, nested=True, negative=unusable)  # nested always runs it


def _ip2p_model() -> DiffusionModel:
    """A micro SD 1.5 UNet with InstructPix2Pix's 8 input channels."""
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel(
            in_channels=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=CONTEXT_DIM, attention_head_dim=4, sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    return DiffusionModel(unet=reinitialize(unet, torch.Generator().manual_seed(5)), family="sd15")


@torch.no_grad()
def test_an_8_channel_unet_takes_the_image_latent_unscaled_beside_the_noisy_one() -> None:
    model = _ip2p_model()
    x = _x(2)
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    cond = conditioning(1, concat_latent_image=image)
    ours = CFGDenoiser.build(model, cond, [], 1.0, x.shape)(x, SIGMA)
    sigma = float(SIGMA)
    timestep = DiscreteSchedule(model.sampling).timestep(SIGMA).expand(1)
    unet_input = torch.cat([x / (sigma**2 + 1) ** 0.5, image], dim=1)
    eps = model.unet(unet_input, timestep, encoder_hidden_states=cond[0][0]).sample
    torch.testing.assert_close(ours, x - eps * sigma)
    # without an image latent the UNet sees zeros there, as in ComfyUI
    blank = conditioning(1, concat_latent_image=torch.zeros(SHAPE))
    zeros = CFGDenoiser.build(model, blank, [], 1.0, x.shape)
    plain = CFGDenoiser.build(model, conditioning(1), [], 1.0, x.shape)
    assert torch.equal(zeros(x, SIGMA), plain(x, SIGMA)) and not torch.allclose(ours, plain(x, SIGMA))


def test_the_image_latent_is_resized_to_the_latent_and_ignored_by_4_channel_unets(
    sd15: DiffusionModel,
) -> None:
    model = _ip2p_model()
    x = _x(3)
    small = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    resized = torch.nn.functional.interpolate(small, size=(8, 8), mode="bilinear")
    a = CFGDenoiser.build(model, conditioning(1, concat_latent_image=small), [], 1.0, x.shape)(x, SIGMA)
    b = CFGDenoiser.build(model, conditioning(1, concat_latent_image=resized), [], 1.0, x.shape)(x, SIGMA)
    assert torch.equal(a, b)
    with_image = CFGDenoiser.build(sd15, conditioning(1, concat_latent_image=small), [], 1.0, x.shape)
    assert torch.equal(with_image(x, SIGMA), _alone(sd15, conditioning(1), x))
