"""GenieHeadLoader: a MODEL with a distilled GENIE head attached, for the ``genie_head`` sampler.

A loader node like LoraLoaderModelOnly: its output's recipe is the base
model's plus the head file (by sha256), so a worker rebuilds base + head and
the fingerprint (which covers the head) is checked there.
"""

from __future__ import annotations

import dataclasses

from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.genie_head import GENIE_HEAD_FOLDER, load_genie_head
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.types import DiffusionModel


def genie_head_loader(ctx: NodeContext, *, model: DiffusionModel, head_name: str) -> tuple[DiffusionModel]:
    """A new MODEL: ``model`` with the head ``head_name`` (its latent channels must match the UNet's)."""
    head = load_genie_head(ctx.model_path(GENIE_HEAD_FOLDER, head_name))
    channels = getattr(getattr(model.unet, "config", None), "in_channels", None)
    if channels is not None and head.config.channels != channels:
        raise ModelFileError(
            f"node {ctx.node_id} (GenieHeadLoader): {head_name} is for {head.config.channels}-channel "
            f"latents, the model's UNet takes {channels}"
        )
    return (dataclasses.replace(model, genie_head=head),)


GENIE_HEAD_LOADER = NodeClass(
    name="GenieHeadLoader",
    inputs=(InputSpec("model", "MODEL"), InputSpec("head_name", "COMBO", model_folder=GENIE_HEAD_FOLDER)),
    outputs=(OutputSpec("MODEL", "MODEL"),),
    function=genie_head_loader,
    category="loaders",
    is_loader=True,
    description="Attach a distilled GENIE head (diffsplit genie distill) for the genie_head sampler.",
)

NODES: tuple[NodeClass, ...] = (GENIE_HEAD_LOADER,)
