"""What a LoRA file's own adapter config may say before diffusers builds a peft ``LoraConfig`` from it.

diffusers (``save_lora_adapter``, ``save_lora_weights``) writes the adapter's
peft config into the safetensors header (``lora_adapter_metadata``, JSON), and
``load_lora_weights`` / ``load_lora_adapter`` pass every key of it to
``LoraConfig``. Some of those keys are not data: ``megatron_core`` names a
module that peft imports, ``init_lora_weights`` may start a decomposition of
the base weights, the ``*_config`` keys start other machinery. A file a peer
uploaded must not choose any of that, so before a recipe's adapter file is
loaded, every key of its config must either be one that only shapes the
adapter (:data:`SHAPING_KEYS`, with a value of the expected kind) or hold
peft's own default for it; an unknown key is refused too.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from diffsplit.tracer.errors import RecipeError

#: The header key diffusers writes the adapter's peft config under.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
#: The longest config a header may carry, and the most names in a list or pattern.
MAX_METADATA_CHARS = 1 << 20
MAX_NAMES = 4096
MAX_NAME_CHARS = 512
#: How many files of a LoRA folder are looked at (diffusers reads one of them).
MAX_FOLDER_FILES = 64


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 16


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _name(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME_CHARS


def _names(value: Any) -> bool:
    """None, one name (peft reads a string as a regular expression), or a list of names."""
    if value is None or _name(value):
        return True
    return isinstance(value, list) and len(value) <= MAX_NAMES and all(_name(item) for item in value)


def _layers(value: Any) -> bool:
    if value is None or _int(value):
        return True
    return isinstance(value, list) and len(value) <= MAX_NAMES and all(
        _int(item) or item == 0 for item in value)


def _pattern_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def pattern(value: Any) -> bool:
        return isinstance(value, Mapping) and len(value) <= MAX_NAMES and all(
            _name(key) and check(item) for key, item in value.items())
    return pattern


def _choice(*choices: Any) -> Callable[[Any], bool]:
    return lambda value: value in choices


#: Keys that only shape the adapter (its rank, scale, where it goes), with what each may hold.
SHAPING_KEYS: Mapping[str, Callable[[Any], bool]] = {
    "r": _int,
    "lora_alpha": _number,
    "lora_dropout": lambda value: _number(value) and 0 <= value < 1,
    "target_modules": _names,
    "exclude_modules": _names,
    "modules_to_save": _names,
    "target_parameters": _names,
    "layers_to_transform": _layers,
    "layers_pattern": _names,
    "rank_pattern": _pattern_of(_int),
    "alpha_pattern": _pattern_of(_number),
    "bias": _choice("none", "all", "lora_only"),
    "use_rslora": _bool,
    "use_dora": _bool,
    "lora_bias": _bool,
    "fan_in_fan_out": _bool,
    "inference_mode": _bool,
    "init_lora_weights": _bool,  # the strings start decompositions of the base weights
    "peft_type": _choice("LORA"),
    "task_type": lambda value: value is None or _name(value),
    "base_model_name_or_path": lambda value: value is None or _name(value),  # informational
    "peft_version": lambda value: value is None or _name(value),  # informational
}


def check_adapter_file(path: Path) -> None:
    """Refuse ``path`` (a LoRA ``.safetensors`` file, or a folder of them) if its config sets more than data.

    RecipeError names the file's key and why. Files without a config pass: diffusers then
    works the config out from the tensors alone.
    """
    files = sorted(path.glob("*.safetensors"))[:MAX_FOLDER_FILES] if path.is_dir() else [path]
    for file in files:
        config = _adapter_config(file)
        if config is not None:
            _check_config(config, file.name)


def _adapter_config(file: Path) -> Mapping[str, Any] | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise RecipeError(f"{file.name}: not a readable safetensors file ({exc})") from exc
    text = metadata.get(ADAPTER_METADATA_KEY)
    if text is None:
        return None
    if len(text) > MAX_METADATA_CHARS:
        raise RecipeError(f"{file.name}: its adapter config is over {MAX_METADATA_CHARS} characters")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{file.name}: its adapter config is not JSON ({exc})") from exc
    if not isinstance(config, Mapping):
        raise RecipeError(f"{file.name}: its adapter config is not a mapping")
    return config


def _check_config(config: Mapping[str, Any], name: str) -> None:
    defaults = _peft_defaults()
    for key, value in config.items():
        check = SHAPING_KEYS.get(key)
        if check is not None:
            if not check(value):
                raise RecipeError(f"{name}: adapter config {key!r} holds {_shown(value)}, "
                                  "which is not allowed")
            continue
        if key not in defaults:
            raise RecipeError(f"{name}: adapter config key {key!r} is unknown here; "
                              "such files are not loaded")
        if value != defaults[key]:
            raise RecipeError(f"{name}: adapter config {key!r} is set ({_shown(value)}); only peft's default "
                              f"({_shown(defaults[key])}) is accepted from a recipe's file")


def config_json(config: Any) -> str:
    """A peft config as the JSON a LoRA file's header holds (sorted keys: the same config, the same text)."""
    return json.dumps(config.to_dict(), sort_keys=True, default=_plain)


@functools.cache
def _peft_defaults() -> dict[str, Any]:
    """peft's default ``LoraConfig`` as its JSON form (what a file holds for keys left alone); made once."""
    from peft import LoraConfig

    return dict(json.loads(config_json(LoraConfig())))


def _plain(value: Any) -> Any:
    """What JSON cannot hold as it is: sets as sorted lists, enums as their value."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    return str(getattr(value, "value", value))


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:79] + "…"
