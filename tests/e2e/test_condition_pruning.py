"""``--conditions auto`` end to end: three ControlNet conditions probed, the redundant ones dropped for
the remaining steps (fewer ControlNet passes), the decisions in the result, the PNG and the stats,
here and on a real worker process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.example_workflows import multi_condition_workflow
from diffsplit.engine.execution_cache import ExecutionCache
from diffsplit.engine.execution_context import CONDITIONS_CHUNK
from diffsplit.engine.executor import Executor, RunResult
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.sampling.condition_scales import MAX_WEIGHED_CONDITIONS, ChainDecision
from diffsplit.engine.sampling.condition_settings import ConditionSettings
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_errors import BadRequest, error_from_reply

from .conftest import png_text, write_json

STEPS = 8


@contextmanager
def controlnet_passes() -> Iterator[list[int]]:
    """Counts forwards of ControlNetModel (any instance) while the block runs."""
    seen = [0]

    def count(module: torch.nn.Module, args: Any, output: Any) -> None:
        if type(module).__name__ == "ControlNetModel":
            seen[0] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        yield seen
    finally:
        handle.remove()


def run(registry: NodeRegistry, store: ModelStore, inputs_dir: Path, out: Path,
        settings: ConditionSettings | None, remote: str | None = None,
        document: dict[str, Any] | None = None) -> RunResult:
    workflow = load_workflow(document or multi_condition_workflow(steps=STEPS), registry)
    executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=out, max_workers=1,
                        conditions=settings)
    if remote is None:
        return executor.run(workflow)
    # the sampler and the depth preprocessor (its network file goes by sha256) run on the worker
    assigned = assign_remotes(workflow, registry,
                              [f"KSampler={remote}", f"DepthAnythingPreprocessor={remote}"])
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store) as runner:
        return executor.run(workflow, node_runner=runner)


@pytest.fixture(scope="module")
def unpruned(registry: NodeRegistry, store: ModelStore, inputs_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, int]:
    with controlnet_passes() as passes:
        result = run(registry, store, inputs_dir, tmp_path_factory.mktemp("full"), None)
    assert result.conditions == ()
    return result.outputs["7"][0], passes[0]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def test_redundant_conditions_are_dropped_after_the_probe(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path,
    unpruned: tuple[torch.Tensor, int],
) -> None:
    image, full_passes = unpruned
    with controlnet_passes() as passes:
        result = run(registry, store, inputs_dir, tmp_path, ConditionSettings(probe=0.25, tolerance=0.15))
    (decision,) = result.conditions
    assert decision.node_id == "6" and decision.probe_steps == 2 and decision.total_steps == STEPS
    labels = [c.label.split(" (")[0] for c in decision.conditions]
    assert labels == ["node 11", "node 22", "node 24"]  # in the order they were applied
    assert decision.dropped >= 1 and decision.error <= 0.15
    kept = [c for c in decision.conditions if c.kept]
    assert kept and all(0 < c.scale <= 2.0 for c in kept)
    # each dropped condition's ControlNet runs in the probe's 2 steps only
    per_condition = full_passes // 3
    assert per_condition >= STEPS
    assert passes[0] == full_passes - decision.dropped * per_condition * (STEPS - 2) // STEPS
    assert psnr(result.outputs["7"][0], image) > 30.0


def test_with_no_tolerance_nothing_is_dropped_and_the_image_is_the_same_bit_for_bit(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path,
    unpruned: tuple[torch.Tensor, int],
) -> None:
    image, full_passes = unpruned
    with controlnet_passes() as passes:
        result = run(registry, store, inputs_dir, tmp_path, ConditionSettings(tolerance=0.0))
    (decision,) = result.conditions
    assert decision.dropped == 0
    assert all(c.kept and c.scale == pytest.approx(1.0) for c in decision.conditions)
    assert passes[0] == full_passes
    assert torch.equal(result.outputs["7"][0], image)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral"])
def test_a_two_evaluation_sampler_probes_whole_steps(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path, sampler: str,
) -> None:
    """Heun-like samplers evaluate the model twice per step (once on the last): both evaluations of
    each probe step see every condition, the pruned set starts with the step after the probe."""
    document = multi_condition_workflow(steps=STEPS)
    document["6"]["inputs"]["sampler_name"] = sampler
    with controlnet_passes() as full:
        run(registry, store, inputs_dir, tmp_path / "full", None, document=document)
    per_condition = full[0] // 3
    assert per_condition == 2 * STEPS - 1
    with controlnet_passes() as passes:
        result = run(registry, store, inputs_dir, tmp_path / "pruned",
                     ConditionSettings(probe=0.25, tolerance=0.15), document=document)
    (decision,) = result.conditions
    assert decision.probe_steps == 2 and decision.dropped >= 1
    probed = 2 * 2  # steps 0 and 1, two evaluations each
    assert passes[0] == full[0] - decision.dropped * (per_condition - probed)


def test_one_condition_alone_is_kept_and_a_late_one_is_not_judged(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path,
) -> None:
    document = multi_condition_workflow(steps=STEPS)
    document["6"]["inputs"]["positive"] = ["11", 0]  # one condition only
    (decision,) = run(registry, store, inputs_dir, tmp_path / "one", ConditionSettings(),
                      document=document).conditions
    assert [c.kept for c in decision.conditions] == [True]
    document = multi_condition_workflow(steps=STEPS)
    document["24"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["22", 0], "negative": ["4", 0], "control_net": ["9", 0], "image": ["10", 0],
        "strength": 0.5, "start_percent": 0.6, "end_percent": 1.0}}
    document["6"]["inputs"]["negative"] = ["24", 1]
    decisions = run(registry, store, inputs_dir, tmp_path / "late", ConditionSettings(),
                    document=document).conditions
    late = [c for d in decisions for c in d.conditions if c.label.startswith("node 24")]
    assert late and all(c.kept and c.reason == "not active during the probe" for c in late)


def test_a_chain_longer_than_the_estimator_weighs_runs_unpruned(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    document = multi_condition_workflow(steps=2)
    previous = ["3", 0]
    for index in range(MAX_WEIGHED_CONDITIONS + 1):  # one over the limit, all the same weak condition
        node = str(100 + index)
        document[node] = {"class_type": "ControlNetApply", "inputs": {
            "conditioning": previous, "control_net": ["9", 0], "image": ["20", 0], "strength": 0.01}}
        previous = [node, 0]
    document["6"]["inputs"]["positive"] = previous
    plain = run(registry, store, inputs_dir, tmp_path / "plain", None, document=document)
    with controlnet_passes() as passes:
        pruned = run(registry, store, inputs_dir, tmp_path / "auto", ConditionSettings(), document=document)
    assert pruned.conditions == ()  # nothing weighed, nothing dropped
    assert torch.equal(pruned.outputs["7"][0], plain.outputs["7"][0])
    assert passes[0] >= 2 * (MAX_WEIGHED_CONDITIONS + 1)
    assert any(f"a chain of {MAX_WEIGHED_CONDITIONS + 1} conditions is over" in r.getMessage()
               for r in caplog.records)


def custom_sampler_workflow(advanced: bool) -> dict[str, Any]:
    """The three-condition workflow sampled by SamplerCustom (or SamplerCustomAdvanced + CFGGuider)."""
    document = multi_condition_workflow(steps=STEPS)
    ksampler = document["6"]["inputs"]
    document["30"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    document["31"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ksampler["model"], "scheduler": "normal", "steps": STEPS, "denoise": 1.0}}
    shared = {"sampler": ["30", 0], "sigmas": ["31", 0], "latent_image": ksampler["latent_image"]}
    if advanced:
        document["32"] = {"class_type": "CFGGuider", "inputs": {
            "model": ksampler["model"], "positive": ksampler["positive"], "negative": ksampler["negative"],
            "cfg": ksampler["cfg"]}}
        document["33"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": ksampler["seed"]}}
        document["6"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["33", 0], "guider": ["32", 0], **shared}}
    else:
        document["6"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ksampler["model"], "add_noise": True, "noise_seed": ksampler["seed"],
            "cfg": ksampler["cfg"], "positive": ksampler["positive"], "negative": ksampler["negative"],
            **shared}}
    return document


@pytest.mark.parametrize("advanced", [False, True], ids=["SamplerCustom", "SamplerCustomAdvanced"])
def test_custom_samplers_prune_as_ksampler_does(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path,
    unpruned: tuple[torch.Tensor, int], advanced: bool,
) -> None:
    image, full_passes = unpruned
    document = custom_sampler_workflow(advanced)
    plain = run(registry, store, inputs_dir, tmp_path / "plain", None, document=document)
    assert torch.equal(plain.outputs["7"][0], image)  # the same run as KSampler's
    reference = run(registry, store, inputs_dir, tmp_path / "k", ConditionSettings())
    with controlnet_passes() as passes:
        pruned = run(registry, store, inputs_dir, tmp_path / "pruned", ConditionSettings(), document=document)
    (decision,) = pruned.conditions
    assert decision.node_id == "6" and decision.dropped >= 1
    assert [c.to_dict() for c in decision.conditions] == [c.to_dict() for d in reference.conditions
                                                          for c in d.conditions]
    assert passes[0] < full_passes
    assert torch.equal(pruned.outputs["7"][0], reference.outputs["7"][0])


def test_a_dual_cfg_guider_runs_every_condition_and_says_so(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    document = custom_sampler_workflow(advanced=True)
    guider = document["32"]["inputs"]
    document["32"] = {"class_type": "DualCFGGuider", "inputs": {
        "model": guider["model"], "cond1": guider["positive"], "cond2": guider["negative"],
        "negative": guider["negative"], "cfg_conds": 6.0, "cfg_cond2_negative": 1.0, "style": "regular"}}
    with caplog.at_level("WARNING"), controlnet_passes() as passes:
        result = run(registry, store, inputs_dir, tmp_path, ConditionSettings(), document=document)
    assert result.conditions == () and passes[0] > 0
    assert any("DualCFGGuider every ControlNet condition runs" in r.getMessage() for r in caplog.records)


def test_a_shared_cache_never_mixes_pruned_and_unpruned_sampler_outputs(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path,
) -> None:
    cache = ExecutionCache()
    workflow = load_workflow(multi_condition_workflow(steps=STEPS), registry)

    def sample(settings: ConditionSettings | None) -> RunResult:
        executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=tmp_path, max_workers=1,
                            conditions=settings)
        return executor.run(workflow, targets=["6"], cache=cache)

    full = sample(None)
    pruned = sample(ConditionSettings(tolerance=0.15))
    assert not pruned.timings["6"].cache_hit and pruned.conditions
    assert pruned.timings["1"].cache_hit  # the loaders do not prune: still shared
    assert not torch.equal(pruned.outputs["6"][0]["samples"], full.outputs["6"][0]["samples"])
    again = sample(ConditionSettings(tolerance=0.15))  # a pruning sampler always runs, with its decisions
    assert not again.timings["6"].cache_hit and again.conditions == pruned.conditions
    assert sample(None).timings["6"].cache_hit


def test_an_offloaded_custom_sampler_prunes_on_the_worker_as_here(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path, worker_address: str,
) -> None:
    settings = ConditionSettings()
    workflow = load_workflow(custom_sampler_workflow(advanced=True), registry)
    executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=tmp_path, max_workers=1,
                        conditions=settings)
    here = executor.run(workflow)
    assigned = assign_remotes(workflow, registry, [f"SamplerCustomAdvanced={worker_address}"])
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store) as runner:
        there = executor.run(workflow, node_runner=runner)
        assert runner.placement("6") == worker_address
    assert there.conditions == here.conditions and here.conditions[0].dropped >= 1
    assert torch.equal(there.outputs["7"][0], here.outputs["7"][0])


def test_the_decisions_are_printed_in_the_stats_and_in_the_png(
    run_cli: Any, models_dir: Path, inputs_dir: Path, tmp_path: Path,
) -> None:
    workflow = write_json(tmp_path / "multi.json", multi_condition_workflow(steps=STEPS))
    stats = tmp_path / "stats.json"
    result = run_cli("run", str(workflow), "--models", str(models_dir), "--inputs", str(inputs_dir),
                     "--out", str(tmp_path / "out"), "--conditions", "auto", "--stats", str(stats))
    assert result.exit_code == 0, result.stderr
    assert "conditions: node 6: " in result.stderr and "dropped" in result.stderr
    recorded = json.loads(stats.read_text())["conditions"]
    (png,) = result.saved
    assert json.loads(png_text(png)[CONDITIONS_CHUNK]) == recorded
    assert ChainDecision.from_dict(recorded[0]).dropped >= 1
    off = run_cli("run", str(workflow), "--models", str(models_dir), "--inputs", str(inputs_dir),
                  "--out", str(tmp_path / "off"))
    assert off.exit_code == 0 and CONDITIONS_CHUNK not in png_text(off.saved[0])


def test_a_worker_prunes_the_same_way_and_sends_its_decisions_back(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path, worker_address: str,
) -> None:
    settings = ConditionSettings(probe=0.25, tolerance=0.15)
    here = run(registry, store, inputs_dir, tmp_path / "here", settings)
    there = run(registry, store, inputs_dir, tmp_path / "there", settings, remote=worker_address)
    assert there.conditions == here.conditions
    assert torch.equal(there.outputs["23"][0], here.outputs["23"][0])
    assert torch.equal(there.outputs["7"][0], here.outputs["7"][0])


@pytest.mark.parametrize(("conditions", "wrong"), [
    ({"mode": "auto", "probe": 2}, "probe must be a number in (0.0, 1.0)"),
    ({"mode": "sometimes"}, "'conditions' must be"),
    ("auto", "'conditions' must be a mapping"),
])
def test_a_worker_refuses_malformed_settings(worker_address: str, conditions: Any, wrong: str) -> None:
    request = {"op": "run_node", "node": {"id": "6", "class_type": "KSampler"}, "inputs": {},
               "conditions": conditions}
    with Client(worker_address) as client:
        reply = client.request(request, timeout=30)
    error = error_from_reply(reply)
    assert isinstance(error, BadRequest) and wrong in str(error), reply


def test_a_t2i_adapter_beside_the_controlnets_is_kept_and_not_weighed(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path,
) -> None:
    document = multi_condition_workflow(steps=STEPS)
    document["25"] = {"class_type": "ControlNetLoader",
                      "inputs": {"control_net_name": "tiny-sd15-t2i-adapter.safetensors"}}
    document["26"] = {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["24", 0], "control_net": ["25", 0], "image": ["10", 0], "strength": 0.5}}
    document["6"]["inputs"]["positive"] = ["26", 0]
    (decision,) = run(registry, store, inputs_dir, tmp_path, ConditionSettings(),
                      document=document).conditions
    (adapter,) = [c for c in decision.conditions if c.label.startswith("node 26")]
    assert adapter.kept and adapter.reason.startswith("a T2I-Adapter")
    assert decision.dropped >= 1  # the ControlNets are still weighed against each other


def test_a_batch_prunes_each_item_and_stores_the_decisions_in_its_png(
    run_cli: Any, models_dir: Path, inputs_dir: Path, tmp_path: Path,
) -> None:
    workflow = write_json(tmp_path / "multi.json", multi_condition_workflow(steps=STEPS))
    items = tmp_path / "items.txt"
    items.write_text("a red fox\na grey wolf\n", encoding="utf-8")
    out = tmp_path / "images"
    done = run_cli("batch", str(items), "--workflow", str(workflow), "--models", str(models_dir),
                   "--inputs", str(inputs_dir), "--out", str(out), "-q", "--conditions", "auto")
    assert done.exit_code == 0, done.stderr
    for line in (out / "manifest.jsonl").read_text().splitlines():
        (output,) = json.loads(line)["outputs"]
        (decision,) = json.loads(png_text(out / output)[CONDITIONS_CHUNK])
        assert ChainDecision.from_dict(decision).dropped >= 1


def test_conditions_auto_is_refused_with_ray_before_ray_starts(
    run_cli: Any, models_dir: Path, inputs_dir: Path, tmp_path: Path,
) -> None:
    workflow = write_json(tmp_path / "multi.json", multi_condition_workflow(steps=STEPS))
    items = tmp_path / "items.txt"
    items.write_text("a red fox\n", encoding="utf-8")
    done = run_cli("batch", str(items), "--workflow", str(workflow), "--models", str(models_dir),
                   "--inputs", str(inputs_dir), "--out", str(tmp_path / "o"), "-q", "--conditions", "auto",
                   "--ray", "local")
    assert done.exit_code != 0 and "--conditions auto is not available with --ray" in done.stderr
