"""Attacks a review found after the first hardening: each passed the per-input caps but not the whole.

An echo flood that never reads its replies, a megabyte prompt, a config of nested YAML aliases (a
"billion laughs"), a tiled encode of many tiny overlapping tiles, thousands of small uploads, and a
sampler at the step cap on the largest picture: each is refused (or rate-limited) before the work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.models.ldm_config import read_ldm_config
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.remote.echo_budget import MAX_ECHO_BYTES, EchoBudget
from diffsplit.remote.errors import BadRequest, Overloaded
from diffsplit.remote.uploads import UploadLimits, UploadReceiver
from diffsplit.remote.work_limits import WorkLimits, check_node_inputs
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_ops import UploadChunk

from .test_bounded_work import default_worker, model_recipe, node, refusal, sampler_inputs, zeros

__all__ = ["default_worker"]  # the module fixture, shared
REGISTRY = default_registry()


def test_echo_replies_are_capped_and_rate_limited_across_clients(default_worker: str) -> None:
    with Client(default_worker) as client:
        too_big = refusal(client.request({"op": "echo", "reply_bytes": MAX_ECHO_BYTES + 1}, timeout=10))
        assert str(MAX_ECHO_BYTES) in too_big
        kinds = set()
        for _ in range(16):  # 48 MiB asked at once: more than the bucket's burst
            reply = client.request({"op": "echo", "reply_bytes": MAX_ECHO_BYTES}, timeout=30)
            kinds.add(reply["op"] if reply["op"] == "result" else reply["error"]["kind"])
        assert kinds == {"result", "Overloaded"}
        assert client.request({"op": "hello"}, timeout=10)["op"] == "result"


def test_the_echo_budget_refills_with_time() -> None:
    now = [0.0]
    budget = EchoBudget(rate=100, burst=300, clock=lambda: now[0])
    assert budget.take(300) and not budget.take(1)
    now[0] = 2.0
    assert budget.take(200) and not budget.take(1)


def test_a_megabyte_prompt_is_refused_before_the_text_encoder_runs(
    default_worker: str, models_dir: Path
) -> None:
    clip = {"$ds:model": model_recipe(models_dir, sd15_workflow(lora=False), "1", output=1)}
    with Client(default_worker) as client:
        message = refusal(client.request(node("CLIPTextEncode", text="a " * 500_000, clip=clip), timeout=60))
        assert "1000000 characters" in message and "limit of 65536" in message
        ok = client.request(node("CLIPTextEncode", text="a cat", clip=clip), timeout=120)
        assert ok["op"] == "result"


def test_yaml_aliases_in_a_config_are_refused_before_they_expand(tmp_path: Path) -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    config = tmp_path / "laughs.yaml"
    config.write_text("\n".join(levels) + "\nmodel: {target: *a8}\n")
    with pytest.raises(ModelFileError, match="aliases") as raised:
        read_ldm_config(config)
    assert len(str(raised.value)) < 1000
    long_target = tmp_path / "long.yaml"
    long_target.write_text("model: {target: '" + "x" * 100_000 + "'}\n")
    with pytest.raises(ModelFileError) as raised:
        read_ldm_config(long_target)
    assert len(str(raised.value)) < 1000  # the bad value is quoted, cut short


def test_many_tiny_overlapping_tiles_are_refused() -> None:
    vae_tiled = REGISTRY["VAEEncodeTiled"]
    inputs = {"pixels": zeros(1, 4096, 4096, 3), "tile_size": 64, "overlap": 32, "temporal_size": 64,
              "temporal_overlap": 8}
    with pytest.raises(BadRequest, match="tiles"):
        check_node_inputs(REGISTRY, vae_tiled, "9", inputs, WorkLimits())
    check_node_inputs(REGISTRY, vae_tiled, "9", {**inputs, "tile_size": 512, "overlap": 64}, WorkLimits())


def test_steps_times_pixels_is_capped_even_when_each_is_within_its_cap(models_dir: Path) -> None:
    ksampler = REGISTRY["KSampler"]
    inputs = sampler_inputs(models_dir, 10_000)
    inputs["latent_image"] = {"samples": zeros(1, 4, 128, 128)}  # a 1024² image, 10,000 steps
    with pytest.raises(BadRequest, match="step-pixels"):
        check_node_inputs(REGISTRY, ksampler, "9", inputs, WorkLimits())
    check_node_inputs(REGISTRY, ksampler, "9", {**inputs, "steps": 30}, WorkLimits())


def test_installed_uploads_are_counted_per_client_and_in_all(tmp_path: Path) -> None:
    import hashlib

    receiver = UploadReceiver(tmp_path, UploadLimits(max_installed_per_client=2, max_installed=3))

    def upload(number: int, client: str) -> None:
        data = torch.tensor(list(f"file {number}".encode()), dtype=torch.uint8)
        receiver.receive(UploadChunk.parse({
            "folder": "loras", "name": f"f{number}.safetensors",
            "sha256": hashlib.sha256(bytes(data.tolist())).hexdigest(),
            "total_bytes": data.numel(), "offset": 0, "data": data, "final": True}), client)

    upload(1, "a")
    upload(2, "a")
    with pytest.raises(BadRequest, match="installed 2 files"):
        upload(3, "a")
    upload(4, "b")
    with pytest.raises(Overloaded, match="3 files were uploaded"):
        upload(5, "c")
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == ["f1.safetensors", "f2.safetensors",
                                                                      "f4.safetensors"]
