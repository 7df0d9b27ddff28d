"""InstructPixToPixConditioning and DualCFGGuider; the tiny set's 8-channel edit checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.models.checkpoint import load_checkpoint, load_vae
from diffsplit.engine.models.tiny_ip2p import TINY_IP2P_FILE
from diffsplit.engine.nodes.latent import vae_encode
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.types import Guider, Vae

REGISTRY = default_registry()
IP2P = REGISTRY["InstructPixToPixConditioning"]
DUAL_CFG = REGISTRY["DualCFGGuider"]


@pytest.fixture(scope="module")
def vae(models_dir: Path) -> Vae:
    return load_vae(models_dir / "vae" / "tiny-vae.safetensors")


def _cond(seed: int) -> list[list]:
    return [[torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(seed)), {"pooled_output": None}]]


def test_ip2p_conditioning_attaches_the_unscaled_latent_of_the_centre_crop(vae: Vae) -> None:
    pixels = torch.rand(1, 70, 61, 3, generator=torch.Generator().manual_seed(0))
    positive, negative = _cond(1), _cond(2)
    out_positive, out_negative, latent = IP2P.function(None, positive=positive, negative=negative, vae=vae,
                                                       pixels=pixels)
    # 70 x 61 → 64 x 56, cut evenly: rows 3..67, columns 2..58
    expected = vae_encode(vae, pixels[:, 3:67, 2:58, :]) / vae.scaling_factor
    for out, source in ((out_positive, positive), (out_negative, negative)):
        assert torch.equal(out[0][1]["concat_latent_image"], expected)
        assert out[0][0] is source[0][0] and "concat_latent_image" not in source[0][1]
    assert latent["samples"].shape == (1, 4, 8, 7) and not latent["samples"].any()


def test_dual_cfg_guider_holds_the_three_conditionings_and_scales() -> None:
    (guider,) = DUAL_CFG.function(None, model="m", cond1=_cond(1), cond2=_cond(2), negative=_cond(3),
                                  cfg_conds=5.0, cfg_cond2_negative=1.5, style="nested")
    assert isinstance(guider, Guider) and guider.cfg == 5.0 and guider.cfg_middle == 1.5 and guider.nested
    assert guider.middle[0][1]["prompt_type"] == "negative"  # as ComfyUI marks cond2
    assert torch.equal(guider.middle[0][0], _cond(2)[0][0]) and guider.negative[0][0].equal(_cond(3)[0][0])
    assert [spec.name for spec in DUAL_CFG.widget_inputs] == ["cfg_conds", "cfg_cond2_negative", "style"]


def test_the_tiny_edit_checkpoint_has_an_8_channel_unet(models_dir: Path) -> None:
    parts = load_checkpoint(models_dir / "checkpoints" / TINY_IP2P_FILE)
    assert parts.model.family == "sd15" and parts.model.unet.config.in_channels == 8
    plain = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    assert torch.equal(parts.vae.model.encoder.conv_in.weight, plain.vae.model.encoder.conv_in.weight)
