"""unCLIP noise augmentation: bit for bit what ComfyUI's unclip_adm computes for SDXL, on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffsplit.engine.sampling.unclip import noise_level, unclip_pooled

WIDTH = 16


def _comfyui_unclip_adm(unclip_conditioning: list[dict], seed: int) -> torch.Tensor:
    """ComfyUI's ``unclip_adm`` for SDXL as it runs there: the global generator, reseeded per row.

    Its schedule (squaredcos_cap_v2 via ``betas_for_alpha_bar``), zero mean / unit std, the
    ``cat(z, level embedding) * strength`` rows, the merge at level 0 with ``randn_like``.
    """
    betas = []
    for i in range(1000):
        t1, t2 = i / 1000, (i + 1) / 1000
        bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas.append(min(1 - bar(t2) / bar(t1), 0.999))
    cumprod = np.cumprod(1.0 - np.array(betas), axis=0)
    sqrt_a = torch.tensor(np.sqrt(cumprod), dtype=torch.float32)
    sqrt_1m = torch.tensor(np.sqrt(1.0 - cumprod), dtype=torch.float32)
    mean, std = torch.zeros(WIDTH)[None, :], torch.ones(WIDTH)[None, :]

    def augment(x: torch.Tensor, level: int, noise_seed: int | None) -> torch.Tensor:
        x = (x - mean) * 1.0 / std
        if noise_seed is None:
            noise = torch.randn_like(x)
        else:
            generator = torch.manual_seed(noise_seed)  # ComfyUI seeds the global generator
            noise = torch.randn(x.size(), dtype=x.dtype, layout=x.layout, generator=generator)
        t = torch.tensor([level])
        z = sqrt_a.gather(-1, t).reshape(1, 1) * x + sqrt_1m.gather(-1, t).reshape(1, 1) * noise
        embedding = torch.zeros(1, 1280)  # the level's time embedding: cut off below
        return torch.cat(((z * std) + mean, embedding), 1)

    rows = []
    for item in unclip_conditioning:
        for embed in item["clip_vision_output"]["image_embeds"]:
            level = round(999 * item["noise_augmentation"])
            rows.append(augment(embed, level, seed - 10) * item["strength"])
    adm = rows[0]
    if len(rows) > 1:
        adm = augment(torch.stack(rows).sum(0)[:, :WIDTH], round(999 * 0.0), None)
    return adm[:, :WIDTH]


def _item(seed: int, batch: int, strength: float, noise_augmentation: float) -> dict:
    embeds = torch.randn((batch, WIDTH), generator=torch.Generator().manual_seed(seed))
    return {"clip_vision_output": {"image_embeds": embeds}, "strength": strength,
            "noise_augmentation": noise_augmentation}


@pytest.mark.parametrize(
    ("items", "seed"),
    [
        ([(1, 1, 0.75, 0.0)], 133632471276133),
        ([(2, 1, 1.0, 0.3)], 5),  # seed - 10 is negative
        ([(3, 1, 0.75, 0.0), (4, 1, 0.75, 0.0)], 42),  # two entries: merged and augmented again
        ([(5, 2, -1.5, 0.9)], 2**64 - 1),  # two images in one output: merged too
    ],
)
def test_equals_comfyuis_unclip_adm_bit_for_bit(items: list[tuple], seed: int) -> None:
    conditioning = [_item(*args) for args in items]
    with torch.random.fork_rng(devices=[]):
        expected = _comfyui_unclip_adm(conditioning, seed)
    actual = unclip_pooled(conditioning, WIDTH, seed)
    assert actual.shape == (1, WIDTH) and actual.dtype == torch.float32
    assert torch.equal(actual, expected)


def test_the_global_generator_is_left_alone() -> None:
    before = torch.random.get_rng_state()
    unclip_pooled([_item(1, 1, 1.0, 0.5), _item(2, 1, 1.0, 0.5)], WIDTH, 7)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_noise_level_and_seed_change_the_result() -> None:
    item = _item(1, 1, 1.0, 0.0)
    clean = unclip_pooled([item], WIDTH, 0)
    assert torch.allclose(clean, item["clip_vision_output"]["image_embeds"], atol=0.05)  # level 0: nearly x
    noisy = unclip_pooled([{**item, "noise_augmentation": 0.8}], WIDTH, 0)
    assert not torch.allclose(noisy, clean, atol=0.05)
    assert not torch.equal(unclip_pooled([{**item, "noise_augmentation": 0.8}], WIDTH, 1), noisy)
    assert noise_level(0.0) == 0 and noise_level(1.0) == 999 and noise_level(0.5) == 500  # Python's round


def test_embeds_of_another_width_fail_clearly() -> None:
    with pytest.raises(ValueError, match="embeds are 16 wide, but this model's pooled input is 1280 wide"):
        unclip_pooled([_item(1, 1, 1.0, 0.0)], 1280, 0)
    with pytest.raises(ValueError, match="no clip_vision_output"):
        unclip_pooled([{"strength": 1.0, "noise_augmentation": 0.0}], WIDTH, 0)
    with pytest.raises(ValueError, match="holds no image embeds"):
        unclip_pooled([], WIDTH, 0)
