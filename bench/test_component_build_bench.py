"""An offloaded LoRA'd UNet rebuilt on a worker: the whole pipeline (before) against the UNet alone (after).

Tiny SD 1.5 + a LoRA, traced. *Before* is the recipe as it was made until the
UNet could be built alone: the pipeline load naming the whole folder, then the
pipeline's ``load_lora_weights`` and ``set_adapters`` (the text encoder's
recipe, selecting ``unet``). *After* is what the tracer makes now: the
pipeline's index and the UNet's files, the LoRA loaded into the UNet alone.
Each is rebuilt the way a worker does (``engine.rebuild`` from a store), in a
fresh process per build for memory: its peak resident memory over the build
(``VmHWM`` after, with the peak restarted just before the build, minus ``VmRSS``
then) and the bytes of the files the recipe needs. Build times are
pytest-benchmark rounds in this process, one torch thread, interleaved.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_component_build_bench.py -s
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

#: Rebuilds the recipe in argv[2] from the store in argv[1]; prints the build's own peak and time.
BUILDER = """
import json, sys, time
from pathlib import Path
from diffsplit.engine.rebuild import build, store_resolver
from diffsplit.engine.store import ModelStore
from diffsplit.tracer.recipe import Recipe

def status(field):
    line = next(line for line in open('/proc/self/status') if line.startswith(field + ':'))
    return int(line.split()[1]) * 1024

store = ModelStore(Path(sys.argv[1]))
recipe = Recipe.from_json(Path(sys.argv[2]).read_text())
resolve = store_resolver(store)
before = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
start = time.perf_counter()
build(recipe, resolve)
print(json.dumps({"peak_bytes": status('VmHWM') - before, "seconds": time.perf_counter() - start}))
"""


def _recipes(models_dir: Path) -> dict[str, Any]:
    from diffsplit.tracer.fingerprint import fingerprint
    from diffsplit.tracer.session import tracing
    from diffusers import StableDiffusionPipeline

    with tracing() as trace:
        pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
        pipe.load_lora_weights(str(models_dir / "loras" / "tiny-sd15-lora.safetensors"), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.7])
    whole = trace.recipe(pipe.text_encoder).with_select("unet", fingerprint(pipe.unet))
    return {"before (whole pipeline)": whole, "after (UNet alone)": trace.recipe(pipe.unet)}


def _needed_bytes(recipe: Any, models_dir: Path) -> int:
    total = 0
    for step in recipe.steps:
        ref = step.file
        if ref is None:
            continue
        if ref.kind == "dir" and not ref.files:
            folder = models_dir / (ref.folder or "") / ref.name
            total += sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        else:
            total += ref.bytes
    return total


def test_unet_alone_against_the_whole_pipeline(models_dir: Path, tmp_path: Path, benchmark: Any,
                                               one_torch_thread: None) -> None:
    from diffsplit.engine.rebuild import build, store_resolver
    from diffsplit.engine.store import ModelStore

    recipes = _recipes(models_dir)
    rows: dict[str, dict[str, Any]] = {}
    for label, recipe in recipes.items():
        path = tmp_path / f"{len(rows)}.json"
        path.write_text(recipe.to_json())
        runs = []
        for _ in range(3):
            done = subprocess.run([sys.executable, "-c", BUILDER, str(models_dir), str(path)], check=True,
                                  capture_output=True, text=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        rows[label] = {
            "steps": [step.op for step in recipe.steps],
            "recipe_bytes": recipe.size_bytes(),
            "needed_file_bytes": _needed_bytes(recipe, models_dir),
            "peak_bytes": min(run["peak_bytes"] for run in runs),
        }
    store = ModelStore(models_dir)
    resolve = store_resolver(store)
    times: dict[str, list[float]] = {label: [] for label in recipes}
    for _ in range(5):  # interleaved: the same machine state for both
        for label, recipe in recipes.items():
            start = time.perf_counter()
            build(recipe, resolve)
            times[label].append(time.perf_counter() - start)
    after = recipes["after (UNet alone)"]
    benchmark.pedantic(build, args=(after, resolve), rounds=3, iterations=1)
    for label in recipes:
        rows[label]["build_s_best"] = min(times[label])
    before_row, after_row = rows["before (whole pipeline)"], rows["after (UNet alone)"]
    ratios = {
        "file_bytes_after_over_before": after_row["needed_file_bytes"] / before_row["needed_file_bytes"],
        "peak_after_over_before": after_row["peak_bytes"] / before_row["peak_bytes"],
        "build_time_after_over_before": after_row["build_s_best"] / before_row["build_s_best"],
    }
    benchmark.extra_info.update({"rows": rows, **ratios})
    for label, row in rows.items():
        print(f"\n{label}: {row}")
    print({key: round(value, 3) for key, value in ratios.items()})
    assert after_row["needed_file_bytes"] < before_row["needed_file_bytes"]  # what the recipe names
