"""The cost of weights in owned memory: load time and peak memory, owned against mapped.

Every tensor read from a ``.safetensors`` file is copied out of the file's
mapping into allocator-owned, 64-byte aligned memory
(``diffsplit.tracer.owned_memory``), so results never depend on the file's byte
offsets. The baseline is the same load with that copy skipped (the tensors
stay views of the mapping), in the same run; peak memory is each variant's
peak resident memory during a second load in a fresh process (``VmHWM``
restarted through ``/proc/self/clear_refs``; Linux only), above the resident
memory just before it. Figures go to
``benchmark.extra_info`` and are printed; nothing here asserts a timing.

    .venv/bin/python -m pytest bench/test_owned_weights_bench.py -q -s --benchmark-columns=min,median
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.models import ldm_keys
from diffsplit.engine.models.checkpoint import load_checkpoint

ROUNDS = 7
CHECKPOINTS = ("tiny-sd15", "tiny-sdxl")

_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from diffsplit.engine.models import ldm_keys
from diffsplit.engine.models.checkpoint import load_checkpoint
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
if sys.argv[2] == "mapped":
    ldm_keys.owned_tensor = lambda tensor, force=False: tensor
load_checkpoint(Path(sys.argv[1]))  # warm: imports, tokenizer files, first-use allocations
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from now
parts = load_checkpoint(Path(sys.argv[1]))
peak, after = status("VmHWM"), status("VmRSS")
size = sum(t.numel() * t.element_size() for m in (parts.model.unet, parts.vae.model, *parts.clip.encoders)
           for t in m.state_dict().values())
print(json.dumps({"peak_growth_kib": peak - before, "kept_kib": after - before, "weights_kib": size // 1024}))
"""


def _timed(function: Any) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _peak(path: Path, variant: str) -> dict[str, int]:
    completed = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), variant],
                               capture_output=True, text=True, timeout=300, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_owned_load_against_mapped_load(benchmark: Any, models_dir: Path, name: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = models_dir / "checkpoints" / f"{name}.safetensors"
    owned_copy = ldm_keys.owned_tensor

    def mapped_load() -> Any:
        with monkeypatch.context() as patch:
            patch.setattr(ldm_keys, "owned_tensor", lambda tensor, force=False: tensor)
            return load_checkpoint(path)

    owned_times, mapped_times = [], []
    for _ in range(ROUNDS):  # interleaved, so both variants see the same machine state
        owned_times.append(_timed(lambda: load_checkpoint(path)))
        mapped_times.append(_timed(mapped_load))
    owned_parts, mapped_parts = load_checkpoint(path), mapped_load()
    for mine, theirs in zip(owned_parts.model.unet.state_dict().values(),
                            mapped_parts.model.unet.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    assert ldm_keys.owned_tensor is owned_copy
    owned, mapped = sorted(owned_times)[ROUNDS // 2], sorted(mapped_times)[ROUNDS // 2]
    peak_owned, peak_mapped = _peak(path, "owned"), _peak(path, "mapped")
    info = {
        "load_owned_s": owned, "load_mapped_s": mapped, "load_ratio": owned / mapped,
        "peak_owned_kib": peak_owned["peak_growth_kib"], "peak_mapped_kib": peak_mapped["peak_growth_kib"],
        "peak_ratio": peak_owned["peak_growth_kib"] / max(peak_mapped["peak_growth_kib"], 1),
        "weights_kib": peak_owned["weights_kib"],
        "kept_owned_kib": peak_owned["kept_kib"], "kept_mapped_kib": peak_mapped["kept_kib"],
    }
    benchmark.extra_info.update(info)
    benchmark.pedantic(load_checkpoint, args=(path,), rounds=3, iterations=1)
    print(f"\n{name}: load owned/mapped {info['load_ratio']:.2f}x (median {owned * 1e3:.1f} ms vs "
          f"{mapped * 1e3:.1f} ms); peak RSS growth owned/mapped {info['peak_ratio']:.2f}x "
          f"({info['peak_owned_kib']} KiB vs {info['peak_mapped_kib']} KiB; "
          f"weights {info['weights_kib']} KiB)")
    print(f"{name}: resident after the load owned {info['kept_owned_kib']} KiB, "
          f"mapped {info['kept_mapped_kib']} KiB")
