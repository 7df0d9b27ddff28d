"""Checkpoint loading: the cost of copying every file tensor into owned memory, against the mapped load.

``load_checkpoint`` copies each tensor it reads from a ``.safetensors`` file out
of the file's mapping into fresh allocator-owned memory
(``owned_tensor(..., force=True)`` in ``diffsplit.engine.models.ldm_keys``). The
baseline is the same load with that copy skipped: ``ldm_keys.owned_tensor``
patched to the identity for the baseline only, so its tensors stay views of the
mapping. Both are measured in the same run, on ``tiny-sd15`` of the tiny model
set and on ``sd15-wide``, an SD1.5-architecture checkpoint with a wider UNet
(about 220 MiB) written here.

Load time: the median of interleaved rounds (after a sanity load of each
variant), with one torch thread: the copy is torch's only parallel work in the
load, and with two threads while another process held one of this machine's two
cores it measured 17x slower than the baseline instead of 2x (OpenMP threads
waiting on a descheduled peer). Minor page faults per load (the owned copy
faults in fresh pages) are recorded too.

Peak memory: each variant loads once in a fresh process (imports and tokenizer
done first), which prints its peak resident memory during the load above its
resident memory just before it: ``VmHWM`` of ``/proc/self/status``, restarted
from the current size through ``/proc/self/clear_refs``. Not ``ru_maxrss``:
Linux carries the parent's peak across ``exec``, so a child of this pytest
process starts with ``ru_maxrss`` at pytest's size and a smaller load shows as
0 KiB. The baseline's figure counts only the mapped pages its load touched.
What stays resident after the load is split into anonymous memory (the owned
copies) and file-backed pages (the baseline's mapping, which the kernel can
drop).

Ratios are owned / baseline; every figure goes to ``benchmark.extra_info`` and
is printed. Nothing here asserts a timing.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_loading_bench.py -s
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.models import ldm_keys
from diffsplit.engine.models.checkpoint import CheckpointParts, load_checkpoint, save_checkpoint
from diffsplit.engine.models.tiny import reinitialize, tiny_checkpoint_parts, tiny_unet_config
from diffsplit.engine.types import DiffusionModel
from diffsplit.tracer.owned_memory import is_owned
from diffusers import UNet2DConditionModel

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps and status")

ROUNDS = 7
CHECKPOINTS = ("tiny-sd15", "sd15-wide")

#: The tiny set's SD1.5 UNet, 6x wider (54M parameters instead of 1.6M); CLIP-L and VAE as in tiny-sd15.
WIDE_UNET = {**tiny_unet_config("sd15"), "block_out_channels": (192, 384)}

_PEAK_SCRIPT = """
import gc, json, sys
from pathlib import Path
from diffsplit.engine.models import ldm_keys
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.models.tokenizers import clip_tokenizer
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
path, variant = Path(sys.argv[1]), sys.argv[2]
if variant == "baseline":
    ldm_keys.owned_tensor = lambda t, force=False: t
clip_tokenizer("clip_l")  # memoized: its first-use cost stays out of the load
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current VmRSS
before, anon, file = status("VmRSS"), status("RssAnon"), status("RssFile")
parts = load_checkpoint(path)
peak, after = status("VmHWM"), status("VmRSS")
print(json.dumps({"peak_growth_kib": peak - before, "kept_kib": after - before, "before_kib": before,
                  "kept_anon_kib": status("RssAnon") - anon, "kept_file_kib": status("RssFile") - file}))
"""


@pytest.fixture(scope="module")
def checkpoints(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The checkpoints measured: tiny-sd15 of the tiny set and a wider SD1.5 one, written once."""
    parts = tiny_checkpoint_parts("sd15", seed=0)
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel(**WIDE_UNET)
    reinitialize(unet, torch.Generator().manual_seed(0))
    wide = tmp_path_factory.mktemp("wide") / "sd15-wide.safetensors"
    save_checkpoint(wide, CheckpointParts(model=DiffusionModel(unet=unet, family="sd15"),
                                          clip=parts.clip, vae=parts.vae))
    return {"tiny-sd15": models_dir / "checkpoints" / "tiny-sd15.safetensors", "sd15-wide": wide}


def _tensors(parts: CheckpointParts) -> Iterator[tuple[str, torch.Tensor]]:
    modules = {"unet": parts.model.unet, "vae": parts.vae.model}
    modules.update({f"clip{index}": encoder for index, encoder in enumerate(parts.clip.encoders)})
    for prefix, module in modules.items():
        for key, tensor in module.state_dict().items():
            yield f"{prefix}.{key}", tensor


def _maps(path: Path) -> bool:
    """Whether this process has ``path`` mapped."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _timed(function: Callable[[], Any]) -> tuple[float, int]:
    """Seconds and minor page faults of one call."""
    gc.collect()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    function()
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def _peak(path: Path, variant: str) -> dict[str, int]:
    completed = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), variant],
                               capture_output=True, text=True, timeout=120, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_load_owned_against_baseline(benchmark: Any, checkpoints: dict[str, Path], name: str,
                                     monkeypatch: pytest.MonkeyPatch, one_torch_thread: None) -> None:
    path = checkpoints[name]
    owned_copy = ldm_keys.owned_tensor

    def owned_load() -> CheckpointParts:
        return load_checkpoint(path)

    def baseline_load() -> CheckpointParts:
        with monkeypatch.context() as patch:
            patch.setattr(ldm_keys, "owned_tensor", lambda t, force=False: t)
            return load_checkpoint(path)

    # Sanity: equal values; the owned load keeps no mapping and is aligned, the baseline is still mapped.
    owned_parts = owned_load()
    gc.collect()
    assert not _maps(path)
    assert all(is_owned(tensor) for _, tensor in _tensors(owned_parts))
    baseline_parts = baseline_load()
    assert _maps(path), "the baseline load copied its tensors out of the file"
    assert ldm_keys.owned_tensor is owned_copy
    owned_state, baseline_state = dict(_tensors(owned_parts)), dict(_tensors(baseline_parts))
    assert owned_state.keys() == baseline_state.keys()
    for key, tensor in owned_state.items():
        assert torch.equal(tensor, baseline_state[key]), key
    del owned_parts, baseline_parts, owned_state, baseline_state

    owned_times, baseline_times = [], []
    for round_index in range(ROUNDS):  # interleaved, alternating which goes first
        pair = (owned_load, baseline_load) if round_index % 2 == 0 else (baseline_load, owned_load)
        for load in pair:
            (owned_times if load is owned_load else baseline_times).append(_timed(load))
    owned, baseline = (statistics.median(seconds for seconds, _ in owned_times),
                       statistics.median(seconds for seconds, _ in baseline_times))
    owned_faults, baseline_faults = (int(statistics.median(faults for _, faults in owned_times)),
                                     int(statistics.median(faults for _, faults in baseline_times)))
    benchmark.pedantic(owned_load, rounds=3, iterations=1, warmup_rounds=1)

    peak_owned, peak_baseline = _peak(path, "owned"), _peak(path, "baseline")
    owned_kib, baseline_kib = peak_owned["peak_growth_kib"], peak_baseline["peak_growth_kib"]
    file_kib = path.stat().st_size // 1024
    info = {
        "checkpoint": name, "file_kib": file_kib, "rounds": ROUNDS,
        "torch_threads": torch.get_num_threads(),
        "load_owned_median_s": owned, "load_baseline_median_s": baseline, "load_ratio": owned / baseline,
        "minor_faults_owned": owned_faults, "minor_faults_baseline": baseline_faults,
        "peak_owned_kib": owned_kib, "peak_baseline_kib": baseline_kib,
        "peak_ratio": owned_kib / max(baseline_kib, 1),
        "kept_owned_kib": peak_owned["kept_kib"], "kept_baseline_kib": peak_baseline["kept_kib"],
        "kept_owned_anon_kib": peak_owned["kept_anon_kib"],
        "kept_owned_file_kib": peak_owned["kept_file_kib"],
        "kept_baseline_anon_kib": peak_baseline["kept_anon_kib"],
        "kept_baseline_file_kib": peak_baseline["kept_file_kib"],
    }
    benchmark.extra_info.update(info)
    print(f"\n{name} ({file_kib} KiB file) load owned/baseline: {info['load_ratio']:.2f}x "
          f"(median {owned * 1e3:.1f} ms vs {baseline * 1e3:.1f} ms; {ROUNDS} interleaved rounds, "
          f"1 torch thread; minor page faults {owned_faults} vs {baseline_faults})")
    print(f"{name} peak RSS growth owned/baseline: {info['peak_ratio']:.2f}x "
          f"({owned_kib} KiB vs {baseline_kib} KiB; VmHWM in a fresh process)")
    print(f"{name} resident after the load: owned {info['kept_owned_kib']} KiB "
          f"(anon {info['kept_owned_anon_kib']}, file {info['kept_owned_file_kib']}), "
          f"baseline {info['kept_baseline_kib']} KiB "
          f"(anon {info['kept_baseline_anon_kib']}, file {info['kept_baseline_file_kib']})")
