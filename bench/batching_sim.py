"""Request-level against step-level batching on a simulated device, with a simulated clock.

The batching decisions are the server's own: which queued tasks start together (`forge.batching.next_batch`)
and which task joins a running step-level batch (`forge.batching.may_join`), on real `GenerationSpec`s, and
the step loop's rules (one UNet call per step over every active task; a task leaves after its own steps; its
image is decoded between steps). The device is simulated: a UNet call costs what the cost curve says for its
rows (bench/cost_curves/h100_sdxl_1024.json, interpolated), a decode costs its per-image time.

One seeded trace: Poisson arrivals at 50%, 80% and 95% of request-level capacity, steps 20-40, two sizes,
guidance scales 3-8 with a tenth unguided, one image each. Request-level capacity has two readings, and the
loads are run at both:
- measured: request-level images/s with the whole trace queued at once, as throughput benchmarks measure it;
- nominal: request-level images/s when every batch is full (`max_batch` images of one key), the capacity the
  cost curve promises it and the one it tends to as its queue grows without bound.
Below a server's capacity it serves what is offered, so at a load it keeps up with, step/request cannot pass
offered/request: each load gives the offered images/s and that ceiling of the ratio.

Prints one JSON line: images/s, p50/p95/p99 latency and mean batch occupancy per mode and load, the ratios
step/request, the same at saturation, and per reading the targets (>= 1.5x images/s at 95% load, p99 <= 0.5x
at 80% load).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.batching import BatchPolicy, batch_key, may_join, next_batch
from forge.requests import GenerationSpec, SchedulerName

CURVE = Path(__file__).parent / "cost_curves" / "h100_sdxl_1024.json"
MAX_IMAGES = 8
TASKS = 400
LOADS = (0.5, 0.8, 0.95)
SIZES = ((1024, 1024), (832, 1216))
SAMPLERS: tuple[SchedulerName, ...] = ("euler", "euler_a", "dpmpp_2m_karras")


class CostCurve:
    def __init__(self, path: Path) -> None:
        """`path`: a curve file (see bench/cost_curves), or the JSON `just bench-gpu` wrote, whose cost_curve
        section has the points it measured."""
        data = json.loads(path.read_text())
        data = data.get("cost_curve", data)
        self.points = sorted((float(rows), float(seconds)) for rows, seconds in data["points"])
        self.decode_s = float(data["decode_s_per_image"])
        self.name = path.name

    def step_s(self, rows: int) -> float:
        """Seconds for one UNet call of `rows` rows, linear between (and beyond) the measured points."""
        points = self.points
        if len(points) == 1:
            return points[0][1]
        for (r0, s0), (r1, s1) in itertools.pairwise(points):
            if rows <= r1 or (r1, s1) == points[-1]:
                return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
        return points[-1][1]


def make_spec(rng: random.Random, index: int) -> GenerationSpec:
    width, height = rng.choice(SIZES)
    guidance = 1.0 if rng.random() < 0.1 else round(rng.uniform(3, 8), 1)
    return GenerationSpec(
        prompt=f"character {index}", negative_prompt="", styles=[], width=width, height=height, num_images=1,
        steps=rng.randint(20, 40), guidance_scale=guidance, seed=index, scheduler=rng.choice(SAMPLERS),
        output_format="png", priority=0, model="sdxl-base", styled_prompt=f"character {index}",
        styled_negative_prompt="",
    )  # fmt: skip


@dataclass
class _Task:
    spec: GenerationSpec
    arrival: float
    step: int = 0
    finished: float = 0.0

    @property
    def rows(self) -> int:
        return self.spec.num_images * (2 if self.spec.guidance_scale > 1 else 1)


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    images: int = 0
    first_arrival: float = 0.0
    last_finish: float = 0.0
    occupancy: list[int] = field(default_factory=list)  # images in each UNet call

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies)

        def percentile(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {
            "images_per_s": round(self.images / (self.last_finish - self.first_arrival), 4),
            "p50_s": round(percentile(0.5), 2),
            "p95_s": round(percentile(0.95), 2),
            "p99_s": round(percentile(0.99), 2),
            "mean_batch_images": round(statistics.fmean(self.occupancy), 2),
        }


def simulate(arrivals: list[tuple[float, GenerationSpec]], policy: BatchPolicy, cost: CostCurve) -> Result:
    """One device serving the trace with the server's batching decisions."""
    pending = [_Task(spec, at) for at, spec in arrivals]
    queue: list[_Task] = []
    result = Result(first_arrival=arrivals[0][0])
    now = 0.0
    active: list[_Task] = []

    def admit_arrivals() -> None:
        while pending and pending[0].arrival <= now:
            queue.append(pending.pop(0))

    def finish(task: _Task) -> None:
        nonlocal now
        now += cost.decode_s * task.spec.num_images  # the device decodes between steps
        task.finished = now
        result.latencies.append(task.finished - task.arrival)
        result.images += task.spec.num_images
        result.last_finish = now

    while pending or queue or active:
        admit_arrivals()
        if not active:
            if not queue:
                now = pending[0].arrival
                continue
            chosen = next_batch([task.spec for task in queue], policy)
            active = [queue[index] for index in chosen]
            for task in active:
                queue.remove(task)
        if policy.step_level:
            key = batch_key(active[0].spec, step_level=True)
            while queue and key is not None and may_join(queue[0].spec, key, _images(active), policy):
                active.append(queue.pop(0))
            result.occupancy.append(_images(active))
            now += cost.step_s(sum(task.rows for task in active))
            for task in active:
                task.step += 1
            for task in [task for task in active if task.step == task.spec.steps]:
                active.remove(task)
                finish(task)
        else:  # the whole batch runs its (shared) steps, then each image is decoded
            steps = active[0].spec.steps
            result.occupancy.extend([_images(active)] * steps)
            now += steps * cost.step_s(sum(task.rows for task in active))
            for task in active:
                finish(task)
            active = []
    return result


def _images(tasks: list[_Task]) -> int:
    return sum(task.spec.num_images for task in tasks)


def full_batch_images_per_s(specs: list[GenerationSpec], max_images: int, cost: CostCurve) -> float:
    """Images/s if every task ran in a full batch of its key: each image's share of its batch's UNet calls,
    plus its own decode."""
    seconds = 0.0
    for spec in specs:
        rows_per_image = 2 if spec.guidance_scale > 1 else 1
        batch_s = spec.steps * cost.step_s(max_images * rows_per_image)
        seconds += spec.num_images * (batch_s / max_images + cost.decode_s)
    return sum(spec.num_images for spec in specs) / seconds


def _ratio(runs: dict[str, Any], metric: str) -> float:
    return round(float(runs["step"][metric]) / float(runs["request"][metric]), 3)


def trace(rate: float, seed: int) -> list[tuple[float, GenerationSpec]]:
    rng = random.Random(seed)
    now, arrivals = 0.0, []
    for index in range(TASKS):
        now += rng.expovariate(rate)
        arrivals.append((now, make_spec(rng, index)))
    return arrivals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curve", type=Path, default=CURVE, help="a cost curve, or $OUT/gpu_bench.json")
    path = parser.parse_args().curve
    try:
        cost = CostCurve(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"--curve {path}: not a cost curve ({type(exc).__name__}: {exc})")
    request = BatchPolicy(max_images=MAX_IMAGES, step_level=False)
    step = BatchPolicy(max_images=MAX_IMAGES, step_level=True)
    modes = (("request", request), ("step", step))
    saturated = [(0.0, spec) for _, spec in trace(1.0, seed=7)]
    saturation = {mode: simulate(saturated, policy, cost).summary() for mode, policy in modes}
    capacities = {
        "measured": saturation["request"]["images_per_s"],
        "nominal": round(full_batch_images_per_s([spec for _, spec in saturated], MAX_IMAGES, cost), 4),
    }
    report: dict[str, object] = {
        "benchmark": "batching_sim", "curve": cost.name, "tasks": TASKS,
        "request_capacity_images_per_s": capacities,
        "saturated": saturation | {"images_per_s_ratio": _ratio(saturation, "images_per_s")},
    }  # fmt: skip
    for reading, capacity in capacities.items():
        loads: dict[str, Any] = {}
        for load in LOADS:
            arrivals = trace(load * capacity, seed=11)
            runs: dict[str, Any] = {mode: simulate(arrivals, policy, cost).summary() for mode, policy in modes}
            offered = sum(spec.num_images for _, spec in arrivals) / (arrivals[-1][0] - arrivals[0][0])
            runs["offered_images_per_s"] = round(offered, 4)
            runs["ratios"] = {
                "images_per_s": _ratio(runs, "images_per_s"),
                "images_per_s_ceiling": round(offered / runs["request"]["images_per_s"], 3),
                "p99": _ratio(runs, "p99_s"),
            }
            loads[f"load_{int(load * 100)}"] = runs
        loads["targets"] = {
            "images_per_s_ratio_at_95_ge_1.5": loads["load_95"]["ratios"]["images_per_s"] >= 1.5,
            "p99_ratio_at_80_le_0.5": loads["load_80"]["ratios"]["p99"] <= 0.5,
        }
        report[f"{reading}_capacity"] = loads
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
