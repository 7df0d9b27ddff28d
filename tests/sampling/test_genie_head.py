"""The distilled GENIE head: file round trip, distillation that resumes, and the genie_head sampler."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.genie_head import (
    GenieHeadConfig,
    load_genie_head,
    save_genie_head,
    tiny_genie_head,
)
from diffsplit.engine.sampling.denoiser import CFGDenoiser
from diffsplit.engine.sampling.genie import MissingGenieHead
from diffsplit.engine.sampling.genie_distill import DistillSettings, distill, partial_path
from diffsplit.engine.sampling.ksampler import sample_latent
from diffsplit.engine.types import DiffusionModel
from safetensors.torch import save_file

SETTINGS = DistillSettings(iterations=12, batch_size=4, trajectories=2, sampling_steps=3, checkpoint_every=4,
                           latent_shape=(4, 8, 8), head=GenieHeadConfig(hidden=8, blocks=1, time_features=8))


def test_a_head_file_round_trips_and_other_files_are_refused(tmp_path: Path) -> None:
    head = tiny_genie_head(3)
    loaded = load_genie_head(save_genie_head(head, tmp_path / "head.safetensors"))
    assert loaded.config == head.config
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match="not a GENIE head"):
        load_genie_head(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match=r"junk\.safetensors"):
        load_genie_head(tmp_path / "junk.safetensors")


@pytest.fixture
def denoiser(sd15: DiffusionModel, make_cond: Callable[..., list[list[Any]]]) -> CFGDenoiser:
    return CFGDenoiser.build(sd15, make_cond(1), make_cond(2), 4.0, (1, 4, 8, 8))


def test_distillation_lowers_the_loss_and_resumes_where_it_stopped(
    denoiser: CFGDenoiser, tmp_path: Path
) -> None:
    whole = distill(denoiser, tmp_path / "whole.safetensors", SETTINGS)
    assert whole.path.exists() and len(whole.losses) == SETTINGS.iterations and whole.resumed_at == 0
    assert all(torch.isfinite(torch.tensor(whole.losses)))
    assert min(whole.losses[-4:]) < whole.losses[0]

    out = tmp_path / "resumed.safetensors"
    first = distill(denoiser, out, SETTINGS, stop_after=6)
    assert first.path == partial_path(out) and first.path.exists() and not out.exists()
    second = distill(denoiser, out, SETTINGS)
    assert second.resumed_at == 6 and len(second.losses) == SETTINGS.iterations - 6
    assert out.exists() and not partial_path(out).exists()
    for name, tensor in whole.head.state_dict().items():  # the same run as without the interruption
        torch.testing.assert_close(second.head.state_dict()[name], tensor, rtol=0, atol=0, msg=name)

    other = dataclasses.replace(SETTINGS, seed=5)
    distill(denoiser, tmp_path / "other.safetensors", other, stop_after=4)
    with pytest.raises(ValueError, match="other distillation settings"):
        distill(denoiser, tmp_path / "other.safetensors", SETTINGS)


def test_the_genie_head_sampler_needs_a_head_and_uses_one_evaluation_per_step(
    sd15: DiffusionModel, make_cond: Callable[..., list[list[Any]]]
) -> None:
    arguments: dict[str, Any] = {
        "seed": 4, "steps": 4, "cfg": 4.0, "sampler_name": "genie_head", "scheduler": "karras",
        "positive": make_cond(1), "negative": make_cond(2), "latent": {"samples": torch.zeros(1, 4, 8, 8)},
    }
    with pytest.raises(MissingGenieHead, match="GenieHeadLoader"):
        sample_latent(sd15, **arguments)
    with_head = dataclasses.replace(sd15, genie_head=tiny_genie_head(1))
    calls = []
    forward = with_head.unet.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return forward(*args, **kwargs)

    with_head.unet.forward = counting  # type: ignore[method-assign]
    try:
        sample = sample_latent(with_head, **arguments)["samples"]
    finally:
        del with_head.unet.forward
    assert len(calls) == 4  # one (cond + uncond batched) UNet call per step
    euler = sample_latent(sd15, **{**arguments, "sampler_name": "euler"})["samples"]
    assert torch.isfinite(sample).all() and not torch.equal(sample, euler)
    # an untrained head (last layer zero) has no curvature: its steps are DDIM's (Euler in these variables)
    zero = dataclasses.replace(sd15, genie_head=distill_free_head())
    torch.testing.assert_close(sample_latent(zero, **arguments)["samples"], euler, rtol=0, atol=1e-6)


def distill_free_head() -> torch.nn.Module:
    from diffsplit.engine.models.genie_head import GenieHead

    return GenieHead(GenieHeadConfig(hidden=8, blocks=1, time_features=8)).eval()


def test_the_distill_command_writes_a_head_that_loads(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffsplit.cli import main

    checkpoint = str(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    out = tmp_path / "heads" / "tiny.safetensors"
    argv = ["genie", "distill", "--ckpt", checkpoint, "--out", str(out), "--iterations", "6",
            "--trajectories", "2", "--steps", "3", "--size", "64", "--hidden", "8", "--prompt", "a cat"]
    assert main(argv) == 0
    assert load_genie_head(out).config.hidden == 8
    assert "wrote" in capsys.readouterr().err
    assert main([*argv[:5], str(tmp_path / "head.bin"), *argv[6:]]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert main([*argv[:3], str(tmp_path / "absent.safetensors"), *argv[4:]]) == 1
    assert "--ckpt" in capsys.readouterr().err
