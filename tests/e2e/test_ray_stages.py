"""The stages of ``diffsplit batch --ray``, run in this process (Ray runs the same classes in its actors).

Each item's image must equal ``diffsplit run`` with the same overrides, bit for
bit, when the sampling stage takes one item per call; items sampled together in
lockstep differ from that by fp32 rounding only (the bound is asserted and
printed). A failing item is carried to the manifest, its batch still samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.remote.batching import BatchSettings
from diffsplit.transport.errors import MalformedMessage

from diffsplit.ray_stages import (
    FinishStage,
    PrepareStage,
    SampleStage,
    StageSettings,
    batch_rows,
    decode_values,
    encode_values,
    new_row,
    rows_batch,
)

from .conftest import CliRun, png_pixels, write_json

#: The most a latent sampled in a batch of 4 may differ from the same item sampled alone: fp32 rounding of
#: batched convolutions, measured 2.6e-4 on the tiny SD 1.5 (the worker's cross-client batching: same bound).
BATCHED_LATENT_BOUND = 1e-3


@pytest.fixture
def stages() -> Iterator[Callable[..., Any]]:
    """Makes stages and closes them after the test."""
    made: list[Any] = []

    def make(kind: type, settings: StageSettings) -> Any:
        made.append(kind(settings))
        return made[-1]

    yield make
    for stage in made:
        stage.close()


@pytest.fixture
def settings(models_dir: Path, tmp_path: Path) -> StageSettings:
    return StageSettings(workflow_source=sd15_workflow(steps=2, lora=True), sets=(), models=str(models_dir),
                         extra_model_paths=None, inputs=str(tmp_path / "input"), out=str(tmp_path / "out"),
                         sampling=("6",))


#: Each item's own LoRA strength: a recipe must follow the item's overrides, not the batch's workflow.
STRENGTHS = (0.3, 1.5, 0.8, 1.0)


def items(count: int, *, own_strengths: bool = True) -> list[dict[str, Any]]:
    """Rows of ``count`` items, each with its own prompt and seed (and LoRA strength unless not asked)."""
    return [new_row(f"item{n}", {"3.text": f"prompt {n}", "6.seed": 100 + n, "8.filename_prefix": f"item{n}",
                                 **({"2.strength_model": STRENGTHS[n]} if own_strengths else {})})
            for n in range(count)]


def sample_all(stage: SampleStage, rows: Sequence[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    done: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        done += batch_rows(stage(rows_batch(rows[start:start + batch_size])))
    return done


def latents(rows: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    return [decode_values(row["payload"])["6:0"]["samples"] for row in rows]


def test_items_alone_give_the_image_of_diffsplit_run_bit_for_bit(
    stages: Callable[..., Any], settings: StageSettings, run_cli: Callable[..., CliRun], models_dir: Path,
    tmp_path: Path,
) -> None:
    prepare, sample = stages(PrepareStage, settings), stages(SampleStage, settings)
    finish = stages(FinishStage, settings)
    rows = [finish(row) for row in sample_all(sample, [prepare(row) for row in items(2)], batch_size=1)]
    workflow = write_json(tmp_path / "wf.json", settings.workflow_source)
    for n, row in enumerate(rows):
        assert row["error"] == "", row["error"]
        (saved,) = json.loads(row["outputs"])
        assert Path(saved).name == f"item{n}_00001_.png"
        done = run_cli("run", workflow, "--models", models_dir, "--out", tmp_path / f"ref{n}", "-q",
                       "--set", f"3.text=prompt {n}", "--set", f"6.seed={100 + n}",
                       "--set", f"2.strength_model={STRENGTHS[n]}")
        assert done.exit_code == 0, done.stderr
        assert np.array_equal(png_pixels(Path(saved)), png_pixels(done.saved[0])), n
        assert set(json.loads(row["times"])) == {"prepare_s", "sample_s", "finish_s"}
        assert row["worker"].startswith("ray:")


def test_items_sampled_together_share_unet_passes_and_match_alone_to_rounding(
    stages: Callable[..., Any], settings: StageSettings,
) -> None:
    prepare = stages(PrepareStage, settings)
    prepared = [prepare(row) for row in items(4, own_strengths=False)]  # one model: the passes can be shared
    alone, together = stages(SampleStage, settings), stages(SampleStage, settings)
    one_by_one = latents(sample_all(alone, prepared, batch_size=1))
    batched = latents(sample_all(together, prepared, batch_size=4))
    report = together.membership.report(BatchSettings(max_size=4))
    assert report["batches"] == 1 and report["batched_requests"] == 4, report
    assert report["unet_passes"] < report["unet_calls_asked"]  # the four shared their passes
    worst = max(float((a - b).abs().max()) for a, b in zip(one_by_one, batched, strict=True))
    print(f"\nbatch of 4 vs alone: max |latent difference| = {worst:.3g}")
    assert worst <= BATCHED_LATENT_BOUND
    assert not all(torch.equal(one_by_one[0], other) for other in one_by_one[1:])  # seeds made a difference


def test_a_failing_item_is_carried_to_the_manifest_and_its_batch_still_samples(
    stages: Callable[..., Any], settings: StageSettings,
) -> None:
    prepare, sample = stages(PrepareStage, settings), stages(SampleStage, settings)
    finish = stages(FinishStage, settings)
    rows = items(3)
    rows[1] = new_row("bad", {"5.width": 8})  # a latent too small for the sampler's checks
    done = [finish(row) for row in sample_all(sample, [prepare(row) for row in rows], batch_size=3)]
    assert [bool(row["error"]) for row in done] == [False, True, False]
    assert done[1]["error"].startswith("preparing: ") and "width" in done[1]["error"]
    assert json.loads(done[1]["outputs"]) == [] and done[1]["payload"] == b""
    assert all(len(json.loads(row["outputs"])) == 1 for row in (done[0], done[2]))


def test_a_missing_model_on_the_sampling_side_fails_that_item_with_the_reason(
    stages: Callable[..., Any], settings: StageSettings, models_dir: Path, tmp_path: Path,
) -> None:
    prepared = stages(PrepareStage, settings)(items(1)[0])
    elsewhere = tmp_path / "other-models"
    (elsewhere / "checkpoints").mkdir(parents=True)  # the sampling machine lacks the checkpoint
    (elsewhere / "loras").mkdir()
    other = StageSettings(**{**settings.__dict__, "models": str(elsewhere)})
    (row,) = batch_rows(stages(SampleStage, other)(rows_batch([prepared])))
    assert row["error"].startswith("sampling: ") and "tiny-sd15" in row["error"]


@pytest.mark.parametrize("payload", [b"", b"\x93\x01\x02\x03", encode_values({"x": 1})[:-3],
                                     __import__("msgpack").packb(["DSPL", b"\x01", b""])])
def test_a_payload_that_is_not_an_envelope_is_refused_never_unpickled(payload: bytes) -> None:
    with pytest.raises((MalformedMessage, ValueError)):
        decode_values(payload)


def test_payload_round_trip_keeps_tensors_and_plain_values() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    values = decode_values(encode_values({"a": tensor, "b": {"n": 3, "s": "text"}}))
    assert torch.equal(values["a"], tensor) and values["b"] == {"n": 3, "s": "text"}
