"""Tracer overhead at full size: ``StableDiffusionPipeline.from_pretrained`` of a full-size SD 1.5 folder.

The tiny set makes loading almost pure Python (construction and config handling), which is where
a ``sys.setprofile`` recorder costs most; at full size the same Python work sits beside reading and
copying 2.13 GB of weights. A full-size SD 1.5 with seeded random weights (the published configs,
``gpu_check_models.full_checkpoint_parts`` in fp16) is written as a diffusers folder in a child
process, then loaded traced and untraced in interleaved rounds (fastest of each), and under a
no-op profile function (the floor of any profiler that sees every call). Sampling is not timed
here: the recorder is off inside module forwards, which is nearly all of a full-size step (the
tiny set's sampler-loop figure in ``test_tracer_bench.py`` bounds it). Skipped where memory or
disk is short. Nothing here asserts a timing.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_tracer_full_size_bench.py -s
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/meminfo")

NEEDED_MEMORY_BYTES = 12 << 30
NEEDED_DISK_BYTES = 5 << 30
ROUNDS = 3
_BENCH = Path(__file__).resolve().parent

#: Builds the full-size SD 1.5 parts on the CPU and saves them as a diffusers pipeline folder.
WRITER = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from gpu_check_models import full_checkpoint_parts
from diffusers import DDIMScheduler, StableDiffusionPipeline

parts = full_checkpoint_parts("sd15", torch.device("cpu"), torch.float16)
scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
pipe = StableDiffusionPipeline(vae=parts.vae.model, text_encoder=parts.clip.encoders[0],
                               tokenizer=parts.clip.tokenizers[0], unet=parts.model.unet,
                               scheduler=scheduler, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False)
pipe.save_pretrained(sys.argv[1], safe_serialization=True)
"""


@pytest.fixture(scope="module")
def full_sd15(tmp_path_factory: pytest.TempPathFactory, require_room: Any) -> Path:
    folder = tmp_path_factory.mktemp("full") / "sd15"
    require_room(folder.parent, NEEDED_MEMORY_BYTES, NEEDED_DISK_BYTES)
    subprocess.run([sys.executable, "-c", WRITER, str(folder), str(_BENCH)], check=True,
                   capture_output=True, text=True)
    return folder


def test_full_size_from_pretrained_overhead(
    benchmark: Any, capsys: Any, full_sd15: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full-size folder loaded in fp16, traced vs untraced vs under a no-op profile function.

    A traced load also moves every weight mapped from its file at an unaligned address into owned,
    aligned memory (``tracer.owned_memory``: results then depend on values only, here and on the
    worker), which an untraced load leaves mapped and lazily read; ``recorder_only_ratio`` is the
    traced load with that copy switched off, the recorder's own share.
    """
    sys.path.insert(0, str(_BENCH))
    from test_tracer_bench import interleaved_best, report, traced, under_noop_profile

    def load() -> None:
        pipe = StableDiffusionPipeline.from_pretrained(str(full_sd15), torch_dtype=torch.float16)
        del pipe
        gc.collect()

    base, with_tracer = interleaved_best(load, traced(load), rounds=ROUNDS)
    _, floor = interleaved_best(load, under_noop_profile(load), rounds=ROUNDS)
    benchmark.pedantic(traced(load), rounds=1, iterations=1)
    from diffsplit.tracer import session

    monkeypatch.setattr(session, "own_weights", lambda value: 0)
    _, recorder_only = interleaved_best(load, traced(load), rounds=ROUNDS)
    weights = sum(path.stat().st_size for path in full_sd15.rglob("*.safetensors"))
    report(
        benchmark,
        capsys,
        "full-size from_pretrained",
        weight_bytes=weights,
        untraced_s=base,
        traced_s=with_tracer,
        ratio=with_tracer / base,
        noop_profile_ratio=floor / base,
        recorder_only_ratio=recorder_only / base,
    )
