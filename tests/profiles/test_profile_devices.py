"""``diffsplit profile``/``plan`` with the device flags: the nodes measured here run where the flags say,
and the profile says the device and dtypes they really used (never just what the machine has)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.profiles.report_json import check_profile_json

from diffsplit.cli import main


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(sd15_workflow(steps=2)))
    return path


def _profile(command: str, workflow_file: Path, models_dir: Path, inputs_dir: Path, tmp_path: Path,
             *flags: str) -> tuple[int, dict[str, Any]]:
    report = tmp_path / f"{command}.json"
    code = main([command, str(workflow_file), "--models", str(models_dir), "--inputs", str(inputs_dir),
                 "--out", str(tmp_path / "out"), "--warmup", "0", "--json", str(report), "-q", *flags])
    document = json.loads(report.read_text()) if report.exists() else {}
    return code, document


def test_fp16_profile_runs_the_models_placed_in_fp16_and_says_so(
    workflow_file: Path, models_dir: Path, inputs_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, document = _profile("profile", workflow_file, models_dir, inputs_dir, tmp_path, "--dtype", "fp16")
    assert code == 0
    check_profile_json(document)
    assert document["device"].startswith("cpu ("), document["device"]
    assert document["dtypes"] == dict.fromkeys(("unet", "vae", "text_encoder", "controlnet", "other"), "fp16")
    used = document["device_memory"]
    assert used is not None and used["device"] == "cpu" and used["budget_bytes"] is None
    # the UNet, the text encoder and the VAE were each placed as fp16 copies; the second prompt reused one
    assert used["placed"] >= 3 and used["reused"] >= 1
    assert {node["memory"]["kind"] for node in document["nodes"]} == {"rss"}
    assert "with models in unet=fp16 vae=fp16" in capsys.readouterr().out


def test_plan_takes_per_kind_dtypes_and_a_budget(
    workflow_file: Path, models_dir: Path, inputs_dir: Path, tmp_path: Path,
) -> None:
    code, document = _profile("plan", workflow_file, models_dir, inputs_dir, tmp_path,
                              "--device", "cpu", "--vae-dtype", "bf16", "--vram-gb", "4")
    assert code == 0
    check_profile_json(document)
    assert document["dtypes"]["vae"] == "bf16"
    assert document["dtypes"]["unet"] == document["dtypes"]["text_encoder"] == "fp32"
    used = document["device_memory"]
    assert used["budget_bytes"] == 4 << 30
    assert used["placed"] >= 1, "the fp32 models run as loaded; the bf16 VAE is a placed copy"


def test_default_profile_labels_the_cpu_and_places_nothing(
    workflow_file: Path, models_dir: Path, inputs_dir: Path, tmp_path: Path,
) -> None:
    code, document = _profile("profile", workflow_file, models_dir, inputs_dir, tmp_path, "--device", "auto")
    assert code == 0
    check_profile_json(document)
    if torch.cuda.is_available():  # auto takes the GPU there: the label must say so, not cpu
        assert document["device"].startswith("cuda:")
        return
    assert document["device"] == f"cpu ({torch.get_num_threads()} torch threads)"
    assert document["dtypes"] == dict.fromkeys(("unet", "vae", "text_encoder", "controlnet", "other"), "fp32")
    assert document["device_memory"] is None, "plain CPU fp32 runs the models as loaded, no wrapper"
    assert {node["memory"]["kind"] for node in document["nodes"]} == {"rss"}


def test_explicit_cpu_on_any_machine_is_labelled_cpu(
    workflow_file: Path, models_dir: Path, inputs_dir: Path, tmp_path: Path,
) -> None:
    code, document = _profile("profile", workflow_file, models_dir, inputs_dir, tmp_path, "--device", "cpu")
    assert code == 0
    assert document["device"].startswith("cpu (")
    assert {node["memory"]["kind"] for node in document["nodes"]} == {"rss"}, "a CPU run reads RSS, not CUDA"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["profile", "plan"])
def test_cuda_without_cuda_fails_with_one_clear_line(
    command: str, workflow_file: Path, models_dir: Path, inputs_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, document = _profile(command, workflow_file, models_dir, inputs_dir, tmp_path, "--device", "cuda")
    assert code != 0
    assert document == {}, "nothing was measured or written"
    err = capsys.readouterr().err
    assert "CUDA" in err and "available: cpu" in err
    assert "Traceback" not in err
