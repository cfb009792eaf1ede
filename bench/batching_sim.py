"""Request-level against step-level batching on a simulated device, with a simulated clock.

The engine is the server's own (`engines.eager.EagerEngine` on the tiny model): `run_batch` for request-level
batches and `run_steps`, the step loop, for step-level ones, with their prompt encoding, per-task samplers,
joins between steps and decodes. Only the device is simulated: each UNet call advances the clock by what the
cost curve says for its rows (bench/cost_curves/h100_sdxl_1024.json, interpolated) and returns zeros; each VAE
decode costs its per-image time; the text encoders take none. Which queued tasks start together and which may
join a running batch are the scheduler's own decisions (`forge.batching.next_batch` and `may_join`, on real
`GenerationSpec`s); the tasks run at the tiny model's sizes, one to one with the trace's two.

One seeded trace: Poisson arrivals, steps 20-40, two sizes, guidance scales 3-8 with a tenth unguided, one image
each. For each cost curve (by default every one in bench/cost_curves: an H100's and an H200's):
- saturation: the whole trace queued at once, images/s and latencies per mode;
- goodput, MLPerf's server measure: the highest arrival rate (images/s, in steps of a tenth of request-level's
  nominal capacity, i.e. every batch full) whose p99 latency stays within 10 s and within 20 s, per mode;
- the target: step-level's goodput at p99 <= 20 s at least 1.5x request-level's.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch

from engines.eager import EagerEngine
from forge.batching import BatchPolicy, batch_key, may_join, next_batch
from forge.engine import Job, ModelInfo, job_for
from forge.requests import GenerationSpec, SchedulerName

CURVES = Path(__file__).parent / "cost_curves"
CURVE = CURVES / "h100_sdxl_1024.json"
MAX_IMAGES = 8
TASKS = 400
MODEL = "sdxl-base"
SLOS_S = (10.0, 20.0)
# Arrival rates tried for goodput, as fractions of request-level's nominal capacity.
RATES = tuple(round(0.1 * step, 1) for step in range(1, 13))
TARGET_GOODPUT_RATIO = 1.5  # step over request, at p99 <= 20 s
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
        output_format="png", priority=0, model=MODEL, styled_prompt=f"character {index}",
        styled_negative_prompt="",
    )  # fmt: skip


@dataclass
class _Task:
    spec: GenerationSpec  # as the scheduler sees it
    job: Job  # as the engine runs it: the same task at the tiny model's size
    arrival: float

    @property
    def images(self) -> int:
        return self.spec.num_images


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


class SimulatedDevice:
    """The engine's UNet and VAE, made to take the cost curve's time on a simulated clock and to return zeros:
    what is timed is the loop around them, which is the engine's own."""

    def __init__(self, engine: EagerEngine, cost: CostCurve) -> None:
        self.engine = engine
        self.now = 0.0
        self.calls = 0
        scale = engine.pipe.vae_scale_factor

        def unet(sample: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
            self.now += cost.step_s(int(sample.shape[0]))
            self.calls += 1
            return (torch.zeros_like(sample),)

        def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
            self.now += cost.decode_s * int(latents.shape[0])
            batch, _, height, width = latents.shape
            return (torch.zeros(batch, 3, height * scale, width * scale),)

        engine.pipe.unet.forward = unet
        engine.pipe.vae.decode = decode
        for encoder in (engine.pipe.text_encoder, engine.pipe.text_encoder_2):
            encoder.forward = _by_shape(encoder.forward)


def _by_shape(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A text encoder that runs once per input shape and then answers the same: the simulated device gives
    prompt encoding no time (it is small beside the steps), and the tiny model's encoders would take the
    CPU's."""
    answers: dict[tuple[int, ...], Any] = {}

    def encode(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shape = tuple(input_ids.shape)
        if shape not in answers:
            answers[shape] = forward(input_ids, *args, **kwargs)
        return answers[shape]

    return encode


def tiny_engine(folder: Path) -> EagerEngine:
    from engines.tiny import build_tiny_sdxl

    path = build_tiny_sdxl(folder)
    return EagerEngine(
        ModelInfo(name="tiny", path=str(path), is_tiny=True, default_size=64, default_steps=4,
                  default_guidance=5.0, min_size=16, max_size=256, id=MODEL),
        "cpu",
    )  # fmt: skip


def simulate(arrivals: list[tuple[float, GenerationSpec]], policy: BatchPolicy, device: SimulatedDevice) -> Result:
    """One device serving the trace from time 0: the scheduler's batching decisions, the engine's loops."""
    engine, device.now = device.engine, 0.0
    pending = deque(_Task(spec, job_for(_tiny(spec), engine.model), at) for at, spec in arrivals)
    queue: list[_Task] = []
    result = Result(first_arrival=arrivals[0][0])

    def admit_arrivals() -> None:
        while pending and pending[0].arrival <= device.now:
            queue.append(pending.popleft())

    def finish(task: _Task, outcome: object) -> None:
        if isinstance(outcome, BaseException):
            raise outcome
        result.latencies.append(device.now - task.arrival)
        result.images += task.images
        result.last_finish = device.now

    while pending or queue:
        admit_arrivals()
        if not queue:
            device.now = pending[0].arrival
            continue
        batch = [queue[index] for index in next_batch([task.spec for task in queue], policy)]
        for task in batch:
            queue.remove(task)
        if policy.step_level:
            _run_steps(batch, queue, admit_arrivals, finish, policy, engine, result)
        else:  # the batch shares its steps, then its images are decoded
            calls = device.calls
            outcomes = engine.run_batch([task.job for task in batch])
            result.occupancy.extend([sum(task.images for task in batch)] * (device.calls - calls))
            for task, outcome in zip(batch, outcomes, strict=True):
                finish(task, outcome)
    return result


def _run_steps(
    batch: list[_Task],
    queue: list[_Task],
    admit_arrivals: Callable[[], None],
    finish: Callable[[_Task, object], None],
    policy: BatchPolicy,
    engine: EagerEngine,
    result: Result,
) -> None:
    """One step-level batch, as the engine actor runs it: the head of the queue joins between steps when
    the scheduler's rule lets it."""
    key = batch_key(batch[0].spec, step_level=True)
    running = {id(task.job): task for task in batch}

    def joiners(free_images: int) -> list[Job]:
        admit_arrivals()
        joined: list[Job] = []
        images = sum(task.images for task in running.values())
        while queue and key is not None and may_join(queue[0].spec, key, images, policy):
            task = queue.pop(0)
            running[id(task.job)] = task
            images += task.images
            joined.append(task.job)
        return joined

    def on_done(job: Job, outcome: object) -> None:
        finish(running.pop(id(job)), outcome)

    engine.run_steps([task.job for task in batch], on_done, joiners, policy.max_images, result.occupancy.append)


def _tiny(spec: GenerationSpec) -> GenerationSpec:
    """The task at the tiny model's scale: about a sixteenth of each side, in multiples of 16 (1024 -> 64)."""
    return msgspec.structs.replace(spec, width=round(spec.width / 256) * 16, height=round(spec.height / 256) * 16)


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


def trace(rate: float, seed: int, tasks: int = TASKS) -> list[tuple[float, GenerationSpec]]:
    rng = random.Random(seed)
    now, arrivals = 0.0, []
    for index in range(tasks):
        now += rng.expovariate(rate)
        arrivals.append((now, make_spec(rng, index)))
    return arrivals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--curve", type=Path, action="append", help="a cost curve, or $OUT/gpu_bench.json (again for more)"
    )
    parser.add_argument("--tasks", type=int, default=TASKS, help="tasks in the trace")
    args = parser.parse_args()
    paths = args.curve or sorted(CURVES.glob("*.json"))
    costs = []
    for path in paths:
        try:
            costs.append(CostCurve(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--curve {path}: not a cost curve ({type(exc).__name__}: {exc})")
    if args.tasks < 10:
        parser.error("--tasks: at least 10")
    with tempfile.TemporaryDirectory() as scratch:
        engine = tiny_engine(Path(scratch) / "tiny-sdxl")
        curves = {cost.name: run(cost, engine, args.tasks) for cost in costs}
    json.dump({"benchmark": "batching_sim", "tasks": args.tasks, "curves": curves}, sys.stdout)
    print()


def run(cost: CostCurve, engine: EagerEngine, tasks: int) -> dict[str, Any]:
    """Saturation and goodput of both modes on one cost curve."""
    modes = {"request": BatchPolicy(max_images=MAX_IMAGES), "step": BatchPolicy(max_images=MAX_IMAGES, step_level=True)}
    device = SimulatedDevice(engine, cost)
    saturated = [(0.0, spec) for _, spec in trace(1.0, seed=7, tasks=tasks)]
    saturation = {mode: simulate(saturated, policy, device).summary() for mode, policy in modes.items()}
    capacity = full_batch_images_per_s([spec for _, spec in saturated], MAX_IMAGES, cost)
    goodput = {mode: _goodput(policy, device, capacity, tasks) for mode, policy in modes.items()}
    ratios = {
        slo: round(goodput["step"][slo] / goodput["request"][slo], 3) if goodput["request"][slo] else None
        for slo in goodput["step"]
    }
    at_20 = ratios["p99_20s"]
    return {
        "nominal_capacity_images_per_s": round(capacity, 4),
        "saturated": saturation | {"images_per_s_ratio": _ratio(saturation, "images_per_s")},
        "goodput_images_per_s": goodput,
        "goodput_ratio": ratios,
        "targets": {"goodput_ratio_p99_20s_ge_1.5": at_20 is not None and at_20 >= TARGET_GOODPUT_RATIO},
    }


def _goodput(policy: BatchPolicy, device: SimulatedDevice, capacity: float, tasks: int) -> dict[str, float]:
    """The highest offered images/s whose p99 stays within each SLO, trying RATES in order until the p99 passes
    the largest (a faster rate only queues more)."""
    best = {f"p99_{slo:g}s": 0.0 for slo in SLOS_S}
    for fraction in RATES:
        arrivals = trace(fraction * capacity, seed=11, tasks=tasks)
        offered = sum(spec.num_images for _, spec in arrivals) / (arrivals[-1][0] - arrivals[0][0])
        p99 = simulate(arrivals, policy, device).summary()["p99_s"]
        for slo in SLOS_S:
            if p99 <= slo:
                best[f"p99_{slo:g}s"] = round(offered, 4)
        if p99 > max(SLOS_S):
            break
    return best


if __name__ == "__main__":
    main()
