"""Key rules for the text encoders of SD 1.x and SDXL single-file checkpoints.

CLIP-L is stored in the transformers layout already (``text_model.*`` under
``cond_stage_model.transformer.`` or ``conditioner.embedders.0.transformer.``),
so its rules only restore the ``text_model.`` level. OpenCLIP ViT-bigG (SDXL
``conditioner.embedders.1.model.``, refiner ``conditioner.embedders.0.model.``)
maps onto ``CLIPTextModelWithProjection``:

- ``token_embedding.weight``        ↔ ``text_model.embeddings.token_embedding.weight``
- ``positional_embedding``          ↔ ``text_model.embeddings.position_embedding.weight``
- ``transformer.resblocks.N.ln_1``  ↔ ``text_model.encoder.layers.N.layer_norm1`` (``ln_2`` ↔ ``layer_norm2``)
- ``...attn.in_proj_weight/bias``   ↔ ``...self_attn.{q,k,v}_proj.weight/bias`` (fused ``[3C, C]``)
- ``...attn.out_proj``              ↔ ``...self_attn.out_proj``
- ``...mlp.c_fc`` / ``mlp.c_proj``  ↔ ``...mlp.fc1`` / ``mlp.fc2``
- ``ln_final``                      ↔ ``text_model.final_layer_norm``
- ``text_projection`` ``[width, proj]`` ↔ ``text_projection.weight`` ``[proj, width]`` (transposed)
"""

from __future__ import annotations

from collections.abc import Iterable

from diffsplit.engine.models.ldm_keys import KeyRule, Transform

#: Whole-key renames of OpenCLIP (module key → LDM key).
OPEN_CLIP_KEYS: tuple[tuple[str, str, Transform], ...] = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", Transform.SAME),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding", Transform.SAME),
    ("text_model.final_layer_norm.weight", "ln_final.weight", Transform.SAME),
    ("text_model.final_layer_norm.bias", "ln_final.bias", Transform.SAME),
    ("text_projection.weight", "text_projection", Transform.TRANSPOSE),
)
#: Per-layer renames of OpenCLIP resblocks (module layer → LDM layer).
OPEN_CLIP_LAYERS: tuple[tuple[str, str], ...] = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
TEXT_MODEL_PREFIX = "text_model."
ENCODER_LAYERS_PREFIX = "text_model.encoder.layers."
QKV_NAMES = ("q_proj", "k_proj", "v_proj")


def clip_l_key_rules(module_keys: Iterable[str]) -> tuple[KeyRule, ...]:
    """Rules for a ``CLIPTextModel``: the HF layout on both sides, under ``text_model.`` in LDM files.

    (transformers 5 drops the ``text_model.`` level from ``CLIPTextModel``'s own keys.)
    """
    return tuple(
        KeyRule(key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key, (key,))
        for key in module_keys
    )


def _open_clip_layer_rule(key: str, layers_prefix: str, what: str) -> KeyRule | None:
    """The rule for one key under ``<layers_prefix>N``; None for k/v (held by q's rule)."""
    index, _, rest = key[len(layers_prefix) :].partition(".")
    layer, _, param = rest.rpartition(".")
    block = f"transformer.resblocks.{index}"
    if layer.startswith("self_attn.") and layer.split(".")[1] in QKV_NAMES:
        if layer != "self_attn.q_proj":
            return None
        module_keys = tuple(f"{layers_prefix}{index}.self_attn.{name}.{param}" for name in QKV_NAMES)
        return KeyRule(f"{block}.attn.in_proj_{param}", module_keys, Transform.SPLIT_QKV)
    for module_name, ldm_name in OPEN_CLIP_LAYERS:
        if layer == module_name:
            return KeyRule(f"{block}.{ldm_name}.{param}", (key,))
    raise ValueError(f"no OpenCLIP name for {what} weight {key!r}")


def open_clip_transformer_rules(
    module_keys: Iterable[str],
    *,
    layers_prefix: str,
    whole_keys: tuple[tuple[str, str, Transform], ...],
    what: str,
) -> tuple[KeyRule, ...]:
    """Rules for a transformers CLIP tower stored in OpenCLIP's layout (text or image encoder).

    Keys under ``layers_prefix`` map onto ``transformer.resblocks.N`` (q/k/v fused);
    the others are renamed by ``whole_keys`` (module key, OpenCLIP key, transform).
    """
    rules: list[KeyRule] = []
    for key in module_keys:
        if key.startswith(layers_prefix):
            rule = _open_clip_layer_rule(key, layers_prefix, what)
            if rule is not None:
                rules.append(rule)
            continue
        for module_key, ldm_key, transform in whole_keys:
            if key == module_key:
                rules.append(KeyRule(ldm_key, (key,), transform))
                break
        else:
            raise ValueError(f"no OpenCLIP name for {what} weight {key!r}")
    return tuple(rules)


def open_clip_key_rules(module_keys: Iterable[str]) -> tuple[KeyRule, ...]:
    """Rules for a ``CLIPTextModelWithProjection`` stored in the OpenCLIP layout."""
    return open_clip_transformer_rules(
        module_keys, layers_prefix=ENCODER_LAYERS_PREFIX, whole_keys=OPEN_CLIP_KEYS, what="text encoder"
    )
