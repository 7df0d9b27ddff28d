"""Preprocessor networks as self-describing ``.safetensors`` files: a transformers model's weights with
its config in the file's metadata, so one file names the whole model by its sha256 and the network
is rebuilt from the config with no download.

A file's ``__metadata__`` holds ``diffsplit_architecture`` (which kind of network) and ``config``
(the transformers config as JSON). Reading one treats the file as a hostile peer's:

- the config's model types must be the architecture's own (no other class is ever built from a
  file), and the keys that make transformers fetch or build another backbone (``backbone``,
  ``use_pretrained_backbone``, ``use_timm_backbone``, ``backbone_kwargs``) must be unset;
- every number in it is bounded (``MAX_CONFIG_INT``) and so is the depth (``MAX_LAYERS``), so a
  config cannot ask for a network that takes hours or terabytes to build;
- the network is first built on the ``meta`` device (no memory) and its tensors' names and shapes
  must be the file's, so the memory the real one takes is that of the file's own weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.ldm_keys import check_fit, open_tensor_file
from diffsplit.engine.models.safetensors_io import save_file_sorted

ARCHITECTURE_KEY = "diffsplit_architecture"
CONFIG_KEY = "config"
#: the largest number a config may hold (widths, sizes, label counts)
MAX_CONFIG_INT = 16384
#: the most layers a config may ask for, over all its ``num_hidden_layers`` and ``depths``
MAX_LAYERS = 256
_BACKBONE_SWITCHES = ("backbone", "use_pretrained_backbone", "use_timm_backbone", "backbone_kwargs")
_LAYER_KEYS = ("num_hidden_layers", "depths")


@dataclass(frozen=True)
class Architecture:
    """A kind of network a described file may hold: its name in the metadata, the config's model type
    and its backbone's, and how to build an untrained network from a config."""

    name: str
    #: how messages call it ("Depth Anything")
    label: str
    model_type: str
    backbone_types: tuple[str, ...]
    build: Callable[[dict[str, Any]], torch.nn.Module]


@dataclass(frozen=True, eq=False)
class DescribedNetwork:
    """A network read from a described file, with its config and the file's other metadata."""

    network: torch.nn.Module
    config: dict[str, Any]
    metadata: Mapping[str, str]


def save_described(path: Path, network: torch.nn.Module, architecture: Architecture,
                   extra: Mapping[str, str] | None = None) -> Path:
    """Write ``network`` (a transformers model of ``architecture``) with its config, and ``extra``
    metadata, as a safetensors file; returns ``path``."""
    config = network.config.to_dict()  # type: ignore[operator]
    tensors = {name: tensor.contiguous() for name, tensor in network.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**(extra or {}), ARCHITECTURE_KEY: architecture.name,
                CONFIG_KEY: json.dumps(config, sort_keys=True)}
    save_file_sorted(tensors, path, metadata=metadata)
    return path


def _numbers(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{where}[{index}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield where, value


def check_config(config: Any, architecture: Architecture, file_name: str) -> dict[str, Any]:
    """``config`` when it is a bounded config of ``architecture``; ModelFileError naming what is not."""
    if not isinstance(config, dict) or config.get("model_type") != architecture.model_type:
        raise ModelFileError(f"{file_name}: its config is not a {architecture.model_type} config")
    backbone = config.get("backbone_config")
    if not isinstance(backbone, dict) or backbone.get("model_type") not in architecture.backbone_types:
        raise ModelFileError(f"{file_name}: its backbone must be one of {list(architecture.backbone_types)}")
    for key in _BACKBONE_SWITCHES:
        if config.get(key) not in (None, False, {}):
            raise ModelFileError(f"{file_name}: its config sets {key}, which would load another backbone")
    for where, number in _numbers(config, "config"):
        if abs(number) > MAX_CONFIG_INT:
            raise ModelFileError(f"{file_name}: {where} = {number} is over the limit of {MAX_CONFIG_INT}")
    layers = 0
    for part in (config, backbone):
        for key in _LAYER_KEYS:
            value = part.get(key)
            layers += sum(value) if isinstance(value, list) else value if isinstance(value, int) else 0
    if layers > MAX_LAYERS:
        raise ModelFileError(f"{file_name}: its config asks for {layers} layers, over the limit of "
                             f"{MAX_LAYERS}")
    return config


def load_described(path: Path, architecture: Architecture) -> DescribedNetwork:
    """The network of the described file ``path``; ModelFileError names what is wrong with a file that
    is not one of ``architecture``."""
    name = Path(path).name
    with open_tensor_file(Path(path)) as source:  # owned memory, and a readable error for a bad file
        metadata = dict(source.metadata)
        if metadata.get(ARCHITECTURE_KEY) != architecture.name or CONFIG_KEY not in metadata:
            raise ModelFileError(f"{name} is not a diffsplit {architecture.label} file (its metadata has no "
                                 f"{ARCHITECTURE_KEY}={architecture.name!r} and {CONFIG_KEY})")
        try:
            config = check_config(json.loads(metadata[CONFIG_KEY]), architecture, name)
            with torch.device("meta"):
                skeleton = architecture.build(config)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelFileError(f"{name}: its {architecture.label} config does not build: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        check_fit(skeleton, source.shapes, f"{name}: its weights do not fit its {architecture.label} config")
        network = architecture.build(config).eval()
        network.load_state_dict({key: source.read(key) for key in source.shapes}, strict=True)
    return DescribedNetwork(network=network, config=config, metadata=metadata)
