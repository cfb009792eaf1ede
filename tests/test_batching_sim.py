"""The batching simulation: the server's batching decisions on a simulated device, as `just bench-batching`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from bench.batching_sim import (
    CURVE,
    CURVES,
    CostCurve,
    SimulatedDevice,
    full_batch_images_per_s,
    simulate,
    tiny_engine,
    trace,
)
from forge.batching import BatchPolicy


def test_the_cost_curve_is_interpolated_between_its_points() -> None:
    cost = CostCurve(CURVE)
    assert cost.step_s(2) == 0.0995 and cost.step_s(8) == 0.153
    assert cost.step_s(2) < cost.step_s(4) < cost.step_s(8) < cost.step_s(16)


def test_step_level_keeps_batches_fuller_than_request_level_on_one_trace(tiny_model: Path) -> None:
    """Both modes run the engine's own loops (`run_batch`, `run_steps`) on the simulated device."""
    arrivals = trace(0.6, seed=3, tasks=60)
    cost = CostCurve(CURVE)
    device = SimulatedDevice(tiny_engine(tiny_model), cost)
    request = simulate(arrivals, BatchPolicy(max_images=8), device)
    step = simulate(arrivals, BatchPolicy(max_images=8, step_level=True), device)
    assert request.images == step.images == 60  # every task is served, in either mode
    assert step.summary()["mean_batch_images"] > request.summary()["mean_batch_images"]
    assert step.summary()["p99_s"] < request.summary()["p99_s"]
    # No task finishes before its own steps at the cheapest UNet call: the clock is the device's.
    fastest = min(spec.steps for _, spec in arrivals) * cost.step_s(1)
    assert min(request.latencies) >= fastest and min(step.latencies) >= fastest


def test_the_simulation_reports_goodput_on_the_curve_a_gpu_benchmark_measured(tmp_path: Path) -> None:
    """`just bench-batching --curve $OUT/gpu_bench.json`: the measured points replace the file's, and each mode's
    goodput (the highest arrival rate whose p99 stays within 10 s and 20 s) is reported with the ratio."""
    measured = {"bench": "gpu", "cost_curve": {"points": [[2, 0.09], [4, 0.1], [8, 0.14], [16, 0.25]],
                                               "decode_s_per_image": 0.08}}  # fmt: skip
    (tmp_path / "gpu_bench.json").write_text(json.dumps(measured))
    assert CostCurve(tmp_path / "gpu_bench.json").step_s(12) == pytest.approx(0.195)
    command = [sys.executable, "-m", "bench.batching_sim", "--curve", str(tmp_path / "gpu_bench.json"), "--tasks", "12"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(done.stdout)["curves"]["gpu_bench.json"]
    goodput = report["goodput_images_per_s"]
    for mode in ("request", "step"):
        assert set(goodput[mode]) == {"p99_10s", "p99_20s"}
        assert goodput[mode]["p99_10s"] <= goodput[mode]["p99_20s"]
    assert goodput["step"]["p99_20s"] > 0
    assert set(report["targets"]) == {"goodput_ratio_p99_20s_ge_1.5"}


def test_both_committed_curves_are_simulated_by_default() -> None:
    assert {path.name for path in CURVES.glob("*.json")} == {"h100_sdxl_1024.json", "h200_sdxl_1024.json"}
    h200 = CostCurve(CURVES / "h200_sdxl_1024.json")
    assert h200.step_s(2) < h200.step_s(8) < h200.step_s(16) and h200.decode_s > 0


def test_nominal_capacity_is_what_full_batches_of_each_key_serve() -> None:
    cost = CostCurve(CURVE)
    spec = trace(1.0, seed=3)[0][1]
    guided = msgspec.structs.replace(spec, steps=30, guidance_scale=5.0)
    unguided = msgspec.structs.replace(spec, steps=20, guidance_scale=1.0)
    # A full batch of 8 guided images takes 30 calls of 16 rows; one of 8 unguided images, 20 calls of 8 rows.
    seconds = 30 * cost.step_s(16) + 20 * cost.step_s(8) + 16 * cost.decode_s
    assert full_batch_images_per_s([guided, unguided], 8, cost) == pytest.approx(16 / seconds)
