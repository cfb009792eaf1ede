"""GPU benchmark: SDXL's real architecture with random weights, stock diffusers against each engine and
against the whole server, in one run (each engine and the server in a child process). Prints one JSON line and
keeps it in $OUT/gpu_bench.json, rewritten after every section so a run cut short still reports; a table for
people follows on stderr.

Sections, in order of value (each skipped when it would not fit in --budget-s, 8 minutes by default):
- stock: diffusers' StableDiffusionXLPipeline as it ships (fp16, SDPA), the baseline for every ratio.
- the first engine (default compiled_regional): cold load-to-ready (compiles included), seconds per image at
  1024²/30 steps/batch 1 (median of 3), peak VRAM, max pixel difference from stock; then its warm start: the
  compiled code exported to one file, imported into an empty cache, and a fresh process started from it.
- the other engines (default compiled_regional+fp8, whose pixel drift from stock is reported, and eager).
- server_step, server_request: `chara-forge serve` on the first engine (a warm restart on its cache), under an
  open-loop Poisson load at rising rates; goodput (the highest rate whose p99 stays within 10 s and 20 s) with
  step-level and with request-level batching.
- the cost curve (seconds per UNet call by rows, and per VAE decode) for
  `just bench-batching --curve $OUT/gpu_bench.json`.

Each engine runs in a child process of its own, stopped when it would eat into the time kept for the
server sections: a compile that runs long, or a crash inside a native library, costs its section, not the
run. After each section every process the run started is gone (compile workers too). The children's logs
are kept in $OUT/logs.

`--tiny` runs the same sections with the tiny model (a smoke test that works on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

TARGETS = {
    "batch1_ratio_max": 0.55,  # compiled, batch 1, against stock diffusers, within PIXEL_TOLERANCE
    "batch1_ratio_quantized_max": 0.45,  # with fp8 weights and activations (its pixel drift reported)
    "goodput_p99_10s_min": 1.2,  # images/s the server sustains with a p99 latency within 10 s
    "warm_restart_s_max": 20.0,  # a compiled engine started from imported cache artifacts
}
# Latency objectives the server sections report goodput at: the highest arrival rate whose p99 stays within.
SLOS_S = (10.0, 20.0)
# Largest difference from stock diffusers' image, in levels of 255, that counts as the same image: fp16
# sums in another order (batching, fused kernels) move a few pixels by a level or two.
PIXEL_TOLERANCE = 4
PROMPT, SEED, GUIDANCE = "a knight in silver armour, full body", 0, 5.0
# Each server section (one batching mode) needs this much; engine sections leave it to both.
SERVER_S = 80
# Engine names the bench knows: a backend, and for compiled, its compile_scope; with the seconds a cold
# start may take. A compiled engine's name may end in +int8 or +fp8 (torchao weight quantisation), which
# changes the images, so its ratio is reported apart from the others'.
ENGINES = {
    "eager": ("eager", "full", 30),
    "compiled_regional": ("compiled", "regional", 90),  # before `compiled`: its compile is far shorter
    "compiled": ("compiled", "full", 240),
    # The UNet exported and compiled ahead of time (minutes, once); its warm start only loads the package.
    "compiled_aot": ("compiled", "aot", 300),
    "tensorrt": ("tensorrt", "full", 300),
}
QUANTIZATIONS = ("int8", "fp8")


def engine_settings(name: str) -> tuple[str, str, str]:
    """An engine name's backend, compile scope and quantisation; ValueError for a name the bench does not know."""
    base, _, quantize = name.partition("+")
    quantizable = base in ENGINES and ENGINES[base][0] == "compiled" and ENGINES[base][1] != "aot"
    if base not in ENGINES or (quantize and (quantize not in QUANTIZATIONS or not quantizable)):
        known = ", ".join(ENGINES)
        raise ValueError(f"unknown engine {name!r}: one of {known}, or compiled(_regional) with +int8 or +fp8")
    backend, scope, _ = ENGINES[base]
    return backend, scope, quantize or "none"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.result: dict[str, Any] = {"bench": "gpu", "tiny": args.tiny}
        self.out = Path(os.environ.get("OUT", args.scratch)) / "gpu_bench.json"

    def left_s(self) -> float:
        return float(self.args.budget_s - (time.monotonic() - self.started))

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=1))

    def section(self, name: str, needs_s: float, fn: Callable[[], Any], keep_s: float = 0) -> Any:
        """Run one section if the time budget allows it and still `keep_s` for later sections; its result or
        error goes into the JSON."""
        if self.left_s() < needs_s + keep_s:
            self.result[name] = {"skipped": f"needs ~{needs_s:.0f} s (+{keep_s:.0f} kept), {self.left_s():.0f} s left"}
            self.save()
            return None
        started = time.monotonic()
        try:
            value = fn()
        except Exception as exc:
            traceback.print_exc()
            value = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        left_behind = kill_left_behind()
        if isinstance(value, dict):
            value["section_s"] = round(time.monotonic() - started, 1)
            if left_behind:
                value["processes_left_behind"] = left_behind
        _reset_peak(self.args.device)  # what the section left in torch's cache goes back to the GPU's other users
        self.result[name] = value
        self.save()
        # The JSON line comes at the end; meanwhile a line a section shows where a long run spends its time.
        print(f"[gpu_bench] {name}: {json.dumps(value)[:300]}", file=sys.stderr, flush=True)
        return value


def _peak_gib(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class DeviceMemoryWatch:
    """The most device memory in use while a server ran, less what was in use before it started: all its
    process holds (CUDA context and allocator cache too), sampled every 0.2 s. None off CUDA."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DeviceMemoryWatch:
        if self.device.startswith("cuda"):
            baseline, self.peak_bytes = self._used(), 0
            self._thread = threading.Thread(target=self._sample, args=(baseline,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peak_gib(self) -> float | None:
        return None if self.peak_bytes is None else round(self.peak_bytes / 2**30, 2)

    def _sample(self, baseline: int) -> None:
        while not self._stop.wait(0.2):
            self.peak_bytes = max(self.peak_bytes or 0, self._used() - baseline)

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(device: str, run: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median seconds over `repeats` runs after one warm-up, every run's seconds, and the last output."""
    output = run()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        output = run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), [round(t, 3) for t in times], output


def stock(bench: Bench, model: Path) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionXLPipeline

    args = bench.args
    _reset_peak(args.device)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)

    def run() -> Any:
        return pipe(
            PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]

    median, times, image = _timed(args.device, run, args.repeats)
    np.save(_reference_file(args), np.asarray(image, dtype=np.int16))
    return {"s_per_image": round(median, 3), "runs_s": times, "peak_vram_gib": _peak_gib(args.device)}


COST_CURVE_ROWS = (2, 4, 8, 16)


def _unet(args: argparse.Namespace, model: Path) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    return UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype).to(args.device)


def _unet_call(args: argparse.Namespace, unet: Any, rows: int) -> Callable[[], Any]:
    """One UNet call of `rows` rows at the bench's size, on random inputs."""
    import torch

    from engines.onnx_export import unet_example

    sample, timesteps, hidden, text_embeds, time_ids = unet_example(unet, rows, args.size)
    added = {"text_embeds": text_embeds, "time_ids": time_ids}

    def call() -> Any:
        with torch.inference_mode():
            return unet(sample, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    return call


def cost_curve(bench: Bench, model: Path) -> dict[str, Any]:
    """Seconds per UNet call at 2, 4, 8 and 16 rows (a guided image is two), and per VAE decode of one image,
    at the bench's size: a cost curve for `just bench-batching --curve $OUT/gpu_bench.json`."""
    args = bench.args
    unet = _unet(args, model)
    points = []
    for rows in COST_CURVE_ROWS:
        median, _, _ = _timed(args.device, _unet_call(args, unet, rows), max(args.repeats, 3))
        points.append([rows, round(median, 5)])
    del unet
    return {"size": args.size, "points": points, "decode_s_per_image": round(_decode_s(args, model), 5),
            "unit": "seconds per UNet call, by rows"}  # fmt: skip


def _decode_s(args: argparse.Namespace, model: Path) -> float:
    """One image's VAE decode as the pipeline runs it (SDXL's VAE upcast to fp32)."""
    import torch
    from diffusers import AutoencoderKL

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype).to(args.device)
    if vae.config.force_upcast:
        vae.to(torch.float32)
    side = args.size // 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(1, vae.config.latent_channels, side, side, device=args.device, dtype=vae.dtype)

    def decode() -> Any:
        with torch.inference_mode():
            return vae.decode(latents / vae.config.scaling_factor).sample

    median, _, _ = _timed(args.device, decode, max(args.repeats, 3))
    return median


def _ready_engine(args: argparse.Namespace, model: Path, engine_name: str) -> tuple[Any, Any, float]:
    """Load and warm one engine as the server would (compile or engine build included): engine, model, s."""
    from engines.loader import BackendSettings, cpu_threads_for_serving, load_engine, prepare_thread
    from engines.models import resolve_model
    from engines.onnx_export import ShapeRange

    # The server's thread setup: on a CPU the thread count is part of the compiled code (and its cache key).
    prepare_thread(args.device, cpu_threads_for_serving(0))
    info = resolve_model(str(model), Path(args.scratch), 1)
    backend, scope, quantize = engine_settings(engine_name)
    settings = BackendSettings(
        name=backend,
        compile_scope=scope,
        cache_dir=Path(args.scratch) / "data" / "engine-cache",
        compile_mode=args.compile_mode,
        quantize=quantize,
        shapes=ShapeRange(
            max_batch=16, min_side=min(512, args.size), opt_side=args.size, max_side=max(1536, args.size)
        ),
    )
    started = time.perf_counter()
    engine = load_engine(settings, info, args.device)
    engine.warm()
    _sync(args.device)
    return engine, info, time.perf_counter() - started


def _reference_file(args: argparse.Namespace) -> Path:
    return Path(args.scratch) / "stock-image.npy"


def engine_run(args: argparse.Namespace, model: Path, engine_name: str) -> dict[str, Any]:
    """In the engine's own process: cold start to ready, seconds per image, peak VRAM, difference from stock."""
    from forge.engine import Job

    _reset_peak(args.device)
    engine, info, ready_s = _ready_engine(args, model, engine_name)
    job = Job(model=info, prompt=PROMPT, negative_prompt="", width=args.size, height=args.size, seeds=[SEED],
              steps=args.steps, guidance_scale=GUIDANCE, scheduler="euler")  # fmt: skip
    median, times, result = _timed(args.device, lambda: engine.run(job), args.repeats)
    image = np.asarray(result.images[0], dtype=np.int16)
    reference = np.load(_reference_file(args)) if _reference_file(args).exists() else None
    out: dict[str, Any] = {
        "cold_ready_s": round(ready_s, 1),
        "s_per_image": round(median, 3),
        "runs_s": times,
        "peak_vram_gib": _peak_gib(args.device),
        "max_pixel_diff_vs_stock": None if reference is None else int(np.abs(image - reference).max()),
    }
    backend, scope, quantize = engine_settings(engine_name)
    if backend == "compiled":
        out.update(compile_mode=args.compile_mode, compile_scope=scope, quantize=quantize)
    engine.close()
    return out


# Every process a run starts carries this variable (set once in main), inherited by inductor's compile workers
# too, which leave their parent's process group: after each section, whatever still carries it is killed.
RUN_MARKER = "CHARA_FORGE_GPU_BENCH_RUN"


def processes_of_run(marker: str) -> list[int]:
    """Every process but this one whose environment carries RUN_MARKER with the value `marker`."""
    needle = f"{RUN_MARKER}={marker}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def kill_left_behind() -> int:
    """Kill every process of this run other than this one (a stopped child's compile workers, a server that
    would not stop); how many there were."""
    left = processes_of_run(os.environ.get(RUN_MARKER, ""))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


def in_child(bench: Bench, name: str, child_args: list[str], keep_s: float) -> dict[str, Any]:
    """This script again in a fresh process, in the mode `child_args` pick; its last stdout line is its result.
    It is killed (with any compile workers it started) once it would leave less than `keep_s`."""
    args = bench.args
    command = [sys.executable, "-m", "bench.gpu_bench", *child_args, "--scratch", args.scratch, "--device",
               args.device, "--compile-mode", args.compile_mode, "--size", str(args.size), "--steps",
               str(args.steps), "--repeats", str(args.repeats), *(["--tiny"] if args.tiny else [])]  # fmt: skip
    log = bench.out.parent / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    limit_s = max(bench.left_s() - keep_s, 30)
    with log.open("w") as sink:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sink, text=True, start_new_session=True)
        try:
            stdout, _ = child.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise TimeoutError(f"stopped after {limit_s:.0f} s to keep time for later sections") from None
    lines = stdout.strip().splitlines()
    if not lines:  # it died before it could say why (a crash in native code, or out of memory)
        raise RuntimeError(f"exit {child.returncode}: {log.read_text(errors='replace')[-500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def warm_start(bench: Bench, engine_name: str) -> dict[str, Any]:
    """What a new fleet worker pays: the cold run's compiled code exported to one file (`chara-forge engine
    export-cache`), imported into an empty engine cache at the same path (the cold one is moved aside), and a
    fresh process loading and warming from it."""
    from engines.cache_artifacts import export_cache, import_cache

    args = bench.args
    cache = Path(args.scratch) / "data" / "engine-cache"
    exported = Path(args.scratch) / "engine-cache.tar.gz"
    export_cache(cache, exported)
    cache.rename(cache.with_name(f"engine-cache.cold-{time.monotonic_ns()}"))
    import_cache(exported, cache)
    started = time.monotonic()
    ready = in_child(bench, f"{engine_name}_warm", ["--ready-only", engine_name], SERVER_S * len(args.servers))
    if "error" in ready:
        return ready
    return {
        "warm_ready_s": ready["ready_s"],
        "process_s": round(time.monotonic() - started, 1),
        "compiles": ready.get("compiles"),  # traced or compiled at the start; 0 when every block graph was loaded
        "graphs_loaded": ready.get("graphs_loaded"),
        "exported_mib": round(exported.stat().st_size / 2**20, 1),
    }


def server_run(
    bench: Bench, model: Path, engine_name: str, capacity: float, batching: str, keep_s: float = 0
) -> dict[str, Any]:
    """The real server in its own process on the caches the engine runs left (a warm restart), then an open-loop
    load (MLPerf's server scenario): seeded Poisson arrivals of one-image requests at rising rates, each a
    multiple of `capacity` (the engine's batch-1 images/s), until a rate's p99 passes the largest SLO. Goodput
    at each SLO: the highest rate whose p99 stayed within it with nothing failed."""
    args = bench.args
    backend, scope, quantize = engine_settings(engine_name)
    port = _free_port()
    env = {
        **os.environ,
        "FORGE_MODEL": str(model),
        "FORGE_DATA_DIR": str(Path(args.scratch) / "data"),
        "FORGE_API_PORT": str(port),
        "FORGE_HOST": "127.0.0.1",
        "FORGE_ENABLE_UI": "false",
        "FORGE_ENABLE_MCP": "false",
        "FORGE_BACKEND": backend,
        "FORGE_COMPILE_SCOPE": scope,
        "FORGE_QUANTIZE": quantize,
        "FORGE_COMPILE_MODE": args.compile_mode,
        "FORGE_DEVICES": args.device,
        "FORGE_LOG_LEVEL": "INFO",
        "FORGE_MAX_QUEUE": "1000",
        "FORGE_BATCHING": batching,
        "FORGE_RESULT_CACHE": "false",
        "HF_HUB_OFFLINE": "1",
    }
    if args.max_batch:
        env["FORGE_MAX_BATCH"] = str(args.max_batch)
    log = bench.out.parent / "logs" / f"server_{batching}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    loads: list[dict[str, Any]] = []
    with DeviceMemoryWatch(args.device) as memory:
        with log.open("ab") as sink:
            command = [sys.executable, "-m", "forge.cli", "serve"]
            process = subprocess.Popen(command, env=env, stdout=sink, stderr=sink)
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=60) as client:
                ready_s = _wait_ready(client, process, max(bench.left_s() - 30, 30)) - started
            for index, multiple in enumerate(args.rates):
                if bench.left_s() - keep_s < args.window_s + max(SLOS_S):
                    break
                load = _open_loop(base, args, capacity * multiple, seed=SEED + index)
                loads.append(load)
                if load["failed"] or not _within(load, max(SLOS_S)):
                    break  # a faster rate only queues more
        finally:
            process.terminate()  # a backlog left at the server is not worth its drain
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    if not loads:
        raise RuntimeError("no time was left for a load after the server was ready")
    return {
        "engine": engine_name,
        "batching": batching,
        "warm_restart_ready_s": round(ready_s, 1),
        "capacity_batch1_images_per_s": round(capacity, 3),
        "loads": loads,
        "goodput_images_per_s": {f"p99_{slo:g}s": _goodput(loads, slo) for slo in SLOS_S},
        "peak_vram_gib": memory.peak_gib(),  # the whole process: context and allocator cache included
        "log_tail": log.read_text(errors="replace").splitlines()[-4:],
    }


def _goodput(loads: list[dict[str, Any]], slo_s: float) -> float:
    passed = [load["offered_images_per_s"] for load in loads if not load["failed"] and _within(load, slo_s)]
    return max(passed, default=0.0)


def _within(load: dict[str, Any], slo_s: float) -> bool:
    return load["p99_s"] is not None and load["p99_s"] <= slo_s


def _seconds(latency: float) -> float | None:
    """A latency for the JSON: null where the request went past every objective (not waited for)."""
    return round(latency, 3) if math.isfinite(latency) else None


def _open_loop(base: str, args: argparse.Namespace, rate: float, seed: int) -> dict[str, Any]:
    """One-image requests arriving as a Poisson process at `rate` per second for `window_s`, each in its own
    thread (arrivals never wait for answers), polled to the end. A request unfinished `max(SLOS_S)` after it was
    sent is not waited for: it counts as over every objective (its latency reported as null)."""
    import random
    import threading

    latencies: list[float] = []
    failures: list[str] = []
    arrivals = random.Random(seed)

    def one(index: int) -> None:
        body = {"prompt": f"hero {seed}-{index}", "width": args.size, "height": args.size, "steps": args.steps,
                "guidance_scale": GUIDANCE, "seed": seed * 1000 + index}  # fmt: skip
        started = time.perf_counter()
        with httpx.Client(base_url=base, timeout=60) as client:
            response = client.post("/v1/generations", json=body)
            if response.status_code != 202:
                failures.append(f"submit: {response.status_code} {response.text[:200]}")
                return
            task = response.json()
            while (view := client.get(f"/v1/generations/{task['id']}").json())["state"] not in (
                "succeeded", "failed", "cancelled",
            ):  # fmt: skip
                if time.perf_counter() - started > max(SLOS_S):
                    # Past every objective: how much further changes no goodput, and waiting for it would spend
                    # the section's time on a backlog.
                    latencies.append(math.inf)
                    return
                time.sleep(0.05)
        if view["state"] != "succeeded":
            failures.append(str(view.get("error")))
            return
        latencies.append(time.perf_counter() - started)

    threads: list[threading.Thread] = []
    started = time.monotonic()
    at = arrivals.expovariate(rate)
    while at < args.window_s:
        time.sleep(max(0.0, started + at - time.monotonic()))
        thread = threading.Thread(target=one, args=(len(threads),))
        thread.start()
        threads.append(thread)
        at += arrivals.expovariate(rate)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    ordered = sorted(latencies) or [math.inf]
    return {
        "offered_images_per_s": round(rate, 3),
        "requests": len(threads),
        "served_images_per_s": round(sum(math.isfinite(latency) for latency in latencies) / elapsed, 3),
        "over_slos": sum(not math.isfinite(latency) for latency in latencies),
        "p50_s": _seconds(ordered[len(ordered) // 2]),
        "p99_s": _seconds(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]),
        "failed": len(failures) + (not threads),
        "failures": failures[:3],
    }


def _wait_ready(client: httpx.Client, process: subprocess.Popen[bytes], timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if client.get("/readyz").status_code == 200:
                return time.monotonic()
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the server was not ready within {timeout_s:.0f} s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _child_section(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    """What a child process reports: its section's result, or the error that ended it (the trace goes to its log)."""
    try:
        if args.ready_only:
            engine, _, ready_s = _ready_engine(args, model, args.ready_only)
            compiles, regions = getattr(engine, "compile_counts", None), getattr(engine, "regions", None)
            return {"ready_s": round(ready_s, 1), "compiles": compiles and compiles.compiles,
                    "graphs_loaded": regions and regions.loaded}  # fmt: skip
        return engine_run(args, model, args.engine_only)
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def summarise(bench: Bench, backends: list[str]) -> None:
    result = bench.result
    base = (result.get("stock") or {}).get("s_per_image")
    ratios = {}
    for backend in backends:
        seconds = (result.get(backend) or {}).get("s_per_image")
        if base and seconds:
            ratios[backend] = round(seconds / base, 3)
    result["batch1_ratio_vs_stock"] = ratios
    result["pixel_tolerance"] = PIXEL_TOLERANCE
    result["matches_stock"] = {
        name: section["max_pixel_diff_vs_stock"] <= PIXEL_TOLERANCE
        for name, section in result.items()
        if isinstance(section, dict) and section.get("max_pixel_diff_vs_stock") is not None
    }
    exact = [r for name, r in ratios.items() if engine_settings(name)[2] == "none" and result["matches_stock"][name]]
    quantized = [ratio for name, ratio in ratios.items() if engine_settings(name)[2] != "none"]
    goodput = {batching: (result.get(f"server_{batching}") or {}).get("goodput_images_per_s") or {}
               for batching in ("step", "request")}  # fmt: skip
    warm = [section["warm_ready_s"] for name, section in result.items() if name.endswith("_warm") and
            isinstance(section, dict) and "warm_ready_s" in section]  # fmt: skip
    result["targets"] = TARGETS
    result["meets_targets"] = {
        "batch1_ratio": bool(exact) and min(exact) <= TARGETS["batch1_ratio_max"],
        "batch1_ratio_quantized": bool(quantized) and min(quantized) <= TARGETS["batch1_ratio_quantized_max"],
        "goodput_p99_10s": goodput["step"].get("p99_10s", 0) >= TARGETS["goodput_p99_10s_min"],
        "warm_restart": bool(warm) and min(warm) <= TARGETS["warm_restart_s_max"],
    }
    result["step_vs_request_goodput"] = {
        slo: round(goodput["step"][slo] / goodput["request"][slo], 3) if goodput["request"].get(slo) else None
        for slo in goodput["step"]
    }
    result["total_s"] = round(time.monotonic() - bench.started, 1)


def table(result: dict[str, Any]) -> str:
    """The run at a glance, for people: each section's headline figure and the seconds it took."""
    rows = []
    for name, section in result.items():
        if not isinstance(section, dict) or ("section_s" not in section and "skipped" not in section):
            continue
        if "skipped" in section or "error" in section:
            figure = section.get("skipped") or section["error"]
        elif "s_per_image" in section:
            figure = f"{section['s_per_image']} s/image, ready in {section.get('cold_ready_s', '-')} s"
        elif "warm_ready_s" in section:
            figure = f"ready in {section['warm_ready_s']} s from imported artifacts"
        elif "goodput_images_per_s" in section:
            figure = f"goodput {section['goodput_images_per_s']} images/s"
        else:
            figure = ""
        rows.append(f"{name:32} {section.get('section_s', 0):7.1f} s  {str(figure)[:100]}")
    return "\n".join([f"{'section':32} {'took':>9}  result", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model (a smoke test that runs on a CPU)")
    parser.add_argument("--device", default=None, help="default: cuda:0, or cpu with --tiny")
    parser.add_argument(
        "--backends",
        default="compiled_regional,compiled_regional+fp8,eager",
        help=f"in order of value, the first also serving: {', '.join(ENGINES)}; e.g. compiled_regional+fp8 (torchao)",
    )
    parser.add_argument("--compile-mode", default="auto")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    # From batch-1 capacity up: batching must carry the server past it, and 1.6x of the compiled engine's measured
    # batch-1 rate on an H200 (0.77 images/s) is the goodput target (1.2).
    parser.add_argument("--rates", default="1.0,1.6,2.2", help="arrival rates, as multiples of batch-1 images/s")
    parser.add_argument("--window-s", type=float, default=None, help="seconds of arrivals at each rate")
    parser.add_argument("--servers", default="step,request", help="server sections: step and/or request batching")
    parser.add_argument("--max-batch", type=int, default=0, help="the server's max_batch (0: its default)")
    parser.add_argument("--budget-s", type=float, default=470, help="sections that would not fit are skipped")
    parser.add_argument("--scratch", default=None, help="where the model, caches and logs go (default: a temp dir)")
    parser.add_argument("--ready-only", default=None, help=argparse.SUPPRESS)  # the warm-start child process
    parser.add_argument("--engine-only", default=None, help=argparse.SUPPRESS)  # an engine section's child process
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        try:
            engine_settings(backend)
        except ValueError as exc:
            parser.error(str(exc))
    args.device = args.device or ("cpu" if args.tiny else "cuda:0")
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (4 if args.tiny else 30)
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="gpu-bench-")
    args.window_s = args.window_s or (4 if args.tiny else 15)
    args.rates = [float(rate) for rate in args.rates.split(",")]
    args.servers = [name for name in args.servers.split(",") if name]
    if not set(args.servers) <= {"step", "request"}:
        parser.error("--servers takes step, request or both")
    os.environ.setdefault(RUN_MARKER, str(os.getpid()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import torch

    from engines.loader import quiet_libraries

    quiet_libraries()
    bench = Bench(args)
    bench.result.update(
        torch=torch.__version__,
        device=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device,
        size=args.size,
        steps=args.steps,
        guidance=GUIDANCE,
    )
    model_dir = Path(args.scratch) / "model"
    if args.ready_only or args.engine_only:
        print(json.dumps(_child_section(args, model_dir)), flush=True)
        return

    def build() -> dict[str, Any]:
        if args.tiny:
            from engines.tiny import build_tiny_sdxl

            return {"path": str(build_tiny_sdxl(model_dir)), "weights": "tiny, random"}
        from bench.sdxl_random import build_random_sdxl

        return {"path": str(build_random_sdxl(model_dir, args.device)), "weights": "SDXL architecture, random fp16"}

    bench.section("model", 0, build)
    bench.section("stock", 30, lambda: stock(bench, model_dir))
    first, *others = backends or ["eager"]
    _engine_section(bench, first)
    for backend in others:
        _engine_section(bench, backend, warm=False)
    served = first if "s_per_image" in (bench.result.get(first) or {}) else "eager"
    seconds = (bench.result.get(served) or bench.result.get("stock") or {}).get("s_per_image") or 1.0
    for index, batching in enumerate(args.servers):
        keep_s = SERVER_S * (len(args.servers) - index - 1)
        run = functools.partial(server_run, bench, model_dir, served, 1 / seconds, batching, keep_s)
        bench.section(f"server_{batching}", SERVER_S, run, keep_s)
    bench.section("cost_curve", 10, lambda: cost_curve(bench, model_dir))
    summarise(bench, backends)
    bench.save()
    print(json.dumps(bench.result), flush=True)
    print(table(bench.result), file=sys.stderr, flush=True)


def _engine_section(bench: Bench, backend: str, warm: bool = True) -> None:
    """An engine's cold start and timings in its own process, then (compiled engines) a warm start of a fresh
    process from its exported cache, each leaving time for the server sections."""
    keep_s = SERVER_S * len(bench.args.servers)
    run = functools.partial(in_child, bench, backend, ["--engine-only", backend], keep_s)
    needs_s = 10 if bench.args.tiny else ENGINES[backend.partition("+")[0]][2]
    bench.section(backend, needs_s, run, keep_s)
    if warm and engine_settings(backend)[0] == "compiled" and "s_per_image" in (bench.result.get(backend) or {}):
        bench.section(f"{backend}_warm", 40, functools.partial(warm_start, bench, backend), keep_s)


if __name__ == "__main__":
    main()
