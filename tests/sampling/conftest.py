"""Micro diffusers models (a few thousand weights) for fast sampler and denoiser tests.

They have the real classes and call signatures (UNet2DConditionModel with and
without SDXL's ``text_time`` embedding, ControlNetModel.from_unet), seeded
random weights, and run in milliseconds on one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffsplit.engine.models.tiny import reinitialize
from diffsplit.engine.types import ControlNet, DiffusionModel, ModelFamily, ModelSampling
from diffusers import ControlNetModel, UNet2DConditionModel

CONTEXT_DIM = 16
POOLED_DIM = 8
TIME_EMBED_DIM = 4


@pytest.fixture(autouse=True)
def single_thread(one_torch_thread: None) -> None:
    """Tiny models run fastest on one thread on a shared machine (``one_torch_thread``)."""


def micro_unet(family: ModelFamily, seed: int = 0) -> UNet2DConditionModel:
    """A seeded two-level UNet2DConditionModel; SDXL families get the ``text_time`` embedding."""
    config: dict[str, Any] = {
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": CONTEXT_DIM,
        "attention_head_dim": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "sample_size": 8,
    }
    if family != "sd15":
        time_ids = 6 if family == "sdxl" else 5
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=time_ids * TIME_EMBED_DIM + POOLED_DIM,
        )
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel(**config)
    return reinitialize(unet, torch.Generator().manual_seed(seed))


def micro_model(
    family: ModelFamily = "sd15", seed: int = 0, prediction_type: str = "epsilon"
) -> DiffusionModel:
    """A DiffusionModel around :func:`micro_unet`."""
    sampling = ModelSampling(prediction_type=prediction_type)  # type: ignore[arg-type]
    return DiffusionModel(unet=micro_unet(family, seed), family=family, sampling=sampling)


def micro_controlnet(model: DiffusionModel, seed: int = 1) -> ControlNet:
    """A ControlNet shaped like ``model``'s UNet, with non-zero (randomised) zero-convs."""
    with torch.random.fork_rng(devices=[]):
        controlnet = ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=(4, 8, 8, 8))
    return ControlNet(model=reinitialize(controlnet, torch.Generator().manual_seed(seed)))


def conditioning(seed: int, tokens: int = 77, **extras: Any) -> list[list[Any]]:
    """A one-entry CONDITIONING with seeded embeddings (and a pooled output for SDXL use)."""
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, CONTEXT_DIM, generator=generator)
    pooled = torch.randn(1, POOLED_DIM, generator=generator)
    return [[cond, {"pooled_output": pooled, **extras}]]


@pytest.fixture(scope="session")
def sd15() -> DiffusionModel:
    return micro_model("sd15")


@pytest.fixture(scope="session")
def sdxl() -> DiffusionModel:
    return micro_model("sdxl")


@pytest.fixture(scope="session")
def refiner() -> DiffusionModel:
    return micro_model("sdxl_refiner")


@pytest.fixture(scope="session")
def controlnet(sd15: DiffusionModel) -> ControlNet:
    return micro_controlnet(sd15)


@pytest.fixture
def make_cond() -> Callable[..., list[list[Any]]]:
    return conditioning
