"""Prometheus metrics, fed by the event hub: every event this process records passes through `observe`, and
the scheduler reports each task it takes (for its style and creation time): one box's queued tasks, or the
tasks a fleet worker claims. So a task's run is counted by the node that ran it, once across a fleet, and
ingress counts the submissions the node answered. Gauges are read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from forge.content_filter import CONTENT_FILTERED
from forge.events import AnyTaskEvent, Cancelled, Failed, Postprocessing, Started, Succeeded
from forge.tasks import TaskRecord

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
# Loading a model: seconds from the cache, up to half an hour for a cold compile or TensorRT build.
LOAD_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


@dataclass
class _Tracked:
    styles: str
    created_at: float
    images: int
    started: float | None = None
    device: str | None = None
    batch: int = 1
    denoised: float | None = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.generations = Counter(
            "chara_forge_generations",
            "Generations that ended, by final state and style",
            ["state", "style"],
            registry=r,
        )
        self.images = Counter("chara_forge_images", "Images delivered", registry=r)
        self.submissions = Counter(
            "chara_forge_submissions",
            "Generations submitted and accepted, by how they were answered: new (queued), idempotent (a replay of "
            "an earlier submission), cached (the images existed already)",
            ["how"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "chara_forge_queue_wait_seconds", "From accepted to started", buckets=DURATION_BUCKETS, registry=r
        )
        self.denoise = Histogram(
            "chara_forge_denoise_seconds", "From started to denoised (includes a model load)", buckets=DURATION_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.postprocess = Histogram(
            "chara_forge_postprocess_seconds", "Post-processing and writing the files", buckets=DURATION_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.end_to_end = Histogram(
            "chara_forge_end_to_end_seconds", "From accepted to succeeded", buckets=DURATION_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "chara_forge_batch_tasks", "Tasks in the UNet batch each task ran in", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_batch_images = Histogram(
            "chara_forge_step_batch_images",
            "Images in each UNet call of a step-level batch (how full the batch is, step by step)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.engine_busy = Counter(
            "chara_forge_engine_busy_seconds", "Time each engine spent on tasks", ["device"], registry=r
        )
        self.model_load = Histogram(
            "chara_forge_model_load_seconds",
            "Loading and warming a model on a device, compiling or building its engines included",
            ["device", "model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "chara_forge_rejections",
            "Requests refused, by error code (rate_limited and content_filtered among them)",
            ["code"],
            registry=r,
        )
        r.register(_CompileCollector())
        self._started_at = time.monotonic()
        self._tracked: dict[str, _Tracked] = {}
        self._busy: dict[str, float] = {}

    def watch(
        self,
        queue_depth: Callable[[], float],
        running: Callable[[], float],
        devices: list[str],
        writes_waiting_for_space: Callable[[], float],
    ) -> None:
        """Gauges computed when scraped."""
        r = self.registry
        Gauge("chara_forge_queue_depth", "Tasks waiting", registry=r).set_function(queue_depth)
        Gauge("chara_forge_running", "Tasks on an engine", registry=r).set_function(running)
        Gauge(
            "chara_forge_writes_waiting_for_disk_space",
            "Writes of accepted work (task states, images) held in memory until the full disk has room",
            registry=r,
        ).set_function(writes_waiting_for_space)
        ratio = Gauge("chara_forge_engine_busy_ratio", "Busy time over uptime, per engine", ["device"], registry=r)
        memory = Gauge("chara_forge_gpu_memory_bytes", "GPU memory allocated by PyTorch", ["device"], registry=r)
        for device in devices:
            ratio.labels(device).set_function(partial(self.busy_ratio, device))
            if device.startswith("cuda"):
                memory.labels(device).set_function(partial(_gpu_memory, device))

    def busy_ratio(self, device: str) -> float:
        return self._busy.get(device, 0.0) / max(time.monotonic() - self._started_at, 1e-9)

    def track(self, task: TaskRecord) -> None:
        styles = "+".join(task.spec.styles) or "none"
        self._tracked.setdefault(task.id, _Tracked(styles, task.created_at, task.spec.num_images))

    def submitted(self, how: str) -> None:
        self.submissions.labels(how).inc()

    def model_loaded(self, device: str, model_id: str, seconds: float) -> None:
        self.model_load.labels(device, model_id).observe(seconds)

    def rejected(self, code: str) -> None:
        self.rejections.labels(code).inc()

    def observe(self, event: AnyTaskEvent) -> None:
        tracked = self._tracked.get(event.task_id)
        if tracked is None:
            return
        now = time.time()
        match event:
            case Started():
                tracked.started, tracked.device, tracked.batch = now, event.device, event.batch
                self.queue_wait.observe(max(now - tracked.created_at, 0.0))
                self.batch_tasks.observe(event.batch)
            case Postprocessing() if event.stage is None and tracked.started is not None:
                tracked.denoised = now
                self.denoise.observe(now - tracked.started)
                self._add_busy(tracked, now)
            case Succeeded() | Failed() | Cancelled():
                del self._tracked[event.task_id]
                state = {Succeeded: "succeeded", Failed: "failed", Cancelled: "cancelled"}[type(event)]
                if isinstance(event, Failed) and event.code == CONTENT_FILTERED:
                    state = "filtered"
                self.generations.labels(state, tracked.styles).inc()
                if tracked.denoised is None:
                    self._add_busy(tracked, now)
                if isinstance(event, Succeeded):
                    self.images.inc(len(event.images))
                    self.end_to_end.observe(max(now - tracked.created_at, 0.0))
                    if tracked.denoised is not None:
                        self.postprocess.observe(now - tracked.denoised)

    def _add_busy(self, tracked: _Tracked, now: float) -> None:
        if tracked.started is not None and tracked.device is not None:
            share = (now - tracked.started) / tracked.batch  # a batch's tasks share the engine's time
            self.engine_busy.labels(tracked.device).inc(share)
            self._busy[tracked.device] = self._busy.get(tracked.device, 0.0) + share
            tracked.started = None


class _CompileCollector(Collector):
    """torch.compile's graphs per compiled engine, read when scraped: all of them, and those compiled after
    warm-up, which held the device while serving (a steady state has none)."""

    def collect(self) -> Iterator[Metric]:
        from engines.compile_watch import every_engine

        labels = ["device", "model"]
        compiles = CounterMetricFamily("chara_forge_engine_compiles", "Graphs torch.compile compiled", labels=labels)
        recompiles = CounterMetricFamily(
            "chara_forge_engine_recompiles", "Graphs compiled after warm-up, while serving", labels=labels
        )
        for device, model, counts in every_engine():
            compiles.add_metric([device, model], counts.compiles)
            recompiles.add_metric([device, model], counts.recompiles)
        yield compiles
        yield recompiles


def _gpu_memory(device: str) -> float:
    import torch

    return float(torch.cuda.memory_allocated(device))
