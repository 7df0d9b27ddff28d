"""One part of a checkpoint alone, and its fingerprint read from the file without building it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import (
    CHECKPOINT_PARTS,
    check_checkpoint,
    checkpoint_part_fingerprint,
    load_checkpoint,
    load_checkpoint_part,
    save_checkpoint,
)
from diffsplit.engine.models.tiny import tiny_checkpoint_parts
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.objects import named_tensors

FAMILIES = ("sd15", "sdxl", "sdxl_refiner")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per family in fp32, and the SD 1.5 one stored in fp16."""
    folder = tmp_path_factory.mktemp("parts")
    paths = {}
    for family in FAMILIES:
        paths[family] = folder / f"{family}.safetensors"
        save_checkpoint(paths[family], tiny_checkpoint_parts(family, seed=3))
    half = tiny_checkpoint_parts("sd15", seed=4)
    for module in (half.model.unet, half.vae.model, *half.clip.encoders):
        module.to(torch.float16)
    paths["sd15_fp16"] = folder / "sd15-fp16.safetensors"
    save_checkpoint(paths["sd15_fp16"], half)
    return paths


@pytest.mark.parametrize("name", [*FAMILIES, "sd15_fp16"])
@pytest.mark.parametrize("part", CHECKPOINT_PARTS)
def test_a_part_loaded_alone_equals_that_part_of_the_whole_load(
    checkpoints: dict[str, Path], name: str, part: str
) -> None:
    whole = getattr(load_checkpoint(checkpoints[name]), part)
    alone = load_checkpoint_part(checkpoints[name], part)  # type: ignore[arg-type]
    assert type(alone) is type(whole)
    expected = dict(named_tensors(whole))
    got = dict(named_tensors(alone))
    assert sorted(got) == sorted(expected)
    for path, tensor in expected.items():
        assert got[path].dtype == tensor.dtype, path
        assert torch.equal(got[path], tensor), path
    assert fingerprint(alone) == fingerprint(whole)


@pytest.mark.parametrize("name", [*FAMILIES, "sd15_fp16"])
@pytest.mark.parametrize("part", CHECKPOINT_PARTS)
def test_the_fingerprint_read_from_the_file_equals_the_built_parts(
    checkpoints: dict[str, Path], name: str, part: str
) -> None:
    built = load_checkpoint_part(checkpoints[name], part)  # type: ignore[arg-type]
    assert checkpoint_part_fingerprint(checkpoints[name], part) == fingerprint(built)  # type: ignore[arg-type]


def test_the_file_fingerprint_follows_the_dtype_and_tells_files_apart(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["sd15_fp16"]
    in_half = load_checkpoint_part(path, "model", dtype=torch.float16)
    assert checkpoint_part_fingerprint(path, "model", dtype=torch.float16) == fingerprint(in_half)
    assert checkpoint_part_fingerprint(path, "model", dtype=torch.float16) != checkpoint_part_fingerprint(
        path, "model"
    )
    assert checkpoint_part_fingerprint(checkpoints["sd15"], "model") != checkpoint_part_fingerprint(
        path, "model"
    )


def test_an_unknown_part_is_refused_by_name(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown checkpoint part 'unet'"):
        load_checkpoint_part(checkpoints["sd15"], "unet")  # type: ignore[arg-type]


def test_the_header_check_names_missing_weights_without_reading_any(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    assert check_checkpoint(checkpoints["sdxl"]) == "sdxl"
    tensors = load_file(str(checkpoints["sd15"]))
    dropped = next(key for key in sorted(tensors) if key.startswith("first_stage_model.decoder."))
    del tensors[dropped]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    with pytest.raises(ModelFileError, match="missing 1 required weight"):
        check_checkpoint(broken)
    with pytest.raises(ModelFileError, match="missing 1 required weight"):
        checkpoint_part_fingerprint(broken, "vae")
    # the parts that are whole still load and fingerprint
    assert checkpoint_part_fingerprint(broken, "model") == fingerprint(load_checkpoint_part(broken, "model"))
