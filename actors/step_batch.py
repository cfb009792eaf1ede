"""The state of one step-level batch on an engine: the tasks in it, those waiting to join at the next step,
and which have ended. Shared by the event loop (which adds joiners) and the device thread (which takes them
between steps), so the waiting line has a lock."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from forge.engine import Job


@dataclass
class StepBatch:
    runs: dict[int, Any] = field(default_factory=dict)  # id(job) -> the actor's run of it
    waiting: deque[Any] = field(default_factory=deque)
    ended: set[str] = field(default_factory=set)  # task ids
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, run: Any) -> None:
        """A run joins at the next step (from the event loop)."""
        with self._lock:
            self.runs[id(run.job)] = run
            self.waiting.append(run)

    def take(self, free_images: int) -> list[Job]:
        """The waiting runs' jobs that fit `free_images`, in arrival order (on the device thread)."""
        taken = []
        with self._lock:
            while self.waiting and len(self.waiting[0].job.seeds) <= free_images:
                run = self.waiting.popleft()
                free_images -= len(run.job.seeds)
                taken.append(run.job)
        return taken

    def take_all(self) -> list[Any]:
        with self._lock:
            runs = list(self.waiting)
            self.waiting.clear()
        return runs

    def run_of(self, job: Job) -> Any:
        return self.runs[id(job)]

    @property
    def task_ids(self) -> list[str]:
        return [run.assignment.task.id for run in self.runs.values()]
