"""The batching simulation: the server's batching decisions on a simulated device, as `just bench-batching`."""

from __future__ import annotations

from bench.batching_sim import CURVE, CostCurve, simulate, trace
from forge.batching import BatchPolicy


def test_the_cost_curve_is_interpolated_between_its_points() -> None:
    cost = CostCurve(CURVE)
    assert cost.step_s(2) == 0.0995 and cost.step_s(8) == 0.153
    assert cost.step_s(2) < cost.step_s(4) < cost.step_s(8) < cost.step_s(16)


def test_step_level_keeps_batches_fuller_than_request_level_on_one_trace() -> None:
    arrivals = trace(0.6, seed=3)[:120]
    cost = CostCurve(CURVE)
    request = simulate(arrivals, BatchPolicy(max_images=8), cost)
    step = simulate(arrivals, BatchPolicy(max_images=8, step_level=True), cost)
    assert request.images == step.images == 120  # every task is served, in either mode
    assert step.summary()["mean_batch_images"] > request.summary()["mean_batch_images"]
    assert step.summary()["p99_s"] < request.summary()["p99_s"]
