"""Deterministic probes of model objects, and a script that rebuilds recipes in a fresh process.

A probe runs an object on fixed, seeded inputs (a pipeline generates an image,
a MODEL samples a latent, a CLIP encodes a prompt, a VAE decodes, a ControlNet
computes its residuals) with one CPU thread, so two objects with the same
weights give bit-identical probe outputs.

As a script: ``python tracer_probes.py RECIPES.json MODELS_DIR OUT.pt`` builds
every recipe in RECIPES.json (``{name: recipe dict}``) from MODELS_DIR with
``engine.rebuild.build`` and saves ``{name: probe output}`` to OUT.pt.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run with one torch thread (results then do not depend on the machine's core count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Context:
    node_id = "probe"

    def progress(self, step: int, total: int) -> None:
        pass


def _seeded(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def probe_pipeline(pipe: Any) -> torch.Tensor:
    """Two denoising steps of a 64×64 image for "a cat", seed 0."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    result = pipe("a cat", num_inference_steps=2, height=64, width=64, generator=generator, output_type="pt")
    return result.images


def probe_diffusion_model(model: Any) -> torch.Tensor:
    """Three euler steps of the engine's KSampler on seeded conditioning."""
    from diffsplit.engine.nodes.sampling import ksampler

    width = model.unet.config.cross_attention_dim
    positive = [[_seeded((1, 77, width), 1), {}]]
    negative = [[_seeded((1, 77, width), 2), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (samples,) = ksampler(
        _Context(),
        model=model,
        seed=7,
        steps=3,
        cfg=5.0,
        sampler_name="euler",
        scheduler="normal",
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )
    return samples["samples"]


def probe_text_encoders(clip: Any) -> torch.Tensor:
    """The engine's CLIPTextEncode of "a watercolor fox"."""
    from diffsplit.engine.nodes.conditioning import clip_text_encode

    (conditioning,) = clip_text_encode(_Context(), text="a watercolor fox", clip=clip)
    return conditioning[0][0]


def probe_vae(vae: Any) -> torch.Tensor:
    """The engine's VAE decode of a seeded latent."""
    from diffsplit.engine.nodes.latent import vae_decode

    return vae_decode(vae, _seeded((1, 4, 8, 8), 3))


def probe_controlnet(controlnet: Any) -> torch.Tensor:
    """The ControlNet's residuals for seeded inputs, concatenated."""
    model = controlnet.model
    width = model.config.cross_attention_dim
    down, mid = model(
        _seeded((1, 4, 8, 8), 4),
        torch.tensor([500]),
        encoder_hidden_states=_seeded((1, 77, width), 5),
        controlnet_cond=torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)),
        return_dict=False,
    )
    return torch.cat([tensor.flatten() for tensor in (*down, mid)])


def probe_unet(unet: Any) -> torch.Tensor:
    """A UNet forward on seeded inputs."""
    width = unet.config.cross_attention_dim
    return unet(_seeded((1, 4, 8, 8), 8), 10, _seeded((1, 77, width), 9)).sample


def probe(value: Any) -> torch.Tensor:
    """The probe for ``value``'s kind, run with one thread and no autograd."""
    from diffsplit.engine.types import ControlNet, DiffusionModel, TextEncoders, Vae

    probes = (
        (DiffusionModel, probe_diffusion_model),
        (TextEncoders, probe_text_encoders),
        (Vae, probe_vae),
        (ControlNet, probe_controlnet),
    )
    with one_thread(), torch.no_grad():
        for kind, function in probes:
            if isinstance(value, kind):
                return function(value)
        if hasattr(value, "components"):
            return probe_pipeline(value)
        return probe_unet(value)


def main(recipes_path: str, models_dir: str, out_path: str) -> None:
    """Rebuild every recipe of ``recipes_path`` from ``models_dir`` and save the probes."""
    from diffsplit.engine.nodes.registry import default_registry
    from diffsplit.engine.rebuild import build, store_resolver
    from diffsplit.engine.store import ModelStore
    from diffsplit.tracer.recipe import Recipe

    recipes = json.loads(Path(recipes_path).read_text())
    resolver = store_resolver(ModelStore(models_dir))
    registry = default_registry()
    outputs = {}
    for name, data in recipes.items():
        rebuilt = build(Recipe.from_dict(data), resolver, registry=registry)
        outputs[name] = probe(rebuilt)
    torch.save(outputs, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
