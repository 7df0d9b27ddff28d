"""GLIGEN files in ComfyUI's layout: the tiny file, its loader, and files it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.models.gligen import GligenModel, gligen_tensors, load_gligen, transformer_blocks
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.engine.models.tiny_gligen import TINY_GLIGEN_FILE, write_tiny_gligen
from diffsplit.tracer.owned_memory import ALIGNMENT
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def gligen_file(models_dir: Path) -> Path:
    return models_dir / "gligen" / TINY_GLIGEN_FILE


def test_the_tiny_file_has_comfyui_keys_for_every_transformer_block_of_tiny_sd15(
    gligen_file: Path, models_dir: Path
) -> None:
    keys = set(load_file(gligen_file))
    unet = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").model.unet
    blocks = list(transformer_blocks(unet))
    assert blocks[0] == "input_blocks.1.1.transformer_blocks.0"
    assert "middle_block.1.transformer_blocks.0" in blocks
    for block in blocks:
        for param in ("alpha_attn", "alpha_dense", "linear.weight", "attn.to_q.weight", "attn.to_out.0.bias",
                      "ff.net.0.proj.weight", "ff.net.2.weight", "norm1.weight", "norm2.bias"):
            assert f"{block}.fuser.{param}" in keys
    assert {"position_net.null_positive_feature", "position_net.null_position_feature",
            "position_net.linears.0.weight", "position_net.linears.4.bias"} <= keys


def test_loader_reads_sizes_and_block_names_with_owned_weights(gligen_file: Path) -> None:
    model = load_gligen(gligen_file)
    assert isinstance(model, GligenModel)
    assert model.source == TINY_GLIGEN_FILE
    assert len(model.fusers) == len(model.block_names) == 11
    assert model.block_names[4] == "middle_block.1.transformer_blocks.0"
    assert model.position_net.in_dim == 64 and model.position_net.out_dim == 64
    assert model.fuser_for("input_blocks.1.1.transformer_blocks.0").query_dim == 32  # type: ignore[union-attr]
    assert model.fuser_for("input_blocks.9.1.transformer_blocks.0") is None
    tensors = list(model.state_dict().values())
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in tensors)
    assert not [t for t in tensors if t.numel() and t.data_ptr() % ALIGNMENT]
    assert str(gligen_file) not in Path("/proc/self/maps").read_text()  # the file is not kept mapped
    # saved back, the same bytes come out as went in
    assert all(torch.equal(a, b) for a, b in zip(
        (gligen_tensors(model)[k] for k in sorted(gligen_tensors(model))),
        (load_file(gligen_file)[k] for k in sorted(load_file(gligen_file))), strict=True))


def test_the_tiny_file_is_byte_identical_per_seed(tmp_path: Path, gligen_file: Path) -> None:
    again = write_tiny_gligen(tmp_path / "a" / TINY_GLIGEN_FILE, seed=0)
    other = write_tiny_gligen(tmp_path / "b" / TINY_GLIGEN_FILE, seed=1)
    assert again.read_bytes() == gligen_file.read_bytes()
    assert other.read_bytes() != gligen_file.read_bytes()


def test_a_file_that_is_not_gligen_is_refused_naming_it(models_dir: Path) -> None:
    vae = models_dir / "vae" / "tiny-vae.safetensors"
    with pytest.raises(ModelFileError, match=r"tiny-vae\.safetensors: not a GLIGEN file"):
        load_gligen(vae)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_gligen(models_dir / "gligen" / "missing.safetensors")


def _rewritten(gligen_file: Path, target: Path, change: dict[str, torch.Tensor | None]) -> Path:
    tensors = load_file(gligen_file)
    for key, value in change.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file_sorted(tensors, target)
    return target


def test_files_whose_parts_do_not_fit_together_are_refused_naming_the_key(
    gligen_file: Path, tmp_path: Path
) -> None:
    block = "input_blocks.1.1.transformer_blocks.0.fuser"
    narrow = _rewritten(gligen_file, tmp_path / "narrow.safetensors",
                        {f"{block}.linear.weight": torch.zeros(32, 48)})
    with pytest.raises(ModelFileError, match=r"linear\.weight' takes 48-wide object tokens.*makes 64-wide"):
        load_gligen(narrow)
    lacking = _rewritten(gligen_file, tmp_path / "lacking.safetensors", {f"{block}.attn.to_k.weight": None})
    with pytest.raises(ModelFileError, match=r"fuser of input_blocks\.1\.1\.transformer_blocks\.0 lacks"):
        load_gligen(lacking)
    bad_shape = _rewritten(gligen_file, tmp_path / "shape.safetensors",
                           {f"{block}.norm1.weight": torch.ones(5)})
    with pytest.raises(ModelFileError, match=r"shape\.safetensors: weights do not fit"):
        load_gligen(bad_shape)
    no_net = _rewritten(gligen_file, tmp_path / "no_net.safetensors", {"position_net.linears.2.bias": None})
    with pytest.raises(ModelFileError, match=r"position net lacks linears\.2\.bias"):
        load_gligen(no_net)


def test_any_prefix_before_the_block_names_is_accepted(gligen_file: Path, tmp_path: Path) -> None:
    tensors = {
        (key if key.startswith("position_net.") else f"model.diffusion_model.{key}"): value
        for key, value in load_file(gligen_file).items()
    }
    save_file_sorted(tensors, tmp_path / "prefixed.safetensors")
    prefixed = load_gligen(tmp_path / "prefixed.safetensors")
    plain = load_gligen(gligen_file)
    assert prefixed.block_names == plain.block_names
    assert all(torch.equal(a, b) for a, b in zip(prefixed.state_dict().values(), plain.state_dict().values(),
                                                 strict=True))
