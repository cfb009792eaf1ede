"""The GPU benchmark's script, run on the CPU so it is known to work before it is given a GPU's scarce minutes:
its full-size build from SDXL's real configs, its sections end to end in an environment holding only what the
GPU machine's image holds plus the wheels the bench carries there, and its clean-up of stopped sections."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.gpu_bench import RUN_MARKER, Bench, processes_of_run, stock
from bench.gpu_image import make_env
from bench.sdxl_random import build_random_sdxl

REPO = Path(__file__).resolve().parent.parent


def _bench(python: str, out: Path, *args: str, timeout_s: float = 400) -> tuple[dict[str, Any], str]:
    """Run bench.gpu_bench with `python` as bench/gpu_run.sh would; its JSON line and stderr."""
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(REPO)}
    command = [python, "-m", "bench.gpu_bench", "--tiny", "--scratch", str(out.parent / "scratch"), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout[-2000:]
    result: dict[str, Any] = json.loads(lines[0])
    assert result == json.loads((out / "gpu_bench.json").read_text())
    return result, done.stderr


def test_the_full_size_build_loads_and_runs_the_stock_section(tmp_path: Path) -> None:
    """bench/sdxl_random builds SDXL's real text encoders, VAE and scheduler from their configs (the UNet
    narrowed), saves them in fp16 and stock diffusers loads and runs them, as the GPU run does at full size."""
    model = build_random_sdxl(tmp_path / "model", "cpu", narrow_unet=True)
    config = json.loads((model / "text_encoder_2" / "config.json").read_text())
    assert config["hidden_size"] == 1280 and config["num_hidden_layers"] == 32
    assert json.loads((model / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "EulerDiscreteScheduler"
    )
    args = argparse.Namespace(
        budget_s=300, scratch=str(tmp_path), device="cpu", size=64, steps=2, repeats=1, tiny=False
    )
    result = stock(Bench(args), model)
    assert result["s_per_image"] > 0 and (tmp_path / "stock-image.npy").exists()


def test_the_bench_runs_in_the_gpu_images_environment_with_open_loop_server_sections(tmp_path: Path) -> None:
    """A virtual environment with only the GPU image's packages and the carried wheels' runs the bench, both
    server sections included: a package the wheels forget fails here. Each server section drives seeded
    Poisson arrivals at rising rates and reports goodput at p99 10 s and 20 s; the table prints last."""
    python = make_env(tmp_path / "gpu-image")
    out = tmp_path / "out"
    result, stderr = _bench(str(python), out, "--backends", "eager", "--max-batch", "4", "--window-s", "2",
                            "--rates", "0.5,1.0")  # fmt: skip
    assert result["eager"]["max_pixel_diff_vs_stock"] <= 2
    for batching in ("step", "request"):
        server = result[f"server_{batching}"]
        assert server["batching"] == batching and server["engine"] == "eager"
        loads = server["loads"]
        assert [load["offered_images_per_s"] for load in loads] == sorted(
            load["offered_images_per_s"] for load in loads
        )
        assert all(load["requests"] > 0 and load["p50_s"] <= load["p99_s"] for load in loads)  # none past 20 s
        assert set(server["goodput_images_per_s"]) == {"p99_10s", "p99_20s"}
    assert set(result["step_vs_request_goodput"]) == {"p99_10s", "p99_20s"}
    targets = {"batch1_ratio", "batch1_ratio_quantized", "goodput_p99_10s", "warm_restart"}
    assert set(result["meets_targets"]) == targets
    assert [rows for rows, _ in result["cost_curve"]["points"]] == [2, 4, 8, 16]
    table = stderr.strip().splitlines()
    assert table[-1].startswith("cost_curve") and any(line.startswith("server_request") for line in table)


def test_a_stopped_section_leaves_no_process_behind(tmp_path: Path) -> None:
    """A compiled engine's section stopped at its time limit, mid-compile: the section says so, the run still
    reports, and nothing it started is left running (inductor's compile workers included)."""
    out = tmp_path / "out"
    marker = f"test-{os.getpid()}"
    os.environ[RUN_MARKER] = marker
    try:
        result, _ = _bench(sys.executable, out, "--backends", "compiled_regional", "--servers", "", "--budget-s", "35")
    finally:
        del os.environ[RUN_MARKER]
    assert "stopped after" in result["compiled_regional"]["error"]
    assert "left" in result["cost_curve"]["skipped"]
    assert processes_of_run(marker) == []


def test_gpu_bench_refuses_an_engine_it_does_not_know_before_spending_any_time(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.gpu_bench", "--tiny", "--backends", "eager,compiled_aot+fp8",
               "--scratch", str(tmp_path / "scratch")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "compiled_aot+fp8" in done.stderr and "+int8 or +fp8" in done.stderr
    assert not (tmp_path / "scratch" / "model").exists()
