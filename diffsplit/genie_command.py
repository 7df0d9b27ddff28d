"""``diffsplit genie distill``: train a GENIE head for a checkpoint on its own trajectories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.genie_head import GenieHeadConfig

#: Prompts whose conditioning the trajectories are drawn with when none are given.
DEFAULT_PROMPTS = ("a photo of a cat", "a landscape painting", "a portrait, studio light", "")


def add_genie_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``genie`` command and its ``distill`` subcommand."""
    sub = parser.add_subparsers(dest="genie_command", required=True)
    distill = sub.add_parser(
        "distill", help="train a GENIE head (the genie_head sampler) for a checkpoint",
        description="Draws DDIM trajectories of the checkpoint (guided by --cfg, conditioned on --prompt), "
        "computes the exact curvature at every point by JVP and fits a small head to it. An interrupted run "
        "leaves OUT.partial.safetensors and resumes from it when started again with the same options. "
        "Put the head in the models folder's genie_heads/ and load it with GenieHeadLoader.",
    )
    distill.add_argument("--ckpt", required=True, type=Path, help="a single-file SD 1.x / SDXL checkpoint")
    distill.add_argument("--out", required=True, type=Path, help="the head file to write (.safetensors)")
    distill.add_argument("--iterations", type=int, default=300, help="training iterations (default 300)")
    distill.add_argument("--trajectories", type=int, default=8, help="trajectories drawn (default 8)")
    distill.add_argument("--steps", type=int, default=10, help="points per trajectory (default 10)")
    distill.add_argument("--cfg", type=float, default=5.0, help="guidance scale of the trajectories")
    distill.add_argument("--size", type=int, default=256, help="image side in pixels (latent side x8)")
    distill.add_argument("--hidden", type=int, default=32, help="the head's feature width (default 32)")
    distill.add_argument("--prompt", action="append", help="a prompt (repeatable; default: a few stock ones)")
    distill.add_argument("--seed", type=int, default=0)


def distill_command(args: argparse.Namespace) -> int:
    """Run ``genie distill`` with a progress bar; returns the exit code."""
    import torch

    from diffsplit.engine.models.checkpoint import load_checkpoint
    from diffsplit.engine.nodes.conditioning import clip_text_encode
    from diffsplit.engine.sampling.denoiser import CFGDenoiser
    from diffsplit.engine.sampling.genie_distill import DistillSettings, distill, partial_path
    from diffsplit.progress import ProgressPrinter

    if args.out.suffix != ".safetensors":
        print(f"--out {args.out}: a head is written as .safetensors", file=sys.stderr)
        return 2
    if args.size % 8 or not 8 <= args.size <= 2048:
        print(f"--size {args.size}: must be a multiple of 8 in [8, 2048]", file=sys.stderr)
        return 2
    try:
        parts = load_checkpoint(args.ckpt)
    except ModelFileError as exc:
        print(f"--ckpt: {exc}", file=sys.stderr)
        return 1
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    side = args.size // 8
    channels = int(parts.model.unet.config.in_channels)
    negative = clip_text_encode(None, text="", clip=parts.clip)[0]  # type: ignore[arg-type]
    positives = [clip_text_encode(None, text=prompt, clip=parts.clip)[0] for prompt in prompts]  # type: ignore[arg-type]
    sampling = parts.model.sampling.sigmas()
    try:
        settings = DistillSettings(
            iterations=args.iterations, trajectories=args.trajectories, sampling_steps=args.steps,
            latent_shape=(channels, side, side), seed=args.seed, sigma_min=float(sampling[0]),
            sigma_max=float(sampling[-1]), head=GenieHeadConfig(hidden=args.hidden),
        )
    except ValueError as exc:
        print(f"genie distill: {exc}", file=sys.stderr)
        return 2
    shape = (1, channels, side, side)
    denoisers = [CFGDenoiser.build(parts.model, cond, negative, args.cfg, shape) for cond in positives]
    printer = ProgressPrinter()
    resuming = partial_path(args.out).exists()
    printer.message(f"distilling a GENIE head for {args.ckpt.name}: {settings.trajectories} trajectories x "
                    f"{settings.sampling_steps} points, {settings.iterations} iterations"
                    + (f" (resuming from {partial_path(args.out).name})" if resuming else ""))
    with torch.random.fork_rng(devices=[]):
        try:
            result = distill(denoisers, args.out, settings,
                             progress=lambda step, total, loss: printer.step("distill", step, total))
        except ValueError as exc:
            print(f"genie distill: {exc}", file=sys.stderr)
            return 1
    loss = f", final relative loss {result.losses[-1]:.4f}" if result.losses else ""
    printer.message(f"wrote {result.path}{loss}")
    return 0
