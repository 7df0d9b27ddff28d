"""``diffsplit batch`` end to end: items from text/JSONL/CSV, images, manifest, resume, remote, failures.

Real CLI in-process, real executor and tiny models; the remote cases use a real
worker daemon on loopback. Each image is checked against ``diffsplit run``
with the same overrides (bit for bit), so an override that did not reach the
workflow, or the wrong item in the wrong file, fails the test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffsplit.engine.example_workflows import sd15_workflow

from diffsplit.demo import local_worker

from .conftest import CliRun, png_pixels, png_text, write_json


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    """SD 1.5 text-to-image without LoRA, 2 steps at 64x64."""
    return write_json(tmp_path / "wf.json", sd15_workflow(steps=2, lora=False))


@pytest.fixture(scope="module")
def strict_worker(models_dir: Path) -> Iterator[str]:
    """A worker that refuses nodes of more than 3 steps (a real refusal for one item only)."""
    with local_worker(models_dir, extra_args=["--max-steps", "3"]) as address:
        yield address


def batch(run_cli: Callable[..., CliRun], items: Path, workflow: Path, models: Path, out: Path,
          *extra: str | Path) -> CliRun:
    return run_cli("batch", items, "--workflow", workflow, "--models", models, "--out", out, "-q", *extra)


def manifest_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def run_one(run_cli: Callable[..., CliRun], workflow: Path, models: Path, out: Path,
            *sets: str) -> np.ndarray:
    """The image ``diffsplit run`` makes with ``sets`` (the reference for one item)."""
    done = run_cli("run", workflow, "--models", models, "--out", out, "-q",
                   *[arg for value in sets for arg in ("--set", value)])
    assert done.exit_code == 0, done.stderr
    (saved,) = done.saved
    return png_pixels(saved)


def test_text_lines_make_one_image_each_named_by_line(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items = tmp_path / "prompts.txt"
    items.write_text("a red cube\n\n  a blue sphere  \na green cone\n", encoding="utf-8")
    out = tmp_path / "images"
    done = batch(run_cli, items, workflow_file, models_dir, out)
    assert done.exit_code == 0, done.stderr
    lines = manifest_lines(out)
    assert [(line["item"], line["line"], line["prompt"], line["status"]) for line in lines] == [
        ("1", 1, "a red cube", "ok"), ("3", 3, "a blue sphere", "ok"), ("4", 4, "a green cone", "ok")]
    for line in lines:
        (output,) = line["outputs"]
        assert output == f"{line['item']}_00001_.png"
        embedded = json.loads(png_text(out / output)["prompt"])
        assert embedded["3"]["inputs"]["text"] == line["prompt"]  # the PNG carries the item's workflow
        expected = run_one(run_cli, workflow_file, models_dir, tmp_path / f"ref{line['item']}",
                           f"3.text={line['prompt']}")
        assert np.array_equal(png_pixels(out / output), expected), line["item"]
        assert line["seed"] == 7
    assert "1" in lines[0]["times"] and "1" not in lines[1]["times"], "the checkpoint loads once"


def test_jsonl_overrides_by_input_name_and_node_input_with_ids(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(item) for item in [
        {"id": "cat", "prompt": "a cat", "seed": 11, "cfg": 3.5},
        {"prompt": "a dog", "negative": "grainy", "6.steps": 3},
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "images"
    done = batch(run_cli, items, workflow_file, models_dir, out)
    assert done.exit_code == 0, done.stderr
    cat, dog = manifest_lines(out)
    assert (cat["item"], cat["seed"], dog["item"]) == ("cat", 11, "2")
    assert np.array_equal(png_pixels(out / cat["outputs"][0]), run_one(
        run_cli, workflow_file, models_dir, tmp_path / "r1", "3.text=a cat", "6.seed=11", "6.cfg=3.5"))
    assert np.array_equal(png_pixels(out / dog["outputs"][0]), run_one(
        run_cli, workflow_file, models_dir, tmp_path / "r2", "3.text=a dog", "4.text=grainy", "6.steps=3"))


def test_csv_cells_are_json_where_they_parse(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items = tmp_path / "items.csv"
    items.write_text('prompt,seed,sampler_name\n"a cube, lit",5,euler_ancestral\n"1234",,\n',
                     encoding="utf-8")
    out = tmp_path / "images"
    done = batch(run_cli, items, workflow_file, models_dir, out)
    assert done.exit_code == 0, done.stderr
    first, second = manifest_lines(out)
    assert (first["prompt"], first["seed"], second["prompt"], second["seed"]) == ("a cube, lit", 5, "1234", 7)
    assert np.array_equal(png_pixels(out / first["outputs"][0]), run_one(
        run_cli, workflow_file, models_dir, tmp_path / "r", "3.text=a cube, lit", "6.seed=5",
        "6.sampler_name=euler_ancestral"))


def test_a_second_run_resumes_redoing_only_what_is_missing_or_changed(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items, out = tmp_path / "prompts.txt", tmp_path / "images"
    items.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert batch(run_cli, items, workflow_file, models_dir, out).exit_code == 0
    (out / "2_00001_.png").unlink()  # a lost image
    items.write_text("one\ntwo\nTHREE\n", encoding="utf-8")  # a changed prompt
    again = batch(run_cli, items, workflow_file, models_dir, out)
    assert again.exit_code == 0, again.stderr
    lines = manifest_lines(out)
    assert [line["item"] for line in lines] == ["1", "2", "3", "2", "3"]
    assert lines[-1]["prompt"] == "THREE" and lines[-1]["outputs"] == ["3_00002_.png"]
    assert batch(run_cli, items, workflow_file, models_dir, out).exit_code == 0
    assert len(manifest_lines(out)) == 5, "nothing left to do"
    assert batch(run_cli, items, workflow_file, models_dir, out, "--restart").exit_code == 0
    assert len(manifest_lines(out)) == 8


def test_a_manifest_line_cut_by_an_interruption_redoes_that_item(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items, out = tmp_path / "prompts.txt", tmp_path / "images"
    items.write_text("one\ntwo\n", encoding="utf-8")
    assert batch(run_cli, items, workflow_file, models_dir, out).exit_code == 0
    text = (out / "manifest.jsonl").read_text()
    (out / "manifest.jsonl").write_text(text[: len(text) - 20])  # the last line half written
    again = batch(run_cli, items, workflow_file, models_dir, out)
    assert again.exit_code == 0, again.stderr
    assert [line["item"] for line in manifest_lines(out)] == ["1", "2"]  # the cut line is gone


def test_bad_items_are_all_reported_by_line_before_anything_runs(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items, out = tmp_path / "items.jsonl", tmp_path / "images"
    items.write_text("\n".join(json.dumps(item) for item in [
        {"prompt": "fine"},
        {"prompt": "x", "bogus": 1},
        {"prompt": "y", "id": "../escape"},
        {"prompt": "z", "9.steps": 2},
        {"prompt": "w", "id": "fine-1"},
        {"prompt": "v", "id": "fine-1"},
        {"prompt": 3},
    ]) + "\n", encoding="utf-8")
    done = batch(run_cli, items, workflow_file, models_dir, out)
    assert done.exit_code == 1
    for expected in ("5 item(s) do not fit", "line 2: no node of the workflow has an input 'bogus'",
                     "line 3: id '../escape' must be", "line 4: '9.steps': no node '9'",
                     "line 6: id 'fine-1' is already used on line 5", "line 7: 'prompt' must be text"):
        assert expected in done.stderr, (expected, done.stderr)
    listed = [line.split(":")[0].strip() for line in done.stderr.splitlines()[1:]]
    assert listed == ["line 2", "line 3", "line 4", "line 6", "line 7"], "by line, each once"
    assert not out.exists(), "nothing ran"
    items.write_text(json.dumps({"prompt": "a", "sampler_name": "nope"}) + "\n" + json.dumps({"width": 8}))
    done = batch(run_cli, items, workflow_file, models_dir, out)
    assert done.exit_code == 1 and "2 item(s) would not run" in done.stderr
    assert "line 1 (item 1): node 6 (KSampler) input 'sampler_name'" in done.stderr
    assert "line 2 (item 2): node 5 (EmptyLatentImage) input 'width'" in done.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": \n')
    done = batch(run_cli, broken, workflow_file, models_dir, out)
    assert done.exit_code == 1 and "broken.jsonl line 2: not JSON" in done.stderr


def test_remote_sampler_items_in_flight_equal_the_local_batch(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path, worker_address: str,
) -> None:
    items = tmp_path / "prompts.txt"
    items.write_text("".join(f"prompt number {n}\n" for n in range(5)), encoding="utf-8")
    local, split = tmp_path / "local", tmp_path / "split"
    assert batch(run_cli, items, workflow_file, models_dir, local).exit_code == 0
    done = batch(run_cli, items, workflow_file, models_dir, split, "--remote", f"KSampler={worker_address}",
                 "--ahead", "3")
    assert done.exit_code == 0, done.stderr
    lines = manifest_lines(split)
    assert sorted(line["item"] for line in lines) == ["1", "2", "3", "4", "5"]
    for line in lines:
        assert line["workers"] == {"6": worker_address}
        (output,) = line["outputs"]
        assert np.array_equal(png_pixels(split / output), png_pixels(local / output)), output


def test_each_items_lora_strength_reaches_the_remote_sampler(
    run_cli, models_dir: Path, tmp_path: Path, worker_address: str,
) -> None:
    """The model's recipe follows the item's own overrides, not the batch's workflow (a LoRA strength
    set per item once built every item's model at the workflow's strength: silently other images)."""
    workflow = write_json(tmp_path / "lora.json", sd15_workflow(steps=2, lora=True))
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"s{n}", "prompt": "a fox", "strength_model": strength}) + "\n"
                             for n, strength in enumerate((0.3, 1.5))), encoding="utf-8")
    out = tmp_path / "images"
    done = batch(run_cli, items, workflow, models_dir, out, "--remote", f"6={worker_address}", "--ahead", "2")
    assert done.exit_code == 0, done.stderr
    for n, strength in enumerate((0.3, 1.5)):
        expected = run_one(run_cli, workflow, models_dir, tmp_path / f"ref{n}", "3.text=a fox",
                           f"2.strength_model={strength}")
        assert np.array_equal(png_pixels(out / f"s{n}_00001_.png"), expected), strength


def test_an_item_a_worker_refuses_is_recorded_and_the_batch_goes_on(
    run_cli, workflow_file: Path, models_dir: Path, tmp_path: Path, strict_worker: str,
) -> None:
    items, out = tmp_path / "items.jsonl", tmp_path / "images"
    items.write_text("\n".join(json.dumps(item) for item in [
        {"prompt": "short"}, {"prompt": "long", "steps": 5}, {"prompt": "short again"},
    ]) + "\n", encoding="utf-8")
    done = batch(run_cli, items, workflow_file, models_dir, out, "--remote", f"KSampler={strict_worker}")
    assert done.exit_code == 1
    by_item = {line["item"]: line for line in manifest_lines(out)}
    assert {key: line["status"] for key, line in by_item.items()} == {"1": "ok", "2": "failed", "3": "ok"}
    assert "node 6 (KSampler)" in by_item["2"]["error"] and "steps" in by_item["2"]["error"]
    assert "item 2 (line 2) failed" in done.stderr and "2 done, 0 already done, 1 failed" in done.stderr
    items.write_text("\n".join(json.dumps(item) for item in [
        {"prompt": "short"}, {"prompt": "long", "steps": 3}, {"prompt": "short again"},
    ]) + "\n", encoding="utf-8")
    fixed = batch(run_cli, items, workflow_file, models_dir, out, "--remote", f"KSampler={strict_worker}")
    assert fixed.exit_code == 0, fixed.stderr
    assert [line["item"] for line in manifest_lines(out)][3:] == ["2"], "only the failed item is redone"
