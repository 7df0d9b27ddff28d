"""Separate UNet and text-encoder files and LDM configs: layouts, detection from shapes, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import CheckpointParts, load_checkpoint
from diffsplit.engine.models.ldm_config import LdmConfig, apply_ldm_config, read_ldm_config
from diffsplit.engine.models.ldm_keys import open_tensor_file
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.engine.models.text_encoder_files import describe_text_encoder_file, load_text_encoder_files
from diffsplit.engine.models.unet_file import load_unet_file, save_unet_file
from diffsplit.engine.types import DiffusionModel, ModelSampling


@pytest.fixture(scope="module")
def checkpoints(models_dir: Path) -> dict[str, CheckpointParts]:
    """What CheckpointLoaderSimple loads from the tiny checkpoints, per family."""
    names = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl", "sdxl_refiner": "tiny-sdxl-refiner"}
    return {family: load_checkpoint(models_dir / "checkpoints" / f"{name}.safetensors")
            for family, name in names.items()}  # fmt: skip


def same_module(actual: torch.nn.Module, expected: torch.nn.Module) -> bool:
    """Same class, config and weights, bit for bit."""
    a, b = actual.state_dict(), expected.state_dict()
    return (
        type(actual) is type(expected)
        and _config(actual) == _config(expected)
        and a.keys() == b.keys()
        and all(a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]) for key in b)
    )


def _config(module: torch.nn.Module) -> dict:
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def copy_tensors(source: Path, target: Path, rename) -> Path:
    """Write the tensors of ``source`` that ``rename`` maps (key → new key or None) to ``target``."""
    with open_tensor_file(source) as opened:
        tensors = {new: opened.read(key) for key in opened.shapes if (new := rename(key)) is not None}
    save_file_sorted(tensors, target)
    return target


def strip_prefix(prefix: str, add: str = ""):
    return lambda key: add + key[len(prefix):] if key.startswith(prefix) else None


# -- UNet files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "family"), [
    ("diffusion_models/tiny-sd15-unet.safetensors", "sd15"),  # bare LDM keys
    ("diffusion_models/tiny-sdxl-unet.safetensors", "sdxl"),  # under model.diffusion_model.
    ("checkpoints/tiny-sdxl.safetensors", "sdxl"),  # a whole checkpoint, as ComfyUI allows
    ("checkpoints/tiny-sdxl-refiner.safetensors", "sdxl_refiner"),
])  # fmt: skip
def test_a_unet_file_loads_the_checkpoints_unet(
    models_dir: Path, checkpoints: dict[str, CheckpointParts], file: str, family: str
) -> None:
    model = load_unet_file(models_dir / file)
    assert model.family == family
    assert model.sampling == checkpoints[family].model.sampling
    assert same_module(model.unet, checkpoints[family].model.unet)


def test_a_bare_ldm_refiner_unet_is_told_from_the_base_by_shapes(
    models_dir: Path, checkpoints: dict[str, CheckpointParts], tmp_path: Path
) -> None:
    source = models_dir / "checkpoints/tiny-sdxl-refiner.safetensors"
    bare = copy_tensors(source, tmp_path / "refiner.safetensors", strip_prefix("model.diffusion_model."))
    model = load_unet_file(bare)  # no metadata: sample_size is the family default
    assert model.family == "sdxl_refiner"
    expected = checkpoints["sdxl_refiner"].model.unet.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in model.unet.state_dict().items())


def test_a_diffusers_key_unet_file_loads(models_dir: Path, checkpoints: dict[str, CheckpointParts]) -> None:
    path = models_dir / "diffusers/tiny-sd15/unet/diffusion_pytorch_model.safetensors"  # save_pretrained's
    model = load_unet_file(path)
    expected = checkpoints["sd15"].model.unet
    assert model.family == "sd15"
    assert {**model.unet.config, "sample_size": 8} == dict(expected.config)  # the file has no sample_size
    weights = expected.state_dict()
    assert all(torch.equal(tensor, weights[key]) for key, tensor in model.unet.state_dict().items())


def test_an_sdxl_unet_without_its_time_embedding_width_names_the_metadata(
    models_dir: Path, tmp_path: Path
) -> None:
    source = models_dir / "diffusion_models/tiny-sdxl-unet.safetensors"
    bare = copy_tensors(source, tmp_path / "x.safetensors", lambda key: key)  # the tensors, no metadata
    with pytest.raises(ModelFileError, match=r"addition_time_embed_dim.*'diffsplit\.unet' metadata"):
        load_unet_file(bare)


@pytest.mark.parametrize("option, fp8", [
    ("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e4m3fn_fast", torch.float8_e4m3fn),
    ("fp8_e5m2", torch.float8_e5m2),
])  # fmt: skip
def test_fp8_weight_dtypes_compute_in_float32_on_fp8_rounded_weights(
    models_dir: Path, checkpoints: dict[str, CheckpointParts], option: str, fp8: torch.dtype
) -> None:
    model = load_unet_file(models_dir / "diffusion_models/tiny-sd15-unet.safetensors", weight_dtype=option)
    reference = dict(checkpoints["sd15"].model.unet.named_parameters())
    for name, parameter in model.unet.named_parameters():
        assert parameter.dtype == torch.float32
        assert torch.equal(parameter, reference[name].to(fp8).float()), name
    assert not all(torch.equal(p, reference[n]) for n, p in model.unet.named_parameters())


def test_an_unknown_weight_dtype_is_refused(models_dir: Path) -> None:
    with pytest.raises(ValueError, match="weight_dtype 'fp4'"):
        load_unet_file(models_dir / "diffusion_models/tiny-sd15-unet.safetensors", weight_dtype="fp4")


@pytest.mark.parametrize("sampling", [
    ModelSampling(prediction_type="v_prediction"),  # ComfyUI's v_pred marker key
    ModelSampling(prediction_type="v_prediction", linear_end=0.02),  # diffsplit.sampling metadata
])  # fmt: skip
def test_a_unet_files_noise_schedule_round_trips(
    checkpoints: dict[str, CheckpointParts], tmp_path: Path, sampling: ModelSampling
) -> None:
    model = DiffusionModel(unet=checkpoints["sd15"].model.unet, family="sd15", sampling=sampling)
    save_unet_file(tmp_path / "v.safetensors", model)
    assert load_unet_file(tmp_path / "v.safetensors").sampling == sampling


@pytest.mark.parametrize(("file", "reason"), [
    ("vae/tiny-sd15-vae.safetensors", "it is a VAE"),
    ("text_encoders/tiny-clip-l.safetensors", "it is a text encoder"),
    ("controlnet/tiny-sd15-controlnet.safetensors", "it is a ControlNet"),
    ("loras/tiny-sd15-lora.safetensors", "no LDM 'input_blocks.0.0.weight'"),
])  # fmt: skip
def test_other_files_are_not_unet_files(models_dir: Path, file: str, reason: str) -> None:
    with pytest.raises(ModelFileError, match=reason) as caught:
        load_unet_file(models_dir / file)
    assert file.split("/")[1] in str(caught.value)


# -- text encoder files -------------------------------------------------------------------------------


def test_text_encoder_files_say_what_they_hold(models_dir: Path) -> None:
    clip_l = describe_text_encoder_file(models_dir / "text_encoders/tiny-sdxl-clip-l.safetensors")
    clip_g = describe_text_encoder_file(models_dir / "text_encoders/tiny-sdxl-clip-g.safetensors")
    assert (clip_l.layout, clip_l.prefix, clip_l.width) == ("hf", "", 64)
    assert (clip_g.layout, clip_g.prefix, clip_g.width) == ("hf", "", 128)
    assert clip_l.kind is None and clip_g.kind is None  # tiny widths name no kind: the pair decides


@pytest.mark.parametrize("order", [("clip-l", "clip-g"), ("clip-g", "clip-l")])
def test_sdxl_text_encoder_files_load_the_checkpoints_clip_in_either_order(
    models_dir: Path, checkpoints: dict[str, CheckpointParts], order: tuple[str, str]
) -> None:
    paths = [models_dir / f"text_encoders/tiny-sdxl-{kind}.safetensors" for kind in order]
    clip = load_text_encoder_files(paths)
    expected = checkpoints["sdxl"].clip
    assert clip.family == "sdxl" and clip.layer_idx is None
    assert [t.name_or_path for t in clip.tokenizers] == [t.name_or_path for t in expected.tokenizers]
    assert all(same_module(a, b) for a, b in zip(clip.encoders, expected.encoders, strict=True))


def test_an_sd15_text_encoder_file_loads_the_checkpoints_clip(
    models_dir: Path, checkpoints: dict[str, CheckpointParts]
) -> None:
    clip = load_text_encoder_files([models_dir / "text_encoders/tiny-clip-l.safetensors"])
    assert clip.family == "sd15"
    assert same_module(clip.encoders[0], checkpoints["sd15"].clip.encoders[0])


def test_checkpoint_prefixes_and_the_open_clip_layout_tell_the_kind(
    models_dir: Path, checkpoints: dict[str, CheckpointParts], tmp_path: Path
) -> None:
    sdxl = models_dir / "checkpoints/tiny-sdxl.safetensors"
    # bigG kept in the OpenCLIP layout under its checkpoint prefix, CLIP-L under its own: kinds known
    def under(prefix: str):
        return lambda key: key if key.startswith(prefix) else None

    g = copy_tensors(sdxl, tmp_path / "g.safetensors", under("conditioner.embedders.1."))
    l_file = copy_tensors(sdxl, tmp_path / "l.safetensors", under("conditioner.embedders.0."))
    assert describe_text_encoder_file(g).kind == "clip_g"
    assert describe_text_encoder_file(l_file).kind == "clip_l"
    clip = load_text_encoder_files([g, l_file])
    expected = checkpoints["sdxl"].clip.encoders
    assert all(same_module(a, b) for a, b in zip(clip.encoders, expected, strict=True))


def test_bigg_alone_is_the_refiners_clip(
    models_dir: Path, checkpoints: dict[str, CheckpointParts], tmp_path: Path
) -> None:
    bare = copy_tensors(models_dir / "checkpoints/tiny-sdxl-refiner.safetensors", tmp_path / "g.safetensors",
                        strip_prefix("conditioner.embedders.0.model."))  # bare OpenCLIP keys  # fmt: skip
    clip = load_text_encoder_files([bare])
    assert clip.family == "sdxl_refiner"
    assert same_module(clip.encoders[0], checkpoints["sdxl_refiner"].clip.encoders[0])


def test_published_widths_name_the_kind(tmp_path: Path) -> None:
    for width, kind in ((768, "clip_l"), (1280, "clip_g")):
        path = tmp_path / f"{width}.safetensors"
        save_file_sorted({"text_model.embeddings.token_embedding.weight": torch.zeros(4, width)}, path)
        assert describe_text_encoder_file(path).kind == kind


@pytest.mark.parametrize(("files", "reason"), [
    (("tiny-sdxl-clip-l", "tiny-clip-l"), "same width 64: cannot tell which is CLIP-L"),
    (("tiny-sdxl-clip-g", "tiny-sdxl-clip-g"), "same width 128"),
])  # fmt: skip
def test_pairs_that_are_not_clip_l_and_bigg_are_refused(models_dir: Path, files, reason: str) -> None:
    with pytest.raises(ModelFileError, match=reason):
        load_text_encoder_files([models_dir / f"text_encoders/{name}.safetensors" for name in files])


def test_two_known_clip_l_files_are_refused(tmp_path: Path) -> None:
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.safetensors")
        save_file_sorted({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 768)}, paths[-1])
    with pytest.raises(ModelFileError, match="both clip_l text encoders; sdxl needs clip_l and clip_g"):
        load_text_encoder_files(paths)


def test_bigg_without_its_projection_is_refused(models_dir: Path, tmp_path: Path) -> None:
    path = copy_tensors(models_dir / "text_encoders/tiny-sdxl-clip-g.safetensors", tmp_path / "g.safetensors",
                        lambda key: None if key == "text_projection.weight" else key)  # fmt: skip
    with pytest.raises(ModelFileError, match=r"clip_g text encoder: no 'text_projection\.weight'"):
        load_text_encoder_files([models_dir / "text_encoders/tiny-sdxl-clip-l.safetensors", path])


@pytest.mark.parametrize(("file", "reason"), [
    ("diffusion_models/tiny-sd15-unet.safetensors", "it is a diffusion model"),
    ("vae/tiny-sd15-vae.safetensors", "it is a VAE"),
    ("checkpoints/tiny-sdxl.safetensors", "holds 2 text encoders"),
    ("loras/tiny-sd15-lora.safetensors", "not a text encoder file: no 'text_model."),
])  # fmt: skip
def test_other_files_are_not_text_encoder_files(models_dir: Path, file: str, reason: str) -> None:
    with pytest.raises(ModelFileError, match=reason):
        load_text_encoder_files([models_dir / file])


def test_sd2_open_clip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    save_file_sorted({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 1024)}, path)
    with pytest.raises(ModelFileError, match=r"OpenCLIP ViT-H, SD 2\.x"):
        load_text_encoder_files([path])


# -- LDM configs --------------------------------------------------------------------------------------


def test_the_tiny_v1_inference_config_reads(models_dir: Path) -> None:
    config = read_ldm_config(models_dir / "configs/v1-inference.yaml")
    assert config == LdmConfig(v_prediction=False, linear_start=0.00085, linear_end=0.012, timesteps=1000,
                               scale_factor=0.18215, layer_idx=None)  # fmt: skip


def write_config(tmp_path: Path, models_dir: Path, edit) -> Path:
    document = yaml.safe_load((models_dir / "configs/v1-inference.yaml").read_text())
    edit(document)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_v_config_makes_the_model_v_prediction_and_sets_what_it_says(
    models_dir: Path, checkpoints: dict[str, CheckpointParts], tmp_path: Path
) -> None:
    def edit(document: dict) -> None:
        params = document["model"]["params"]
        params.update(parameterization="v", linear_end=0.02, scale_factor=0.5)
        params["cond_stage_config"]["params"] = {"layer_idx": -2}

    parts = checkpoints["sd15"]
    applied = apply_ldm_config(parts, read_ldm_config(write_config(tmp_path, models_dir, edit)))
    assert applied.model.sampling == ModelSampling(prediction_type="v_prediction", linear_end=0.02)
    assert applied.model.unet is parts.model.unet and parts.model.sampling == ModelSampling()
    assert applied.clip.layer_idx == -2 and applied.vae.scaling_factor == 0.5
    assert parts.vae.scaling_factor == 0.18215 and parts.clip.layer_idx is None  # the inputs are untouched


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda d: d["model"].update(target="sgm.models.diffusion.DiffusionEngine"),
     "not an LDM config: model.target"),
    (lambda d: d.pop("model"), "not an LDM config: 'model' must be a mapping"),
    (lambda d: d["model"]["params"].pop("cond_stage_config"),
     "'model.params.cond_stage_config' must be a mapping"),
    (lambda d: d["model"]["params"].update(parameterization="x0"), "parameterization 'x0' is not supported"),
    (lambda d: d["model"]["params"].update(beta_schedule="cosine"), "beta_schedule 'cosine' is unsupported"),
    (lambda d: d["model"]["params"].update(linear_end="big"), "linear_end must be a positive number"),
    (lambda d: d["model"]["params"].update(linear_start=0.5, linear_end=0.1), "linear_start < linear_end"),
    (lambda d: d["model"]["params"]["cond_stage_config"].update(params={"layer_idx": 3}),
     "layer_idx must be"),
])  # fmt: skip
def test_configs_that_are_not_ldm_configs_fail_naming_the_key(
    models_dir: Path, tmp_path: Path, edit, reason: str
) -> None:
    path = write_config(tmp_path, models_dir, edit)
    with pytest.raises(ModelFileError, match=reason) as caught:
        read_ldm_config(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("text", ["- a list", "model: [unclosed", ""])
def test_yaml_that_is_no_config_fails(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ModelFileError, match=r"not valid YAML|not an LDM config"):
        read_ldm_config(path)
