"""LDM ``.yaml`` model configs (``v1-inference.yaml`` and kin), as the legacy CheckpointLoader reads them.

The model itself still comes from the checkpoint's shapes (as ComfyUI does
today); the config adds what shapes cannot tell, from ``model.params``:

- ``parameterization: "v"``: v-prediction (``"eps"`` or none: the checkpoint's own);
- ``linear_start``, ``linear_end``, ``timesteps``: the noise schedule (``beta_schedule``,
  when given, must be LDM's ``linear``);
- ``scale_factor``: the latent scale of the VAE;
- ``cond_stage_config.params.layer_idx``: the CLIP layer (as CLIPSetLastLayer).

Current ComfyUI applies only ``parameterization`` and ``layer_idx``; the
schedule and scale here are the config's own values, which for the published
configs equal what shapes imply. Only ``yaml.safe_load`` reads the file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import CheckpointParts
from diffsplit.transport.shown import shown

#: The package of LDM's diffusion models (LatentDiffusion, LatentInpaintDiffusion, ...).
LDM_TARGET_PREFIX = "ldm.models.diffusion."
PARAMETERIZATIONS = frozenset({"eps", "v"})
#: The CLIP layers a config may stop at (CLIPSetLastLayer's range).
LAYER_IDX_RANGE = (-24, -1)


@dataclass(frozen=True)
class LdmConfig:
    """What an LDM config says about a model beyond its weights (None: the config does not say)."""

    v_prediction: bool = False
    linear_start: float | None = None
    linear_end: float | None = None
    timesteps: int | None = None
    scale_factor: float | None = None
    layer_idx: int | None = None


def _mapping(value: Any, where: str, path: Path) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        kind = type(value).__name__
        raise ModelFileError(f"{path}: not an LDM config: '{where}' must be a mapping, got {kind}")
    return value


def _number(params: Mapping[str, Any], key: str, path: Path) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        raise ModelFileError(f"{path}: model.params.{key} must be a positive number, got {shown(value)}")
    return float(value)


def _integer(value: Any, key: str, path: Path, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ModelFileError(f"{path}: {key} must be an integer from {low} to {high}, got {shown(value)}")
    return value


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses aliases: no config needs them, and nested ones expand exponentially."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not allowed in a model config (line {mark.line + 1})")
        return super().compose_node(parent, index)


def read_ldm_config(path: Path) -> LdmConfig:
    """Parse an LDM config; ModelFileError naming the file and the key for anything else."""
    path = Path(path)
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # a SafeLoader
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read the config: {error.strerror or error}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: not valid YAML: {error}") from None
    model = _mapping(_mapping(document, "(the document)", path).get("model"), "model", path)
    target = model.get("target")
    if not isinstance(target, str) or not target.startswith(LDM_TARGET_PREFIX):
        raise ModelFileError(
            f"{path}: not an LDM config: model.target is {shown(target)}, not an LDM diffusion model "
            f"('{LDM_TARGET_PREFIX}*'; SDXL's sgm configs are not LDM configs: use CheckpointLoaderSimple)"
        )
    params = _mapping(model.get("params"), "model.params", path)
    cond_stage = _mapping(params.get("cond_stage_config"), "model.params.cond_stage_config", path)
    parameterization = params.get("parameterization", "eps")
    if parameterization not in PARAMETERIZATIONS:
        raise ModelFileError(
            f"{path}: model.params.parameterization {shown(parameterization)} is not supported "
            f"(expected one of {', '.join(sorted(PARAMETERIZATIONS))})"
        )
    schedule = params.get("beta_schedule", "linear")
    if schedule != "linear":
        raise ModelFileError(f"{path}: model.params.beta_schedule {shown(schedule)} is unsupported "
                             "(only linear)")
    linear_start, linear_end = _number(params, "linear_start", path), _number(params, "linear_end", path)
    if linear_start is not None and linear_end is not None and not linear_start < linear_end < 1:
        raise ModelFileError(f"{path}: model.params needs linear_start < linear_end < 1")
    layer_idx = _mapping(cond_stage.get("params", {}), "cond_stage_config.params", path).get("layer_idx")
    return LdmConfig(
        v_prediction=parameterization == "v",
        linear_start=linear_start,
        linear_end=linear_end,
        timesteps=_integer(params.get("timesteps"), "model.params.timesteps", path, 1, 100_000),
        scale_factor=_number(params, "scale_factor", path),
        layer_idx=_integer(layer_idx, "cond_stage_config.params.layer_idx", path, *LAYER_IDX_RANGE),
    )


def apply_ldm_config(parts: CheckpointParts, config: LdmConfig) -> CheckpointParts:
    """New MODEL, CLIP and VAE objects with what ``config`` says (the modules are shared, not copied)."""
    sampling = parts.model.sampling
    changes: dict[str, Any] = {
        "prediction_type": "v_prediction" if config.v_prediction else None,
        "linear_start": config.linear_start,
        "linear_end": config.linear_end,
        "num_timesteps": config.timesteps,
    }
    sampling = dataclasses.replace(
        sampling, **{key: value for key, value in changes.items() if value is not None}
    )
    clip = parts.clip
    if config.layer_idx is not None:
        clip = dataclasses.replace(clip, layer_idx=config.layer_idx)
    vae = parts.vae
    if config.scale_factor is not None:
        vae = dataclasses.replace(vae, scaling_factor=config.scale_factor)
    return CheckpointParts(model=dataclasses.replace(parts.model, sampling=sampling), clip=clip, vae=vae)
