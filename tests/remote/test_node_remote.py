"""@diffsplit.node(remote=...): a decorated step's code runs on a --trust-code worker over CURVE."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffsplit.engine.call_offload import OffloadError
from diffsplit.transport.auth import ClientCurve, KeyPair, generate_keypair, save_keypair
from diffusers import StableDiffusionPipeline

import diffsplit
from diffsplit.demo import READY_PREFIX


def denoise(unet, scheduler, latents, embeds, steps: int):
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        noise = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=embeds).sample
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, KeyPair, KeyPair]:
    folder = tmp_path_factory.mktemp("keys")
    server, client = generate_keypair(), generate_keypair()
    save_keypair(server, folder, "worker")
    save_keypair(KeyPair(client.public), folder / "clients", "alice")
    return folder, server, client


@pytest.fixture(scope="module")
def trusted_worker(models_dir: Path, keys) -> Iterator[str]:
    folder, _, _ = keys
    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models_dir),
               "--listen", "tcp://127.0.0.1:*", "--trust-code",
               "--curve-secret", str(folder / "worker.key_secret"),
               "--curve-clients", str(folder / "clients")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith(READY_PREFIX), line
    yield line[len(READY_PREFIX):].split()[0]
    process.terminate()
    process.wait(20)


def test_decorated_step_runs_remotely_and_equals_local(models_dir: Path, trusted_worker: str, keys) -> None:
    _, server, client = keys
    remote_denoise = diffsplit.node(remote=trusted_worker, curve=ClientCurve(server.public, client))(denoise)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    embeds = torch.randn(1, 77, 64, generator=generator)
    folder = models_dir / "diffusers" / "tiny-sd15"

    @diffsplit.workflow
    def generate() -> torch.Tensor:
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        return remote_denoise(pipe.unet, pipe.scheduler, latents, embeds, 3)

    traced = generate.trace()  # a full local run: the step runs here
    remote = generate()  # a plain call: the step runs on the worker
    assert torch.equal(traced.result, remote)
    assert traced.steps[0].remote == trusted_worker


def test_without_a_trace_model_arguments_are_refused_before_sending(
    models_dir: Path, trusted_worker: str, keys
) -> None:
    _, server, client = keys
    remote_denoise = diffsplit.node(remote=trusted_worker, curve=ClientCurve(server.public, client))(denoise)
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    with pytest.raises(OffloadError, match="no trace is active"):
        remote_denoise(pipe.unet, pipe.scheduler, torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 64), 2)


def test_trust_code_without_curve_clients_refuses_to_start(models_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models_dir),
         "--listen", "tcp://127.0.0.1:*", "--trust-code"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "--trust-code needs CURVE" in result.stderr
