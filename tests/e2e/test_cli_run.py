"""``diffsplit run`` and ``diffsplit models`` end to end: real files, real models, real exit codes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import sd15_workflow, two_branch_workflow

from .conftest import png_pixels, png_text, write_json

TINY_FILES = (
    "checkpoints/tiny-sd15.safetensors",
    "checkpoints/tiny-sdxl.safetensors",
    "checkpoints/tiny-sdxl-refiner.safetensors",
    "loras/tiny-sd15-lora.safetensors",
    "loras/tiny-sdxl-lora.safetensors",
    "vae/tiny-vae.safetensors",
    "controlnet/tiny-sd15-controlnet.safetensors",
    "diffusers/tiny-sd15",
    "diffusers/tiny-sdxl",
)


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    """SD 1.5 + LoRA text-to-image, 2 steps at 64x64, in the API format."""
    return write_json(tmp_path / "sd15.json", sd15_workflow(steps=2))


def run_args(workflow: Path, models: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["run", workflow, "--models", models, "--out", out, *extra]


def assert_one_line_error(stderr: str, *names: str, command: str = "run") -> None:
    """A failed command printed exactly one line, naming every one of ``names``, and no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"diffsplit {command}: error:"), stderr
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"


def test_run_writes_a_png_with_the_workflow_in_its_text_chunk(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli(*run_args(workflow_file, models_dir, out))
    assert result.exit_code == 0, result.stderr
    assert len(result.saved) == 1
    saved = result.saved[0]
    assert saved.parent == out and saved.name == "sd15_00001_.png"
    assert png_pixels(saved).shape == (64, 64, 3)
    assert json.loads(png_text(saved)["prompt"]) == json.loads(workflow_file.read_text())
    # progress: one line per node, a bar for the sampler, a summary
    for node_id, class_type in (("1", "CheckpointLoaderSimple"), ("6", "KSampler"), ("8", "SaveImage")):
        assert any(line.split()[:3] == ["node", node_id, class_type] for line in result.stderr.splitlines())
    assert "[########################] 2/2" in result.stderr
    assert "done in" in result.stderr


def test_a_second_run_numbers_the_next_file(run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    first = run_cli(*run_args(workflow_file, models_dir, out, "-q"))
    second = run_cli(*run_args(workflow_file, models_dir, out, "-q"))
    assert [p.name for p in first.saved + second.saved] == ["sd15_00001_.png", "sd15_00002_.png"]
    assert (png_pixels(first.saved[0]) == png_pixels(second.saved[0])).all()
    assert first.stderr == ""  # -q: no progress


def test_set_overrides_change_the_run(run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        *run_args(
            workflow_file, models_dir, tmp_path / "out", "-q", "--set", "6.steps=1", "--set", "5.width=128"
        )
    )
    assert result.exit_code == 0, result.stderr
    assert png_pixels(result.saved[0]).shape == (64, 128, 3)
    prompt = json.loads(png_text(result.saved[0])["prompt"])
    assert prompt["6"]["inputs"]["steps"] == 1 and prompt["5"]["inputs"]["width"] == 128
    assert json.loads(workflow_file.read_text())["5"]["inputs"]["width"] == 64  # the file is untouched


def test_set_by_class_name_and_string_value(run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path):
    result = run_cli(
        *run_args(
            workflow_file,
            models_dir,
            tmp_path / "out",
            "-q",
            "--set",
            "KSampler.sampler_name=heun",
            "--set",
            "EmptyLatentImage.height=128",
        )
    )
    assert result.exit_code == 0, result.stderr
    prompt = json.loads(png_text(result.saved[0])["prompt"])
    assert prompt["6"]["inputs"]["sampler_name"] == "heun"
    assert png_pixels(result.saved[0]).shape == (128, 64, 3)


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("99.steps=2", ["'99'"]),
        ("6.stepz=2", ["node 6", "KSampler", "stepz"]),
        ("6steps=2", ["6steps=2", "NODE.INPUT=VALUE"]),
        ("6.steps", ["6.steps", "NODE.INPUT=VALUE"]),
        ("6.steps=many", ["node 6", "KSampler", "steps", "many"]),
        ("6.steps=0", ["node 6", "KSampler", "steps", "minimum"]),
        ("CLIPTextEncode.text=x", ["CLIPTextEncode", "3, 4"]),  # two nodes of that class
    ],
)
def test_bad_set_fails_with_one_line(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path, option: str, named: list[str]
) -> None:
    out = tmp_path / "out"
    result = run_cli(*run_args(workflow_file, models_dir, out, "-q", "--set", option))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, *named)
    assert not out.exists()  # nothing ran


def test_missing_model_lists_the_available_names(run_cli, models_dir: Path, tmp_path: Path) -> None:
    document = sd15_workflow(steps=1)
    document["1"]["inputs"]["ckpt_name"] = "sd_xl_base_1.0.safetensors"
    result = run_cli(*run_args(write_json(tmp_path / "w.json", document), models_dir, tmp_path / "out"))
    assert result.exit_code == 1
    assert_one_line_error(
        result.stderr,
        "node 1",
        "CheckpointLoaderSimple",
        "ckpt_name",
        "sd_xl_base_1.0.safetensors",
        "tiny-sd15.safetensors",
        "tiny-sdxl.safetensors",
        "tiny-sdxl-refiner.safetensors",
    )


def test_unknown_node_class_is_named(run_cli, models_dir: Path, tmp_path: Path) -> None:
    document = sd15_workflow(steps=1)
    document["6"]["class_type"] = "KSamplerFancy"
    result = run_cli(*run_args(write_json(tmp_path / "w.json", document), models_dir, tmp_path / "out"))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "node 6", "'KSamplerFancy'", "KSampler")


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("{not json", ["not valid JSON"]),
        ("", ["not valid JSON"]),
        ("[1, 2]", ["not a ComfyUI workflow"]),
        ('{"nodes": 3}', ["not a ComfyUI workflow"]),
        ("{}", ["not a ComfyUI workflow"]),
    ],
)
def test_a_file_that_is_not_a_workflow_fails_clearly(
    run_cli, models_dir: Path, tmp_path: Path, content: str, named: list[str]
) -> None:
    path = tmp_path / "broken.json"
    path.write_text(content)
    result = run_cli(*run_args(path, models_dir, tmp_path / "out"))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, *named)


def test_a_missing_workflow_file_or_a_folder_fails_clearly(run_cli, models_dir: Path, tmp_path: Path) -> None:
    missing = run_cli(*run_args(tmp_path / "nowhere.json", models_dir, tmp_path / "out"))
    assert missing.exit_code == 1
    assert_one_line_error(missing.stderr, "nowhere.json", "No such file")
    folder = run_cli(*run_args(tmp_path, models_dir, tmp_path / "out"))
    assert folder.exit_code == 1
    assert_one_line_error(folder.stderr, str(tmp_path))


def test_a_missing_models_folder_fails_clearly(run_cli, workflow_file: Path, tmp_path: Path) -> None:
    result = run_cli(*run_args(workflow_file, tmp_path / "no-models", tmp_path / "out"))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "no-models")


def test_a_missing_input_image_fails_naming_the_node(run_cli, models_dir: Path, tmp_path: Path) -> None:
    document = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "absent.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "present.png").write_bytes(b"")
    workflow = write_json(tmp_path / "w.json", document)
    result = run_cli(*run_args(workflow, models_dir, tmp_path / "out", "--inputs", inputs))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "node 1", "LoadImage", "absent.png", "present.png")


def test_stats_file_has_per_node_timings(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path
) -> None:
    stats_path = tmp_path / "stats.json"
    result = run_cli(*run_args(workflow_file, models_dir, tmp_path / "out", "-q", "--stats", stats_path))
    assert result.exit_code == 0, result.stderr
    stats = json.loads(stats_path.read_text())
    document = json.loads(workflow_file.read_text())
    assert set(stats["nodes"]) == set(document)
    for node_id, entry in stats["nodes"].items():
        assert entry["class_type"] == document[node_id]["class_type"]
        assert entry["wall_s"] >= 0 and entry["cache_hit"] is False and entry["where"] == "local"
    assert stats["total_s"] >= max(entry["wall_s"] for entry in stats["nodes"].values())
    assert stats["nodes"]["6"]["wall_s"] > 0


def test_an_unwritable_stats_file_fails_with_one_line(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path
) -> None:
    stats_path = tmp_path / "no-such-folder" / "stats.json"
    result = run_cli(*run_args(workflow_file, models_dir, tmp_path / "out", "-q", "--stats", stats_path))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, str(stats_path), "No such file or directory")
    assert len(result.saved) == 1  # the images were written before the stats


def test_png_from_a_run_is_itself_a_workflow(run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path):
    """ComfyUI lets you drop a saved PNG back in; so does ``diffsplit run``."""
    first = run_cli(*run_args(workflow_file, models_dir, tmp_path / "a", "-q"))
    again = run_cli(*run_args(first.saved[0], models_dir, tmp_path / "b", "-q"))
    assert again.exit_code == 0, again.stderr
    assert (png_pixels(first.saved[0]) == png_pixels(again.saved[0])).all()


def test_console_script_runs_a_workflow(workflow_file: Path, models_dir: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("diffsplit")
    assert script.exists(), "the package's console script is not installed in this environment"
    completed = subprocess.run(
        [script, "run", workflow_file, "--models", models_dir, "--out", tmp_path / "out", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert Path(completed.stdout.strip()).is_file()
    failed = subprocess.run(
        [script, "run", tmp_path / "absent.json", "--models", models_dir],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert failed.returncode == 1
    assert_one_line_error(failed.stderr, "absent.json")


def test_models_tiny_writes_the_same_set_as_the_fixture(run_cli, models_dir: Path, tmp_path: Path) -> None:
    written = tmp_path / "models"
    result = run_cli("models", "tiny", written)
    assert result.exit_code == 0, result.stderr
    for name in TINY_FILES:
        assert name in result.stdout
        assert (written / name).exists()
    for name in TINY_FILES[:7]:  # seeded: byte for byte the set the tests use
        assert (written / name).read_bytes() == (models_dir / name).read_bytes(), name


def test_models_tiny_into_an_unusable_folder_fails_with_one_line(run_cli, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("models", "tiny", blocker / "models")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, str(blocker), command="models")


def test_models_index_lists_sha256_of_every_model(run_cli, models_dir: Path) -> None:
    result = run_cli("models", "index", models_dir)
    assert result.exit_code == 0, result.stderr
    listed = {}
    for line in result.stdout.splitlines():
        sha256, size, name = line.split()
        listed[name] = (sha256, int(size.replace(",", "")))
    assert set(TINY_FILES) <= set(listed)
    lora = models_dir / "loras" / "tiny-sd15-lora.safetensors"
    assert listed["loras/tiny-sd15-lora.safetensors"] == (
        hashlib.sha256(lora.read_bytes()).hexdigest(),
        lora.stat().st_size,
    )
    assert len({sha for sha, _ in listed.values()}) == len(listed)
    assert run_cli("models", "index", models_dir).stdout == result.stdout  # cached index, same answer


def test_parallel_branches_give_the_same_images_as_one_at_a_time(
    run_cli, models_dir: Path, tmp_path: Path
) -> None:
    """Two samplers that draw noise every step run on two threads: no shared random state."""
    workflow = write_json(tmp_path / "two.json", two_branch_workflow())
    settings = ["6.steps=2", "16.steps=2", "6.sampler_name=euler_ancestral", "16.sampler_name=dpmpp_sde"]
    options = [part for setting in settings for part in ("--set", setting)]
    images = {}
    for workers in ("1", "2"):
        out = tmp_path / workers
        result = run_cli(*run_args(workflow, models_dir, out, "-q", "--workers", workers, *options))
        assert result.exit_code == 0, result.stderr
        images[workers] = [png_pixels(path) for path in sorted(result.saved)]
    assert len(images["2"]) == 2
    for one_at_a_time, parallel in zip(images["1"], images["2"], strict=True):
        assert (one_at_a_time == parallel).all()
    assert (images["2"][0] != images["2"][1]).any()  # seeds 1 and 2
