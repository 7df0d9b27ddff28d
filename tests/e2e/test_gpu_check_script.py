"""``bench/gpu_check.py``: the GPU check runs end to end on the tiny models, and its full-size models load.

The script is run as users run it (a child process of this venv's Python, offline).
``--tiny --device cpu`` takes the code path of the full check: local device runner,
CPU-only run, a worker process (cold and warm), split == local, SDXL, the JSON report.
The full-size configs are checked on the meta device: the loaders infer from their
shapes exactly the configs the check builds, so the written checkpoints need no
override metadata and load as the real files do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _run_script(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFSPLIT_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=240, check=False)


def test_tiny_check_reports_every_section_with_sane_values(tmp_path: Path) -> None:
    out = tmp_path / "tmp.json"
    done = _run_script("--tiny", "--device", "cpu", "--out", str(out), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["errors"] == {}
    assert report["mode"] == "tiny" and report["device"] == "cpu"
    sd15 = report["sd15"]
    assert sd15["local"]["sampler_it_s"] > 0
    assert sd15["local"]["vram_peak_bytes"] is None, "no CUDA: no measured VRAM peak"
    assert sd15["cpu_only"]["steps_measured"] == 2 and sd15["cpu_only"]["scaled_to_steps"] == 20
    assert sd15["cpu_only"]["ksampler_s_scaled"] > 0
    worker = sd15["worker"]
    assert worker["warm"]["sampler_it_s"] > 0
    assert worker["cold"]["rebuild_s"]["KSampler"] > 0, "a fresh worker builds the model on first request"
    for label in ("cold", "warm"):
        for class_type in ("KSampler", "VAEDecode"):
            wire = worker["wire_bytes"][label][class_type]
            assert wire["request_bytes"] > 0 and wire["reply_bytes"] > 0
            assert wire["recipe_bytes"] > 0
    # the image comes back: the decoder's reply carries a 64x64 RGB float image
    assert worker["wire_bytes"]["cold"]["VAEDecode"]["reply_tensor_bytes"] >= 64 * 64 * 3 * 4
    same = sd15["split_equals_local"]
    assert same["max_abs_diff"] == 0.0 and same["equal"] is True and same["images_finite"] is True
    assert "fp32" in same["policy"]
    assert sd15["seed_experiment"]["speedup_warm"] > 0
    assert report["sdxl"]["local"]["sampler_it_s"] > 0
    assert report["sdxl"]["local"]["image_finite"] is True
    assert set(report["phases_s"]) >= {"models: SD 1.5", "SD 1.5 local on the device", "SD 1.5 CPU only",
                                        "SD 1.5 on a worker", "models: SDXL", "SDXL local on the device"}
    assert "split == local on the device" in done.stdout and "all checks passed" in done.stdout
    assert "scaled" in done.stdout, "the CPU-only figure says it was scaled"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the check would run")
def test_without_cuda_the_full_check_says_so_and_exits_zero(tmp_path: Path) -> None:
    out = tmp_path / "skipped.json"
    done = _run_script("--out", str(out), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "skipped: no CUDA GPU is available" in done.stdout
    assert "skipped" in json.loads(out.read_text())
    assert not (tmp_path / "cache").exists(), "nothing heavy (not even the tokenizer cache) was written"


def _bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"gpu_check_bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_size_configs_are_what_the_loaders_infer(family: str) -> None:
    from diffsplit.engine.models import infer_config as infer
    from diffsplit.engine.models.checkpoint import UNET_PREFIX, infer_checkpoint_configs, text_slots
    from diffsplit.engine.models.ldm_keys import ldm_shapes_of, module_shapes_of
    from diffsplit.engine.models.ldm_text import clip_l_key_rules, open_clip_key_rules
    from diffsplit.engine.models.ldm_unet import unet_key_rules
    from diffsplit.engine.models.ldm_vae import LDM_VAE_PREFIX, vae_key_rules
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    models = _bench_module("gpu_check_models")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**models.UNET_CONFIGS[family])
        vae = AutoencoderKL(**models.vae_config(family))
        encoders = [
            (CLIPTextModel if kind == "clip_l" else CLIPTextModelWithProjection)(models.clip_config(kind))
            for kind in models.text_encoder_kinds(family)
        ]
    shapes: dict[str, tuple[int, ...]] = {}
    parts = [(unet, unet_key_rules, UNET_PREFIX), (vae, vae_key_rules, LDM_VAE_PREFIX)]
    for slot, encoder in zip(text_slots(family), encoders, strict=True):
        rules_for = clip_l_key_rules if slot.kind == "clip_l" else open_clip_key_rules
        parts.append((encoder, rules_for, slot.prefix))
    for module, rules_for, prefix in parts:
        module_shapes = module_shapes_of(module)
        ldm = ldm_shapes_of(rules_for(module_shapes.keys()), module_shapes)
        shapes.update({prefix + key: shape for key, shape in ldm.items()})
    inferred = infer_checkpoint_configs(shapes, family, Path(f"{family}.safetensors"))
    assert infer.diffusers_overrides(UNet2DConditionModel, unet.config, inferred["unet"]) == {}
    assert infer.diffusers_overrides(AutoencoderKL, vae.config, inferred["vae"]) == {}
    for slot, encoder in zip(text_slots(family), encoders, strict=True):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "hidden_act", "eos_token_id"):
            assert CLIPTextConfig(**inferred[slot.kind]).to_dict()[name] == encoder.config.to_dict()[name]
    unet_parameters = sum(p.numel() for p in unet.parameters())
    assert unet_parameters == {"sd15": 859_520_964, "sdxl": 2_567_463_684}[family], "the published UNet sizes"
