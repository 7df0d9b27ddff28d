"""Offload with no trace: LoRA adapters loaded outside any trace travel once by content, split == local.

Real worker processes on loopback; the worker's store holds the tiny SD 1.5 folder only (no LoRA), so
the adapter can only reach it by content, into its content cache and never its store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsplit.engine.call_offload import OffloadError
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_errors import BadRequest, MissingModel, error_from_reply
from diffsplit.transport.worker_ops import UploadChunk
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

import diffsplit

from .test_bounded_work import started_worker

PROMPT = "a cat in a hat"
LORA = "tiny-sd15-lora.safetensors"


def generate(pipe: StableDiffusionPipeline, seed: int = 0) -> np.ndarray:
    result = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                  output_type="np", height=64, width=64)
    return result.images


@pytest.fixture(scope="module")
def store(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A worker store with the SD 1.5 folder only: no LoRA file at all."""
    root = tmp_path_factory.mktemp("worker-store")
    (root / "diffusers").mkdir()
    (root / "diffusers" / "tiny-sd15").symlink_to(models_dir / "diffusers" / "tiny-sd15")
    (root / "loras").mkdir()
    return root


@pytest.fixture(scope="module")
def uploading_worker(store: Path) -> Iterator[str]:
    with started_worker(store, "--allow-upload", "--insecure") as address:
        yield address


def untraced_pipeline(models_dir: Path) -> StableDiffusionPipeline:
    """Loaded from a folder, then two adapters added with no trace around: a LoRA file and a fresh one."""
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(models_dir / "loras" / LORA), adapter_name="style")
    torch.manual_seed(3)  # the fresh adapter's random (non-zero) weights
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_k", "to_out.0"],
                                     init_lora_weights=False), adapter_name="detail")
    pipe.unet.set_adapters(["style", "detail"], weights=[0.7, 1.3])
    return pipe


def test_untraced_adapters_travel_by_content_and_split_equals_local(
    models_dir: Path, store: Path, uploading_worker: str
) -> None:
    pipe = untraced_pipeline(models_dir)
    local = generate(pipe)
    with diffsplit.offload(pipe, "unet", to=uploading_worker) as handle:
        split = generate(pipe)
    np.testing.assert_array_equal(local, split)
    assert handle.sender.uploads == 2  # one file per adapter, once
    assert list((store / "loras").iterdir()) == []  # never into the user's store
    with diffsplit.offload(pipe, "unet", to=uploading_worker) as again:
        np.testing.assert_array_equal(local, generate(pipe))
    assert again.sender.uploads == 0  # the worker's content cache kept them


def test_other_adapter_weights_give_another_recipe_and_still_equal_local(
    models_dir: Path, uploading_worker: str
) -> None:
    pipe = untraced_pipeline(models_dir)
    pipe.unet.set_adapters(["detail"], weights=[0.25])  # only one active, at another weight
    local = generate(pipe)
    with diffsplit.offload(pipe, "unet", to=uploading_worker):
        split = generate(pipe)
    np.testing.assert_array_equal(local, split)
    pipe.unet.set_adapters(["style", "detail"], weights=[0.7, 1.3])
    assert not np.array_equal(local, generate(pipe)), "the weights change the image: the check can fail"


def test_a_worker_that_takes_no_uploads_says_which_adapter_it_lacks(
    models_dir: Path, store: Path
) -> None:
    pipe = untraced_pipeline(models_dir)
    with (started_worker(store, "--insecure") as address, diffsplit.offload(pipe, "unet", to=address),
          pytest.raises(OffloadError) as caught):
        generate(pipe)
    assert isinstance(caught.value, MissingModel) and caught.value.name.startswith("loras/")
    assert "uploads are off" in str(caught.value)


def test_fused_adapters_and_whole_pipelines_are_refused_before_anything_is_sent(models_dir: Path) -> None:
    pipe = untraced_pipeline(models_dir)
    with pytest.raises(OffloadError, match="LoRA adapters are loaded"):
        diffsplit.offload(pipe, to="tcp://127.0.0.1:9")  # an unreachable worker: nothing could be asked
    pipe.unet.fuse_lora(adapter_names=["style"])
    with pytest.raises(OffloadError, match="fused"):
        diffsplit.offload(pipe, "unet", to="tcp://127.0.0.1:9")
    assert "forward" not in vars(pipe.unet)


def test_content_uploads_are_named_by_their_hash_and_land_outside_the_store(
    store: Path, uploading_worker: str
) -> None:
    data = b"not an adapter"
    import hashlib

    sha256 = hashlib.sha256(data).hexdigest()
    misnamed = UploadChunk(folder="loras", name="other.safetensors", sha256=sha256, total_bytes=len(data),
                           offset=0, data=bytearray(data), final=True, content=True)
    elsewhere = UploadChunk(folder="checkpoints", name=f"{sha256}.safetensors", sha256=sha256,
                            total_bytes=len(data), offset=0, data=bytearray(data), final=True, content=True)
    with Client(uploading_worker) as client:
        for chunk in (misnamed, elsewhere):
            error = error_from_reply(client.request(chunk.header(), timeout=30))
            assert isinstance(error, BadRequest) and "content" in error.message
        good = UploadChunk(folder="loras", name=f"{sha256}.safetensors", sha256=sha256, total_bytes=len(data),
                           offset=0, data=bytearray(data), final=True, content=True)
        assert client.request(good.header(), timeout=30)["op"] == "result"
    assert list((store / "loras").iterdir()) == []


def test_the_content_cache_is_a_temporary_folder_gone_when_the_worker_stops_or_fails_to_start(
    store: Path, tmp_path: Path
) -> None:
    import tempfile

    from diffsplit.remote.worker import Worker, WorkerConfig

    def content_folders() -> set[str]:
        return {path.name for path in Path(tempfile.gettempdir()).glob("diffsplit-content-*")}

    before = content_folders()
    worker = Worker(WorkerConfig(models=store, listen="tcp://127.0.0.1:*", index_at_start=False))
    assert worker.content.root.name in content_folders() - before
    worker.stop()
    worker.serve()  # returns at once: stopped before it served
    assert content_folders() == before
    with pytest.raises(Exception, match="batch"):
        Worker(WorkerConfig(models=store, listen="tcp://127.0.0.1:*", index_at_start=False, batch_max=-1))
    assert content_folders() == before
    given = tmp_path / "kept"
    worker = Worker(WorkerConfig(models=store, listen="tcp://127.0.0.1:*", index_at_start=False,
                                 content_dir=given))
    worker.stop()
    worker.serve()
    assert given.is_dir()  # a folder the user named stays
