"""Standalone text-encoder files, as ComfyUI's CLIPLoader and DualCLIPLoader read them.

One text encoder per file, in any of these layouts:

- the transformers (HF) layout people download and ComfyUI's CLIPSave writes:
  ``text_model.*`` keys, plus ``text_projection.weight`` for OpenCLIP bigG;
- the OpenCLIP layout (``token_embedding.weight``, ``transformer.resblocks.N.*``,
  ``text_projection``), as SDXL checkpoints store bigG;
- either of them under a checkpoint's prefix (``cond_stage_model.transformer.``,
  ``conditioner.embedders.N.transformer.`` / ``.model.``) or ComfyUI's in-memory
  ``clip_l.transformer.`` / ``clip_g.transformer.``.

Which encoder a file holds (CLIP-L or OpenCLIP bigG, "clip_g") comes from its
layout or prefix when they tell (OpenCLIP layout and ``.model.`` prefixes are
bigG), else from the published widths (768: CLIP-L, 1280: bigG; 1024, OpenCLIP
ViT-H of SD 2.x, is refused). A file of another width names no kind: a pair
then takes the narrower as CLIP-L (SDXL's CLIP-L is narrower than its bigG),
and a single file is CLIP-L. Configs come from the shapes as for checkpoints
(:mod:`infer_config`), with ``diffsplit.clip_l`` / ``diffsplit.clip_g``
metadata overrides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models import infer_config as infer
from diffsplit.engine.models.checkpoint import _clip_fields, _load_module
from diffsplit.engine.models.ldm_keys import TensorFile, open_tensor_file, same_rules
from diffsplit.engine.models.ldm_text import clip_l_key_rules, open_clip_key_rules
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.engine.types import ModelFamily, TextEncoders
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TextKind = Literal["clip_l", "clip_g"]
Layout = Literal["hf", "open_clip"]
HF_MARKER_KEY = "text_model.embeddings.token_embedding.weight"
OPEN_CLIP_MARKER_KEY = "token_embedding.weight"
HF_PROJECTION_KEY = "text_projection.weight"
#: Prefixes a text encoder may sit under, and the kind each implies (None: the prefix does not tell).
PREFIXES: tuple[tuple[str, TextKind | None], ...] = (
    ("", None),
    ("cond_stage_model.transformer.", "clip_l"),
    ("conditioner.embedders.0.transformer.", "clip_l"),
    ("conditioner.embedders.0.model.", "clip_g"),
    ("conditioner.embedders.1.model.", "clip_g"),
    ("clip_l.transformer.", "clip_l"),
    ("clip_g.transformer.", "clip_g"),
)
#: Hidden widths of the published encoders.
PUBLISHED_WIDTHS: Mapping[int, TextKind] = MappingProxyType({768: "clip_l", 1280: "clip_g"})
SD2_OPEN_CLIP_WIDTH = 1024
#: Keys that name another kind of model file, for a helpful error.
_OTHER_KINDS = (
    ("input_blocks.0.0.weight", "a diffusion model (load it with UNETLoader)"),
    ("model.diffusion_model.input_blocks.0.0.weight", "a checkpoint (load it with CheckpointLoaderSimple)"),
    ("conv_in.weight", "a diffusers UNet (load it with UNETLoader)"),
    ("encoder.conv_in.weight", "a VAE (load it with VAELoader)"),
)


@dataclass(frozen=True)
class TextEncoderFile:
    """Where a file's text encoder is, its layout, hidden width and kind (None: the file does not tell)."""

    path: Path
    prefix: str
    layout: Layout
    width: int
    kind: TextKind | None


def _describe(source: TensorFile) -> TextEncoderFile:
    found = [
        (prefix, layout, kind)
        for prefix, kind in PREFIXES
        for layout, marker in (("hf", HF_MARKER_KEY), ("open_clip", OPEN_CLIP_MARKER_KEY))
        if prefix + marker in source.shapes
    ]
    if not found:
        for marker, what in _OTHER_KINDS:
            if marker in source.shapes:
                raise ModelFileError(f"{source.path}: not a text encoder file: it is {what}")
        raise ModelFileError(
            f"{source.path}: not a text encoder file: no '{HF_MARKER_KEY}' (transformers layout) "
            f"or '{OPEN_CLIP_MARKER_KEY}' (OpenCLIP layout), bare or under a checkpoint prefix"
        )
    if len(found) > 1:
        where = ", ".join(f"'{prefix}'" for prefix, _, _ in found)
        raise ModelFileError(
            f"{source.path}: holds {len(found)} text encoders (under {where}); "
            "a text encoder file holds one (load a checkpoint with CheckpointLoaderSimple)"
        )
    prefix, layout, kind = found[0]
    marker = HF_MARKER_KEY if layout == "hf" else OPEN_CLIP_MARKER_KEY
    width = source.shapes[prefix + marker][1]
    if width == SD2_OPEN_CLIP_WIDTH:
        raise ModelFileError(
            f"{source.path}: a text encoder of width {width} (OpenCLIP ViT-H, SD 2.x) is not supported"
        )
    if layout == "open_clip":
        kind = "clip_g"
    return TextEncoderFile(source.path, prefix, layout, width, kind or PUBLISHED_WIDTHS.get(width))


def describe_text_encoder_file(path: Path) -> TextEncoderFile:
    """Layout, width and kind of the text encoder in ``path``; ModelFileError when it holds none."""
    with open_tensor_file(Path(path)) as source:
        return _describe(source)


def hf_config(shapes: infer.Shapes, kind: TextKind) -> dict[str, Any]:
    """CLIPTextConfig values of transformers-layout shapes (``text_model.*``) of a ``kind`` encoder.

    The same values :mod:`infer_config` gives for the encoder in a checkpoint.
    """
    config = infer.infer_clip_l_config(shapes)
    if kind == "clip_g":
        projection = shapes.get(HF_PROJECTION_KEY)
        if projection is None:
            raise ModelFileError(
                f"no '{HF_PROJECTION_KEY}': an OpenCLIP bigG text encoder needs its projection "
                "(SDXL's pooled output)"
            )
        config.update(hidden_act="gelu", projection_dim=projection[0])
    return config


def _config(source: TensorFile, found: TextEncoderFile, kind: TextKind) -> dict[str, Any]:
    shapes = {key[len(found.prefix) :]: shape for key, shape in source.shapes.items()
              if key.startswith(found.prefix)}  # fmt: skip
    if found.layout == "open_clip":
        return infer.infer_open_clip_config(shapes)
    return hf_config(shapes, kind)


def _load_encoder(
    source: TensorFile, found: TextEncoderFile, kind: TextKind, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    try:
        inferred = _config(source, found, kind)
    except ModelFileError as error:
        raise ModelFileError(f"{source.path}: {kind} text encoder: {error}") from error
    config = CLIPTextConfig(**{**inferred, **infer.read_overrides(source.metadata, kind)})
    if kind == "clip_l":  # never the OpenCLIP layout, which is always bigG
        factory, rules_for = partial(CLIPTextModel, config), clip_l_key_rules
    else:
        factory = partial(CLIPTextModelWithProjection, config)
        rules_for = open_clip_key_rules if found.layout == "open_clip" else same_rules
    return _load_module(source, found.prefix, factory, rules_for, dtype)


def _pair_kinds(first: TextEncoderFile, second: TextEncoderFile) -> tuple[TextKind, TextKind]:
    """The kinds of two files meant as SDXL's CLIP-L and bigG, in either order."""
    kinds = (first.kind, second.kind)
    if kinds[0] is not None and kinds[0] == kinds[1]:
        raise ModelFileError(
            f"{first.path} and {second.path} are both {kinds[0]} text encoders; sdxl needs clip_l and clip_g"
        )
    if kinds[0] is not None or kinds[1] is not None:
        known = kinds[0] if kinds[0] is not None else kinds[1]
        other: TextKind = "clip_g" if known == "clip_l" else "clip_l"
        return (known, other) if kinds[0] is not None else (other, known)
    if first.width == second.width:
        raise ModelFileError(
            f"{first.path} and {second.path} are text encoders of the same width {first.width}: "
            "cannot tell which is CLIP-L and which OpenCLIP bigG"
        )
    return ("clip_l", "clip_g") if first.width < second.width else ("clip_g", "clip_l")


def load_text_encoder_files(
    paths: Sequence[Path], *, dtypes: Sequence[torch.dtype] | None = None
) -> TextEncoders:
    """CLIP from one file (CLIP-L: SD 1.x; bigG alone: the SDXL refiner's) or two (SDXL: CLIP-L + bigG).

    ComfyUI's ``stable_diffusion`` (one file) and ``sdxl`` (two) types. ``dtypes``: one per file
    (default float32).
    Raises ModelFileError naming the file for anything else.
    """
    from diffsplit.engine.models.tokenizers import clip_tokenizer

    paths = [Path(path) for path in paths]
    if len(paths) not in (1, 2):
        raise ValueError(f"one or two text encoder files, not {len(paths)}")
    found = [describe_text_encoder_file(path) for path in paths]
    if len(found) == 1:
        kinds: tuple[TextKind, ...] = (found[0].kind or "clip_l",)
    else:
        kinds = _pair_kinds(found[0], found[1])
    order = sorted(range(len(found)), key=lambda index: kinds[index] != "clip_l")  # clip_l first
    encoders = []
    for index in order:
        with open_tensor_file(paths[index]) as source:
            dtype = torch.float32 if dtypes is None else dtypes[index]
            encoders.append(_load_encoder(source, _describe(source), kinds[index], dtype))
    ordered = tuple(kinds[index] for index in order)
    family: ModelFamily = {("clip_l",): "sd15", ("clip_g",): "sdxl_refiner"}.get(ordered, "sdxl")
    return TextEncoders(
        encoders=tuple(encoders), tokenizers=tuple(clip_tokenizer(kind) for kind in ordered), family=family
    )


def save_text_encoder_file(path: Path, encoder: torch.nn.Module, kind: TextKind) -> None:
    """Write one text encoder in the transformers layout (``text_model.*``; bigG adds its projection).

    Config values the loader would not infer are stored as ``diffsplit.<kind>`` metadata.
    """
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in encoder.state_dict().items()}
    if kind == "clip_l":
        rules = clip_l_key_rules(state.keys())
        tensors = {rule.ldm_key: state[rule.module_keys[0]] for rule in rules}
    else:
        tensors = state
    inferred = hf_config({key: tuple(tensor.shape) for key, tensor in tensors.items()}, kind)
    overrides = infer.clip_overrides(encoder.config.to_dict(), inferred, _clip_fields(kind))
    save_file_sorted(tensors, str(path), metadata=infer.write_overrides(kind, overrides))
