"""The GPU check: full-size SD 1.5 and SDXL on one CUDA GPU, locally and on a worker.

    python bench/gpu_check.py [--out FILE.json] [--tiny] [--device DEV] [--steps N] [--cpu-steps N]
    make gpu-check GPU_CHECK_ARGS="--out gpu-check.json"

What it measures (printed as a table, and written as JSON with ``--out``):

- seeded random-weight checkpoints of the real SD 1.5 and SDXL base architectures, built
  on the GPU in fp16 and written in the single-file layout the loaders read (temporary folder);
- SD 1.5 at 512x512, ``--steps`` (20) euler steps: sampler it/s (steps over the KSampler
  node's time, warm) locally on the GPU (``DeviceNodeRunner``, fp16), and on a
  ``diffsplit worker --device cuda --dtype fp16`` (over the worker's own run time);
  the device memory peak of the local run (``torch.cuda.max_memory_allocated``);
- the first request to a fresh worker (its rebuild time per node) and the wire bytes per
  remote node, from the RemoteRunner's stats;
- the seed's experiment: KSampler and VAEDecode on the GPU worker with the client on the CPU,
  against the same nodes CPU-only (the CPU sampler runs ``--cpu-steps`` (2) steps and is
  scaled to ``--steps``; the output says so);
- split == local on the GPU: the same workflow with the client's compute nodes on its GPU and
  KSampler/VAEDecode on the worker, against the local run (max |difference| of the images,
  expected 0.0);
- SDXL at 1024x1024 (768 when the check is running late), a few steps locally on the GPU.

Without CUDA (and without ``--tiny``) it prints that no CUDA GPU is available and exits 0,
having written nothing but the small ``--out`` file. ``--tiny`` takes the same code path with
the tiny model set at small sizes, on the CPU by default, so CI can run it without a GPU.
Exit codes: 0 all checks passed (or skipped), 1 a check failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Budget the check is sized for on one H200 (seconds); SDXL drops to 768x768 when past LATE_S.
BUDGET_S = 300.0
LATE_S = 170.0
SEED, WARM_SEED = 42, 43


@dataclass(frozen=True)
class Sizes:
    """The sizes one mode runs at."""

    sd15_side: int
    sdxl_side: int
    sdxl_late_side: int
    sdxl_steps: int
    warmup_steps: int
    worker_cache_gb: float


FULL = Sizes(sd15_side=512, sdxl_side=1024, sdxl_late_side=768, sdxl_steps=8, warmup_steps=2,
             worker_cache_gb=24.0)
TINY = Sizes(sd15_side=64, sdxl_side=64, sdxl_late_side=64, sdxl_steps=4, warmup_steps=1,
             worker_cache_gb=2.0)


@dataclass
class Report:
    """Everything the check found; ``data`` becomes the JSON file."""

    started: float = field(default_factory=time.perf_counter)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.say(f"note: {text}")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase and print it; a failure is recorded (the check goes on with the next phase)."""
        self.say(f"{name} ...")
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:  # one failed phase must not hide the others' results
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            self.say(f"{name}: FAILED: {self.errors[name]}")
        finally:
            self.phases[name] = round(time.perf_counter() - started, 3)
        if name not in self.errors:
            self.say(f"{name}: done in {self.phases[name]:.1f}s")

    def finished(self) -> dict[str, Any]:
        return {**self.data, "notes": self.notes, "errors": self.errors, "phases_s": self.phases,
                "total_s": round(self.elapsed(), 3), "ok": not self.errors}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny model set at small sizes (CPU by default): the same code path, for CI")
    parser.add_argument("--device",
                        help="device of the local runs and the worker (default: cuda; cpu with --tiny)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the SD 1.5 runs (default 20)")
    parser.add_argument("--cpu-steps", type=int, default=2,
                        help="steps of the CPU-only sampler, scaled to --steps (default 2)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.cpu_steps < 1:
        parser.error("--steps must be at least 2 and --cpu-steps at least 1")
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if not args.tiny and not args.device.strip().lower().startswith("cuda"):
        parser.error(f"the full-size check runs on a CUDA device, not {args.device!r}; use --tiny for a "
                     "small run on any device")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ[name] = "1"  # nothing downloads; the worker child inherits it
    import torch

    if not args.tiny and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        reason = f"no CUDA GPU is available (torch {torch.__version__}, {build})"
        print(f"diffsplit GPU check: skipped: {reason}")
        if args.out:
            args.out.write_text(json.dumps({"skipped": reason}, indent=2) + "\n")
        return 0
    from diffsplit.engine.devices import DeviceError

    report = Report()
    with tempfile.TemporaryDirectory(prefix="diffsplit-gpu-check-") as scratch:
        os.environ["DIFFSPLIT_CACHE"] = str(Path(scratch) / "cache")  # the index of temporary files
        try:
            check = Check(args, report, Path(scratch))
        except DeviceError as exc:
            print(f"gpu_check.py: {exc}", file=sys.stderr)
            return 2
        check.run()
    result = report.finished()
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"results: {args.out}")
    return 0 if result["ok"] else 1


class Check:
    """The phases, in order; each records what it measured into the report."""

    def __init__(self, args: argparse.Namespace, report: Report, scratch: Path) -> None:
        import torch
        from diffsplit.engine.devices import resolve_device
        from diffsplit.engine.dtypes import DtypePolicy

        self.args, self.report, self.scratch = args, report, scratch
        self.sizes = TINY if args.tiny else FULL
        self.device = resolve_device(args.device)
        self.dtype_name = "fp32" if self.device.type == "cpu" else "fp16"
        self.policy = DtypePolicy.choose(self.device, dtype=self.dtype_name)
        self.sd15: dict[str, Any] = {}
        self.local: Any = None  # the local SD 1.5 run (its image and loader outputs)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        report.data.update({
            "check": "diffsplit gpu check", "mode": "tiny" if args.tiny else "full",
            "device": str(self.device), "device_name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "policy": self.policy.describe(), "sd15": self.sd15,
        })
        report.say(f"diffsplit GPU check ({report.data['mode']}): {self.device} ({name}), torch "
                   f"{torch.__version__}, CUDA {torch.version.cuda}; SD 1.5 policy {self.policy.describe()}")
        if self.device.type != "cuda":
            report.note(f"VRAM peaks are CUDA's max_memory_allocated: none on {self.device}")

    def run(self) -> None:
        from diffsplit.engine.nodes.registry import default_registry
        from diffsplit.engine.store import ModelStore
        from gpu_check_runs import Engine

        report = self.report
        with report.phase("models: SD 1.5"):
            sd15_dir, self.sd15_ckpt = self.write_models("sd15")
        if "models: SD 1.5" in report.errors:
            return
        registry = default_registry()
        engine = Engine(registry, ModelStore(sd15_dir), self.scratch / "out")
        with report.phase("SD 1.5 local on the device"):
            self.sd15_local(engine)
        if self.local is not None:
            with report.phase("SD 1.5 CPU only"):
                self.sd15_cpu_only(engine)
            with report.phase("SD 1.5 on a worker"):
                self.sd15_worker(engine, sd15_dir)
        self.local = None
        self.release()
        side = self.sizes.sdxl_side
        if report.elapsed() > LATE_S and self.sizes.sdxl_late_side != side:
            side = self.sizes.sdxl_late_side
            report.note(f"running late ({report.elapsed():.0f}s): SDXL at {side}x{side} instead of "
                        f"{self.sizes.sdxl_side}x{self.sizes.sdxl_side}")
        with report.phase("models: SDXL"):
            sdxl_dir, sdxl_ckpt = self.write_models("sdxl")
        if "models: SDXL" not in report.errors:
            with report.phase("SDXL local on the device"):
                self.sdxl_local(Engine(registry, ModelStore(sdxl_dir), self.scratch / "out"), sdxl_ckpt, side)
        self.release()

    # -- models ------------------------------------------------------------------------------------
    def write_models(self, family: str) -> tuple[Path, str]:
        """The models folder and checkpoint name of ``family`` (tiny set: written once, both families)."""
        models = self.report.data.setdefault("models", {})
        if self.args.tiny:
            from diffsplit.engine.models.tiny import write_tiny_models

            root = self.scratch / "tiny"
            if not (root / "checkpoints").is_dir():
                write_tiny_models(root, seed=0)
            name = f"tiny-{family}.safetensors"
            models[family] = {"file": name, "bytes": (root / "checkpoints" / name).stat().st_size,
                              "tiny": True}
            return root, name
        import torch
        from gpu_check_models import write_full_checkpoint

        root = self.scratch / family  # one folder per family: the worker indexes only what it serves
        name = f"random-{family}-fp16.safetensors"
        written = write_full_checkpoint(root / "checkpoints" / name, family, self.device, torch.float16)
        models[family] = {**{k: v for k, v in asdict(written).items() if k != "path"}, "file": name}
        self.report.say(f"{family}: {written.parameters / 1e9:.2f} B parameters, "
                        f"{written.bytes / 1e9:.2f} GB (built {written.build_s:.1f}s, "
                        f"written {written.write_s:.1f}s)")
        return root, name

    def workflow(self, ckpt: str, *, steps: int, seed: int, side: int | None = None) -> dict[str, Any]:
        from gpu_check_runs import check_workflow

        side = side or self.sizes.sd15_side
        return check_workflow(ckpt, width=side, height=side, steps=steps, seed=seed)

    # -- SD 1.5 ------------------------------------------------------------------------------------
    def sd15_local(self, engine: Any) -> None:
        from diffsplit.engine.execution_cache import ExecutionCache
        from diffsplit.engine.executor import run_node_locally
        from gpu_check_runs import device_runner

        runner, memory = device_runner(run_node_locally, self.device, self.policy)
        cache = ExecutionCache()
        with self.device_peak() as peak:
            warmup = self.workflow(self.sd15_ckpt, steps=self.sizes.warmup_steps, seed=1)
            engine.run(warmup, runner, cache=cache)
            self.local = engine.run(self.workflow(self.sd15_ckpt, steps=self.args.steps, seed=SEED), runner,
                                    cache=cache)
        self.sd15.update(width=self.sizes.sd15_side, height=self.sizes.sd15_side, steps=self.args.steps,
                         sampler="euler")
        self.sd15["local"] = {**self.local.summary(), "runner": "DeviceNodeRunner",
                              "policy": self.policy.describe(), "vram_peak_bytes": peak.get("bytes"),
                              "device_memory_peak_estimate_bytes": memory.stats().peak_bytes}
        self.report.say(f"local: sampler {self.local.sampler_it_s:.2f} it/s, "
                        f"VRAM peak {_gib(peak.get('bytes'))}")

    def sd15_cpu_only(self, engine: Any) -> None:
        from gpu_check_runs import DECODE, LOADER, SAMPLER

        steps, cpu_steps = self.args.steps, self.args.cpu_steps
        measured = engine.run(self.workflow(self.sd15_ckpt, steps=cpu_steps, seed=SEED),
                              given={LOADER: self.local.loader_outputs})
        sampler_scaled = measured.seconds(SAMPLER) / cpu_steps * steps
        self.sd15["cpu_only"] = {
            **measured.summary(), "steps_measured": cpu_steps, "scaled_to_steps": steps,
            "ksampler_s_scaled": sampler_scaled,
            "offloaded_nodes_s_scaled": sampler_scaled + measured.seconds(DECODE),
            "note": f"KSampler measured on {cpu_steps} step(s) and scaled to {steps}; VAEDecode measured",
        }
        self.report.say(f"CPU only: KSampler {measured.seconds(SAMPLER):.2f}s for {cpu_steps} step(s) -> "
                        f"{sampler_scaled:.1f}s scaled to {steps}")

    def sd15_worker(self, engine: Any, models: Path) -> None:
        from diffsplit.engine.execution_cache import ExecutionCache
        from gpu_check_runs import (
            DECODE,
            LOADER,
            SAMPLER,
            device_runner,
            max_abs_difference,
            remote_runner,
            started_worker,
            worker_command,
            worker_device_peak,
            worker_supports_device_flags,
        )

        self.release()  # the local runs' cached device blocks: the worker's budget is the free memory it sees
        has_flags = worker_supports_device_flags()
        if not has_flags:
            if self.device.type != "cpu":
                raise RuntimeError("this diffsplit's worker has no --device/--dtype options: it cannot run "
                                   f"on {self.device}")
            self.report.note("this diffsplit's worker has no --device/--dtype options: the CPU worker is "
                             "started without them")
        command = worker_command(models, device=str(self.device) if has_flags else None,
                                 dtype=self.dtype_name if has_flags else None,
                                 cache_gb=self.sizes.worker_cache_gb)
        worker: dict[str, Any] = {"command": ["diffsplit", *command[3:]], "device_flags": has_flags}
        self.sd15["worker"] = worker
        steps = self.args.steps
        cold_doc = self.workflow(self.sd15_ckpt, steps=steps, seed=SEED)
        with started_worker(command, self.scratch / "worker.log") as address:
            self.report.say(f"worker listening on {address}: {' '.join(worker['command'])}")
            with remote_runner(engine, cold_doc, address) as runner:
                cache = ExecutionCache()
                cold = engine.run(cold_doc, runner, cache=cache)  # the client on the CPU: the seed's split
                cold_stats = runner.stats_json()
                warm = engine.run(self.workflow(self.sd15_ckpt, steps=steps, seed=WARM_SEED), runner,
                                  cache=cache)
                warm_stats = runner.stats_json()
                client, _memory = device_runner(runner, self.device, self.policy,
                                                elsewhere=lambda node_id: node_id in runner.assigned)
                split = engine.run(cold_doc, client, given={LOADER: cold.loader_outputs})
            peak = worker_device_peak(address)
        worker["cold"] = {**cold.summary(), "client": "cpu",
                          "rebuild_s": {s["class_type"]: s["rebuild_s"] for s in cold_stats.values()},
                          "rebuild_s_total": sum(s["rebuild_s"] for s in cold_stats.values()),
                          "offloaded_nodes_s": cold.seconds(SAMPLER, DECODE)}
        run_s = {s["class_type"]: s["run_s"] for s in warm_stats.values()}
        worker["warm"] = {**warm.summary(), "client": "cpu",
                          "offloaded_nodes_s": warm.seconds(SAMPLER, DECODE), "run_s": run_s,
                          "sampler_it_s": steps / max(run_s["KSampler"], 1e-9),
                          "sampler_it_s_from_client": warm.sampler_it_s}
        worker["wire_bytes"] = {label: {s["class_type"]: _wire(s) for s in stats.values()}
                                for label, stats in (("cold", cold_stats), ("warm", warm_stats))}
        worker["vram_peak_bytes"] = peak.measured_bytes
        worker["vram_peak_source"] = peak.source
        worker["device_memory_peak_estimate_bytes"] = peak.estimate_bytes
        if peak.measured_bytes is None:
            self.report.note(f"worker VRAM peak: {peak.source}")
        cpu = self.sd15.get("cpu_only", {}).get("offloaded_nodes_s_scaled")
        if cpu:
            self.sd15["seed_experiment"] = {
                "nodes": ["KSampler", "VAEDecode"], "steps": steps,
                "cpu_only_s_scaled": cpu, "worker_warm_s": worker["warm"]["offloaded_nodes_s"],
                "worker_cold_s": worker["cold"]["offloaded_nodes_s"],
                "speedup_warm": cpu / max(worker["warm"]["offloaded_nodes_s"], 1e-9),
                "speedup_cold": cpu / max(worker["cold"]["offloaded_nodes_s"], 1e-9),
                "note": f"CPU-only KSampler measured on {self.args.cpu_steps} step(s), scaled to {steps}",
            }
        difference = max_abs_difference(split.image, self.local.image)
        self.sd15["split_equals_local"] = {
            "max_abs_diff": difference, "equal": difference == 0.0, "policy": self.policy.describe(),
            "compared": f"client {self.device} + worker {self.device} vs local {self.device}",
            "images_finite": bool(split.image.isfinite().all() and self.local.image.isfinite().all()),
        }
        self.report.say(f"worker: sampler {worker['warm']['sampler_it_s']:.2f} it/s warm, cold rebuild "
                        f"{worker['cold']['rebuild_s_total']:.2f}s; split == local: max |diff| {difference}")
        if difference != 0.0:
            raise AssertionError(f"split != local on {self.device}: max |diff| {difference}")

    # -- SDXL --------------------------------------------------------------------------------------
    def sdxl_local(self, engine: Any, ckpt: str, side: int) -> None:
        from diffsplit.engine.dtypes import DtypePolicy
        from diffsplit.engine.execution_cache import ExecutionCache
        from diffsplit.engine.executor import run_node_locally
        from gpu_check_runs import device_runner

        policy = DtypePolicy.choose(self.device)  # auto: what a user gets (the VAE in bf16 where native)
        runner, memory = device_runner(run_node_locally, self.device, policy)
        cache = ExecutionCache()
        steps = self.sizes.sdxl_steps
        with self.device_peak() as peak:
            warmup = self.workflow(ckpt, steps=self.sizes.warmup_steps, seed=1, side=side)
            engine.run(warmup, runner, cache=cache)
            measured = engine.run(self.workflow(ckpt, steps=steps, seed=SEED, side=side), runner, cache=cache)
        self.report.data["sdxl"] = {
            "width": side, "height": side, "steps": steps, "sampler": "euler",
            "local": {**measured.summary(), "policy": policy.describe(), "vram_peak_bytes": peak.get("bytes"),
                      "device_memory_peak_estimate_bytes": memory.stats().peak_bytes,
                      "image_finite": bool(measured.image.isfinite().all())},
        }
        self.report.say(f"SDXL local: sampler {measured.sampler_it_s:.2f} it/s, "
                        f"VRAM peak {_gib(peak.get('bytes'))}")
        if not self.report.data["sdxl"]["local"]["image_finite"]:
            raise AssertionError(f"the SDXL image has non-finite pixels ({policy.describe()})")

    # -- device memory -----------------------------------------------------------------------------
    @contextmanager
    def device_peak(self) -> Iterator[dict[str, int]]:
        """``{"bytes": torch.cuda.max_memory_allocated}`` over the block (CUDA only; empty elsewhere)."""
        import torch

        found: dict[str, int] = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        yield found
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            found["bytes"] = int(torch.cuda.max_memory_allocated(self.device))

    def release(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _wire(stats: Mapping[str, Any]) -> dict[str, int]:
    keys = ("request_bytes", "reply_bytes", "recipe_bytes", "request_tensor_bytes", "reply_tensor_bytes")
    return {key: int(stats[key]) for key in keys}


def _gib(count: float | None) -> str:
    return "n/a" if count is None else f"{count / (1 << 30):.2f} GiB"


# -- the table -------------------------------------------------------------------------------------------


def print_table(result: Mapping[str, Any]) -> None:
    """The results as a table on stdout (every figure also in the JSON)."""
    rows: list[tuple[str, str]] = []
    add: Callable[[str, str], None] = lambda label, value: rows.append((label, value))  # noqa: E731
    sd15 = result.get("sd15", {})
    local, worker = sd15.get("local"), sd15.get("worker", {})
    side = sd15.get("width", "?")
    print(f"\n== diffsplit GPU check: {result.get('device')} ({result.get('device_name')}), "
          f"{result.get('mode')}")
    if local:
        add(f"SD 1.5 {side}x{side}, {sd15['steps']} steps, local",
            f"sampler {local['sampler_it_s']:.2f} it/s; VRAM peak {_gib(local['vram_peak_bytes'])}; "
            f"DeviceMemory estimate {_gib(local['device_memory_peak_estimate_bytes'])}")
    if "warm" in worker:
        peak = worker.get("vram_peak_bytes")
        add("SD 1.5 on the worker, warm",
            f"sampler {worker['warm']['sampler_it_s']:.2f} it/s; worker VRAM peak "
            + (_gib(peak) if peak is not None else "omitted (see the note)")
            + f"; DeviceMemory estimate {_gib(worker.get('device_memory_peak_estimate_bytes'))}")
        rebuild = ", ".join(f"{k} {v:.2f}s" for k, v in worker["cold"]["rebuild_s"].items())
        add("cold worker: first request", f"rebuild {worker['cold']['rebuild_s_total']:.2f}s ({rebuild}); "
            f"KSampler+VAEDecode {worker['cold']['offloaded_nodes_s']:.2f}s from the client")
        for label in ("cold", "warm"):
            wire = worker["wire_bytes"][label]
            add(f"wire bytes per remote node, {label}", "; ".join(
                f"{cls}: sent {w['request_bytes']:,} B (recipes {w['recipe_bytes']:,} B), received "
                f"{w['reply_bytes']:,} B" for cls, w in wire.items()))
    experiment = sd15.get("seed_experiment")
    if experiment:
        add(f"seed experiment: KSampler+VAEDecode, {experiment['steps']} steps",
            f"CPU only {experiment['cpu_only_s_scaled']:.2f}s (scaled) vs {result.get('device')} worker "
            f"{experiment['worker_warm_s']:.2f}s warm / {experiment['worker_cold_s']:.2f}s cold: "
            f"{experiment['speedup_warm']:.1f}x warm, {experiment['speedup_cold']:.1f}x cold "
            f"({experiment['note']})")
    same = sd15.get("split_equals_local")
    if same:
        add("split == local on the device", f"max |diff| {same['max_abs_diff']} "
            + ("OK" if same["equal"] else "DIFFERENT") + f" ({same['compared']})")
    sdxl = result.get("sdxl")
    if sdxl:
        add(f"SDXL {sdxl['width']}x{sdxl['height']}, {sdxl['steps']} steps, local",
            f"sampler {sdxl['local']['sampler_it_s']:.2f} it/s; "
            f"VRAM peak {_gib(sdxl['local']['vram_peak_bytes'])}; {sdxl['local']['policy']}")
    width = max((len(label) for label, _ in rows), default=0)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    for note in result.get("notes", ()):
        print(f"  note: {note}")
    for name, error in result.get("errors", {}).items():
        print(f"  FAILED {name}: {error}")
    phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.get("phases_s", {}).items())
    print(f"  phases: {phases}")
    print(f"  total {result.get('total_s', 0):.1f}s (sized for {BUDGET_S:.0f}s on one H200); "
          + ("all checks passed" if result.get("ok") else "SOME CHECKS FAILED"))


if __name__ == "__main__":
    sys.exit(main())
