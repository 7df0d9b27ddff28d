"""What one request may make a real worker do: memory, node input ranges, steps, pixels, batch, queue share.

Each request here is one an attacker sent to a real ``diffsplit worker``: a
few hundred bytes asking for gigabytes (zero tensors described by shape), node
inputs far outside their declared ranges, work beyond the worker's caps, one
client filling the whole queue. The worker must refuse each with a clear
BadRequest (or Overloaded) before it allocates or runs anything, and keep
serving.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.models.tiny_upscale import TINY_ESRGAN_FILE
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.engine.types import UpscaleModel
from diffsplit.engine.wire_values import HELD, ZEROS, WireValueError, decoded_bytes
from diffsplit.remote.errors import BadRequest
from diffsplit.remote.work_limits import WorkLimits, check_node_inputs, check_pipeline_call
from diffsplit.transport.sockets import Client

from diffsplit.demo import READY_PREFIX, stop_process

GIB = 1 << 30
#: The caps of the ``capped`` worker: 512² pixels, 4 images, 50 steps, 2 GiB / 1000 per request.
CAPS = ("--max-steps", "50", "--max-pixels", str(512 * 512), "--max-batch", "4", "--max-request-gb", "0.002")
CAPPED = WorkLimits(max_request_bytes=int(0.002 * GIB), max_steps=50, max_pixels=512 * 512, max_batch=4)


@contextmanager
def started_worker(models: Path, *extra: str) -> Iterator[str]:
    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models),
               "--listen", "tcp://127.0.0.1:*", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        yield line[len(READY_PREFIX):].split()[0]
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def default_worker(models_dir: Path) -> Iterator[str]:
    """A worker with the default limits."""
    with started_worker(models_dir) as address:
        yield address


@pytest.fixture(scope="module")
def capped_worker(models_dir: Path) -> Iterator[str]:
    """A worker with small caps (``CAPS``)."""
    with started_worker(models_dir, *CAPS) as address:
        yield address


def zeros(*shape: int, dtype: str = "float32") -> dict[str, Any]:
    return {ZEROS: {"shape": list(shape), "dtype": dtype}}


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"op": "run_node", "node": {"id": "9", "class_type": class_type}, "inputs": inputs}


def model_recipe(models_dir: Path, document: dict, node_id: str, output: int = 0) -> dict[str, Any]:
    registry = default_registry()
    workflow = load_workflow(document, registry)
    return output_recipe_source(workflow, registry, ModelStore(models_dir))(node_id, output)


def sampler_inputs(models_dir: Path, steps: Any) -> dict[str, Any]:
    conditioning = [[torch.zeros(1, 77, 64), {}]]
    return {
        "model": {"$ds:model": model_recipe(models_dir, sd15_workflow(lora=False), "1")}, "seed": 1,
        "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "positive": conditioning,
        "negative": conditioning, "latent_image": {"samples": zeros(1, 4, 8, 8)}, "denoise": 1.0,
    }


def refusal(reply: dict[str, Any], kind: str = "BadRequest") -> str:
    assert reply["op"] == "error", f"expected a refusal, got {reply['op']}"
    assert reply["error"]["kind"] == kind, reply["error"]
    return str(reply["error"]["message"])


# memory: one budget over every descriptor, frame and held value of a request


def test_three_2_gib_zero_descriptors_in_one_small_request_are_refused(default_worker: str) -> None:
    bomb = node("ImageInvert", image=[zeros(512, 1024, 1024) for _ in range(3)])  # 2 GiB each, 6 GiB in all
    with Client(default_worker) as client:
        message = refusal(client.request(bomb, timeout=60))
        assert "6.00 GiB" in message and "budget of 4.00 GiB" in message and "--max-request-gb" in message
        assert client.request({"op": "hello"}, timeout=10)["op"] == "result"


def test_a_thousand_small_zero_descriptors_are_summed(default_worker: str) -> None:
    bomb = node("ConditioningZeroOut", conditioning=[[zeros(4, 1024, 1024), {}] for _ in range(1000)])
    with Client(default_worker) as client:
        message = refusal(client.request(bomb, timeout=60))  # 1000 x 16 MiB, each under the 2 GiB cap
        assert "over its per-request memory budget" in message


def test_frames_and_descriptors_count_against_one_budget(capped_worker: str) -> None:
    frame = torch.rand(1, 384, 384, 3)  # 1.7 MB: under the 2.1 MB budget alone, like the descriptor
    with Client(capped_worker) as client:
        alone = client.request(node("ImageInvert", image=frame), timeout=60)
        assert alone["op"] == "result" and torch.allclose(alone["outputs"][0], 1.0 - frame)
        assert client.request(node("ImageInvert", image=zeros(1, 384, 384, 3)), timeout=60)["op"] == "result"
        both = node("ImageCompositeMasked", destination=frame, source=zeros(1, 384, 384, 3), x=0, y=0,
                    resize_source=False)
        assert "per-request memory budget" in refusal(client.request(both, timeout=60))


def test_the_budget_counts_held_values_per_reference_and_refuses_malformed_descriptors() -> None:
    held = {"d" * 64: [[torch.zeros(1024, 256), {"pooled_output": torch.zeros(256)}]]}  # 1 MiB + 1 KiB
    one = 1024 * 256 * 4 + 256 * 4
    assert decoded_bytes({HELD: "d" * 64}, held) == one
    assert decoded_bytes([{HELD: "d" * 64}] * 3, held) == 3 * one
    assert decoded_bytes([torch.zeros(10), zeros(2, 3, dtype="float16"), "abc"]) == 40 + 12 + 3
    # a negative shape must not cancel out the big ones before it: refused, not subtracted
    with pytest.raises(WireValueError):
        decoded_bytes([zeros(512, 1024, 1024), zeros(-1, 512, 1024, 1024)])
    with pytest.raises(WireValueError):
        decoded_bytes(zeros(1.5, 2))


# node inputs: the declared ranges, types and choices, as a local run checks them


def test_node_inputs_outside_their_declared_ranges_are_refused(default_worker: str, models_dir: Path) -> None:
    with Client(default_worker) as client:
        huge = refusal(client.request(node("EmptyLatentImage", width=65536, height=65536, batch_size=1),
                                      timeout=30))
        assert "input 'width'" in huge and "above the maximum 16384" in huge
        steps = refusal(client.request(node("KSampler", **sampler_inputs(models_dir, 10**9)), timeout=30))
        assert "input 'steps'" in steps and "above the maximum" in steps
        as_text = refusal(client.request(node("KSampler", **sampler_inputs(models_dir, "20")), timeout=30))
        assert "expects INT" in as_text
        bad_choice = {**sampler_inputs(models_dir, 2), "sampler_name": "nope"}
        assert "not one of the choices" in refusal(client.request(node("KSampler", **bad_choice), timeout=30))
        stray = {**sampler_inputs(models_dir, 2), "extra": 1}
        assert "unknown input" in refusal(client.request(node("KSampler", **stray), timeout=30))
        fine = client.request(node("EmptyLatentImage", width=64, height=64, batch_size=1), timeout=30)
        assert fine["op"] == "result"


# the worker's own caps, found by input name and type


def test_steps_are_capped_on_every_node_with_steps_or_sigmas(capped_worker: str, models_dir: Path) -> None:
    with Client(capped_worker) as client:
        over = refusal(client.request(node("KSampler", **sampler_inputs(models_dir, 51)), timeout=60))
        assert "steps 51" in over and "--max-steps" in over
        scheduler = node("BasicScheduler", model={"$ds:model": {}}, scheduler="normal", steps=500,
                         denoise=1.0)
        assert "--max-steps" in refusal(client.request(scheduler, timeout=30))
        karras = node("KarrasScheduler", steps=51, sigma_max=14.6, sigma_min=0.03, rho=7.0)
        assert "--max-steps" in refusal(client.request(karras, timeout=30))
        custom = node("SamplerCustom", sigmas=torch.linspace(1, 0, 101), noise_seed=1, add_noise=True,
                      cfg=1.0)
        assert "100 steps" in refusal(client.request(custom, timeout=30))
        ok = client.request(node("KSampler", **sampler_inputs(models_dir, 2)), timeout=120)
        assert ok["op"] == "result"


def test_pixels_and_batch_are_capped_for_what_nodes_take_and_make(capped_worker: str) -> None:
    with Client(capped_worker) as client:
        def refused(header: dict[str, Any]) -> str:
            return refusal(client.request(header, timeout=30))

        assert "--max-pixels" in refused(node("EmptyLatentImage", width=1024, height=1024, batch_size=1))
        assert "--max-pixels" in refused(node("EmptyLatentImage", width=512, height=512, batch_size=2))
        assert "--max-batch" in refused(node("EmptyLatentImage", width=64, height=64, batch_size=5))
        latent = {"samples": zeros(1, 4, 64, 64)}  # a 512² image's latent: at the cap
        assert "--max-pixels" in refused(node("LatentUpscaleBy", samples=latent,
                                              upscale_method="nearest-exact", scale_by=1.5))
        assert "--max-pixels" in refused(node("LatentUpscale", samples=latent, upscale_method="nearest-exact",
                                              width=0, height=1024, crop="disabled"))
        image = zeros(1, 100, 100, 3)
        assert "--max-pixels" in refused(node("ImageScaleBy", image=image, upscale_method="nearest-exact",
                                              scale_by=8.0))
        # a side of 0 keeps the aspect ratio: 100x100 to height 1024 is 1024x1024
        assert "--max-pixels" in refused(node("ImageScale", image=image, upscale_method="nearest-exact",
                                              width=0, height=1024, crop="disabled"))
        assert "--max-pixels" in refused(node("ImageScaleToTotalPixels", image=image,
                                              upscale_method="nearest-exact", megapixels=1.0))
        assert "--max-pixels" in refused(node("ImagePadForOutpaint", image=image, left=500, top=500,
                                              right=500, bottom=500, feathering=0))
        # pictures coming in count too: a latent decodes to 8x its size on each side
        assert "--max-pixels" in refused(node("VAEDecode", samples={"samples": zeros(1, 4, 128, 128)},
                                              vae={"$ds:model": {}}))
        assert "--max-batch" in refused(node("ImageInvert", image=zeros(5, 8, 8, 3)))
        fine = client.request(node("LatentUpscaleBy", samples={"samples": zeros(1, 4, 32, 32)},
                                   upscale_method="nearest-exact", scale_by=2.0), timeout=30)
        assert fine["op"] == "result" and fine["outputs"][0]["samples"][ZEROS]["shape"] == [1, 4, 64, 64]


def test_an_upscale_models_scale_counts_toward_the_pixels(capped_worker: str, models_dir: Path) -> None:
    document = sd15_workflow(lora=False)
    document["20"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": TINY_ESRGAN_FILE}}
    upscaler = {"$ds:model": model_recipe(models_dir, document, "20")}
    with Client(capped_worker) as client:
        small = client.request(node("ImageUpscaleWithModel", upscale_model=upscaler,
                                    image=torch.rand(1, 32, 32, 3)), timeout=120)
        assert small["op"] == "result" and small["outputs"][0].shape == (1, 64, 64, 3)
        big = node("ImageUpscaleWithModel", upscale_model=upscaler, image=torch.rand(1, 300, 300, 3))
        message = refusal(client.request(big, timeout=120))  # 300² is under the cap, 600² (2x) is not
        assert "its output" in message and "1×600×600" in message


def test_the_caps_are_generic_over_node_classes() -> None:
    registry = default_registry()
    upscaler = UpscaleModel(model=torch.nn.Identity(), architecture="test", scale=4)
    with pytest.raises(BadRequest, match="--max-pixels"):
        check_node_inputs(registry, registry["ImageUpscaleWithModel"], "1",
                          {"upscale_model": upscaler, "image": torch.zeros(1, 200, 200, 3)}, CAPPED)
    check_node_inputs(registry, registry["ImageUpscaleWithModel"], "1",
                      {"upscale_model": upscaler, "image": torch.zeros(1, 100, 100, 3)}, CAPPED)
    for class_type in ("KSamplerAdvanced", "ExponentialScheduler"):
        with pytest.raises(BadRequest, match="--max-steps"):
            check_node_inputs(registry, registry[class_type], "1", {"steps": 51}, CAPPED)
    with pytest.raises(BadRequest, match="num_inference_steps"):
        check_pipeline_call({"num_inference_steps": 10**6}, CAPPED)
    with pytest.raises(BadRequest, match="--max-pixels"):
        check_pipeline_call({"height": 4096, "width": 4096}, CAPPED)
    check_pipeline_call({"num_inference_steps": 20, "height": 512, "width": 512}, CAPPED)


# the queue: one client's share


def test_one_client_filling_the_queue_does_not_lock_out_another(models_dir: Path) -> None:
    # 1 slot + 4 waiting; a client's share is the slot plus half the queue: 3 requests in flight
    long_job = node("KSampler", **sampler_inputs(models_dir, 5000))
    with started_worker(models_dir, "--slots", "1", "--max-queue", "4", "--grace", "2") as address, \
            Client(address) as greedy, Client(address) as other:
        flood = [greedy.submit(long_job) for _ in range(6)]
        polite = other.submit(node("EmptyLatentImage", width=64, height=64, batch_size=1))
        refused = []
        for request_id in flood[3:]:
            reply = greedy.result(request_id, timeout=60)
            refused.append(refusal(reply, "Overloaded"))
        assert all("share" in message and "--max-queue-per-client" in message for message in refused)
        for request_id in flood[:3]:  # the running one stops at its next step, the waiting ones never start
            greedy.cancel(request_id)
        assert other.result(polite, timeout=120)["op"] == "result"
