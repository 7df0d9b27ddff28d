"""The execution cache notices files replaced under the same name (ComfyUI's IS_CHANGED)."""

from __future__ import annotations

import os
from pathlib import Path

from diffsplit.engine.execution_cache import ExecutionCache
from diffsplit.engine.executor import Executor
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from PIL import Image


def test_an_input_image_replaced_under_the_same_name_is_read_again(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    inputs.mkdir()
    picture = inputs / "photo.png"
    Image.new("RGB", (16, 16), "black").save(picture)
    registry = default_registry()
    workflow = load_workflow({
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }, registry)
    executor = Executor(registry, None, inputs_dir=inputs, output_dir=tmp_path / "out", max_workers=1)
    cache = ExecutionCache()
    first = executor.run(workflow, cache=cache)
    unchanged = executor.run(workflow, cache=cache)
    assert unchanged.executed == ("3",), "nothing changed: only the output node runs"
    Image.new("RGB", (16, 16), "white").save(picture)
    stat = picture.stat()
    os.utime(picture, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    replaced = executor.run(workflow, cache=cache)
    assert replaced.executed == ("1", "2", "3")
    assert float(first.outputs["2"][0].mean()) == 1.0 and float(replaced.outputs["2"][0].mean()) == 0.0
