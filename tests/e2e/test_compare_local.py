"""``diffsplit run --compare-local``: the fidelity contract, measured by the CLI itself.

Same device kind and dtypes on both sides: the split run equals the local reference bit for
bit (max diff 0.0, PSNR inf). A worker in bf16 beside a CPU fp32 client: the image differs,
and the printed and ``--stats`` numbers are the ones an independent local run gives.
Also psnr() and max_abs_diff() on arrays whose answers are known in closed form.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from diffsplit.engine.example_workflows import sd15_workflow

from diffsplit.compare_local import compare_arrays, max_abs_diff, psnr
from diffsplit.demo import local_worker

from .conftest import png_pixels, write_json

#: sd15_workflow's sampler (sent to the worker) and decoder (run here, its IMAGE compared).
SAMPLER, DECODER = "6", "7"
CPU_FP32 = ("--device", "cpu", "--dtype", "fp32")


# -- psnr() and max_abs_diff() on known arrays --------------------------------------------------------


def test_psnr_of_identical_arrays_is_infinite() -> None:
    values = np.linspace(0.0, 1.0, 12).reshape(3, 4)
    assert psnr(values, values.copy()) == math.inf
    assert max_abs_diff(values, values.copy()) == 0.0


@pytest.mark.parametrize(
    ("a", "b", "data_range", "expected_db"),
    [
        (np.zeros(8), np.full(8, 0.1), 1.0, 20.0),  # MSE 0.01
        (np.zeros(4), np.array([1.0, 0.0, 0.0, 0.0]), 1.0, 10 * math.log10(4)),  # MSE 0.25
        (np.zeros((2, 2)), np.full((2, 2), 1.0), 1.0, 0.0),  # MSE 1: the whole range
        (np.zeros(5, dtype=np.uint8), np.full(5, 25.5), 255.0, 20.0),  # 8-bit levels
        (np.full(3, 0.5, dtype=np.float32), np.array([0.5, 0.5, 0.5 + 1e-3]), 1.0,
         10 * math.log10(3 / 1e-6)),
    ],
)
def test_psnr_matches_the_closed_form(a: np.ndarray, b: np.ndarray, data_range: float,
                                      expected_db: float) -> None:
    assert psnr(a, b, data_range) == pytest.approx(expected_db, abs=1e-6)
    assert psnr(b, a, data_range) == pytest.approx(expected_db, abs=1e-6)  # symmetric


def test_max_abs_diff_is_the_largest_either_way() -> None:
    a = np.array([[0.0, 0.5], [1.0, 0.25]])
    b = np.array([[0.1, 0.5], [0.7, 0.25]])
    assert max_abs_diff(a, b) == pytest.approx(0.3)
    assert max_abs_diff(b, a) == pytest.approx(0.3)


def test_nan_makes_psnr_undefined_and_json_stays_valid() -> None:
    a, b = np.zeros(3), np.array([0.0, math.nan, 0.0])
    assert math.isnan(psnr(a, b)) and math.isnan(max_abs_diff(a, b))
    compared = compare_arrays("output", "node 1 (X)", b, a, node_id="1")
    assert not compared.identical
    document = json.dumps(compared.to_json(), allow_nan=False)  # strict JSON: no NaN/Infinity
    assert json.loads(document)["psnr_db"] is None and json.loads(document)["max_diff"] is None


def test_identical_reports_the_string_inf_in_json_and_the_line() -> None:
    values = np.full((1, 2, 2, 3), 0.25)
    compared = compare_arrays("output", "node 7 (VAEDecode)", values, values.copy(), node_id="7")
    assert compared.identical and compared.psnr_db == math.inf
    assert json.loads(json.dumps(compared.to_json(), allow_nan=False))["psnr_db"] == "inf"
    assert compared.line() == "compare-local: node 7 (VAEDecode) max diff 0.0, PSNR inf (identical)"


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros(3), np.zeros(4))


# -- the CLI, with real workers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_worker(models_dir: Path) -> Iterator[str]:
    """A worker on the CPU in fp32: what the client's local nodes use too."""
    with local_worker(models_dir, extra_args=CPU_FP32) as address:
        yield address


@pytest.fixture(scope="module")
def bf16_worker(models_dir: Path) -> Iterator[str]:
    """A worker on the CPU whose models compute in bf16."""
    with local_worker(models_dir, extra_args=["--device", "cpu", "--dtype", "bf16"]) as address:
        yield address


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "sd15.json", sd15_workflow(steps=2))


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder ``tempfile`` uses in this test, to see the reference run's folder go away."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _compare_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("compare-local:") and "max diff" in line]


def _split_args(workflow: Path, models: Path, out: Path, address: str, stats: Path) -> list[str | Path]:
    return ["run", workflow, "--models", models, "--out", out, *CPU_FP32, "-q",
            "--remote", f"KSampler={address}", "--compare-local", "--stats", stats]


def test_same_device_and_dtype_compare_identical(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path, fp32_worker: str, private_tmp: Path
) -> None:
    out, stats_path = tmp_path / "out", tmp_path / "stats.json"
    result = run_cli(*_split_args(workflow_file, models_dir, out, fp32_worker, stats_path))
    assert result.exit_code == 0, result.stderr
    assert _compare_lines(result.stderr) == [
        f"compare-local: node {DECODER} (VAEDecode) max diff 0.0, PSNR inf (identical)",
        "compare-local: saved sd15_00001_.png max diff 0.0, PSNR inf (identical)",
    ]  # printed although -q: it is the report asked for
    stats = json.loads(stats_path.read_text())
    assert stats["nodes"][SAMPLER]["where"] == "remote"
    section = stats["compare_local"]
    assert section["identical"] is True and section["reference_s"] > 0
    found = [(row["kind"], row["node_id"], row["max_diff"], row["psnr_db"]) for row in section["outputs"]]
    assert found == [("output", DECODER, 0.0, "inf"), ("saved", None, 0.0, "inf")]
    # the reference run wrote nothing the user asked for, and its temporary folder is gone
    assert sorted(path.name for path in out.rglob("*") if path.is_file()) == ["sd15_00001_.png"]
    assert result.saved == (out / "sd15_00001_.png",)
    assert list(private_tmp.iterdir()) == []


def test_a_bf16_worker_differs_by_what_an_independent_local_run_says(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path, bf16_worker: str
) -> None:
    stats_path = tmp_path / "stats.json"
    split = run_cli(*_split_args(workflow_file, models_dir, tmp_path / "split", bf16_worker, stats_path))
    assert split.exit_code == 0, split.stderr
    local = run_cli("run", workflow_file, "--models", models_dir, "--out", tmp_path / "local", *CPU_FP32,
                    "-q")
    assert local.exit_code == 0, local.stderr
    split_png = png_pixels(split.saved[0]).astype(np.float64) / 255
    local_png = png_pixels(local.saved[0]).astype(np.float64) / 255
    expected_max = float(np.abs(split_png - local_png).max())
    expected_psnr = 10 * math.log10(1 / float(np.mean((split_png - local_png) ** 2)))
    assert expected_max > 0  # the bf16 sampler really gives another image

    outputs = json.loads(stats_path.read_text())["compare_local"]["outputs"]
    decoded, saved = outputs
    assert decoded["node_id"] == DECODER and decoded["class_type"] == "VAEDecode"
    assert saved["kind"] == "saved" and saved["output"] == str(split.saved[0])
    for item in outputs:
        assert item["identical"] is False and item["max_diff"] > 0
        assert isinstance(item["psnr_db"], float) and math.isfinite(item["psnr_db"]) and item["psnr_db"] > 0
    assert saved["max_diff"] == pytest.approx(expected_max, abs=1e-12)
    assert saved["psnr_db"] == pytest.approx(expected_psnr, abs=1e-9)
    # the decoded tensor is compared before 8-bit rounding: within half a level of the saved one
    assert abs(decoded["max_diff"] - saved["max_diff"]) <= 1 / 255 + 1e-9

    lines = _compare_lines(split.stderr)
    assert len(lines) == 2
    for line, item in zip(lines, outputs, strict=True):
        shown = re.fullmatch(r"compare-local: (.+) max diff (\S+), PSNR (\S+) dB \(differs\)", line)
        assert shown is not None, line
        assert shown[1] == item["label"]
        assert float(shown[2]) == pytest.approx(item["max_diff"], rel=5e-3)
        assert float(shown[3]) == pytest.approx(item["psnr_db"], abs=5e-3)


def test_compare_local_without_remote_is_refused_before_running(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli("run", workflow_file, "--models", models_dir, "--out", out, "--compare-local")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffsplit run: error:"), result.stderr
    assert "--compare-local" in lines[0] and "--remote" in lines[0]
    assert not out.exists()

