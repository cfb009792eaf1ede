"""The GPU benchmark's script, run end to end with the tiny model on the CPU, so it is known to work before
it is given a GPU's scarce minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_gpu_bench_runs_every_section_and_prints_one_json_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.gpu_bench", "--tiny", "--backends", "eager,tensorrt", "--clients", "2",
               "--per-client", "2", "--max-batch", "4", "--scratch", str(tmp_path / "scratch")]  # fmt: skip
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result == json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert result["stock"]["s_per_image"] > 0
    assert result["eager"]["max_pixel_diff_vs_stock"] <= 2  # the engine is the stock pipeline, batched
    assert "TensorRT" in result["tensorrt"]["error"]  # not installed here: reported, not fatal
    assert "TensorRT" in (tmp_path / "out" / "logs" / "tensorrt.log").read_text()  # each engine's own log
    server = result["server"]
    assert server["engine"] == "eager" and server["images"] == 4 and server["failed"] == 0
    assert server["images_per_s"] > 0 and server["batching"] == "step"
    assert (
        result["server_request_batching"]["batching"] == "request" and result["server_request_batching"]["images"] == 4
    )
    assert set(result["step_vs_request_batching"]) == {"images_per_s", "p99"}
    assert [rows for rows, _ in result["cost_curve"]["points"]] == [2, 4, 8, 16]
    assert result["cost_curve"]["decode_s_per_image"] > 0
    shapes = result["compiled_shapes"]
    for mode in ("dynamic", "padded"):
        assert set(shapes[mode]["s_per_call"]) == {"2", "3", "4"} and shapes[mode]["compile_s"] > 0
    assert shapes["faster"] in ("dynamic", "padded")
    assert server["latency_p50_s"] <= server["latency_p99_s"]
    assert server["peak_vram_gib"] is None  # measured on CUDA devices only
    assert set(result["meets_targets"]) == {"batch1_ratio", "batch1_ratio_quantized", "images_per_s", "warm_restart"}


def test_gpu_bench_refuses_an_engine_it_does_not_know_before_spending_any_time(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.gpu_bench", "--tiny", "--backends", "eager,compiled_aot+fp8",
               "--scratch", str(tmp_path / "scratch")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "compiled_aot+fp8" in done.stderr and "+int8 or +fp8" in done.stderr
    assert not (tmp_path / "scratch" / "model").exists()
