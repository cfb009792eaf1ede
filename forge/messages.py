"""Messages between actors. In-process only: never encoded, so they may carry images and flags."""

from __future__ import annotations

from typing import Any

import msgspec

from forge.engine import CancelFlag, ModelInfo
from forge.tasks import TaskRecord


class Msg(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


class Submit(Msg, frozen=True):
    """Ingress -> scheduler: a committed `queued` task to schedule."""

    task: TaskRecord
    request_id: str = ""


class Cancel(Msg, frozen=True):
    """Ingress -> scheduler: cancel exactly this task, wherever it is."""

    task_id: str


class EngineReady(Msg, frozen=True):
    """Engine -> scheduler: loaded, warmed and free for work."""

    device: str


class EngineIdle(Msg, frozen=True):
    """Engine -> scheduler: finished the batch of `task_ids` (whatever each outcome) and is free again."""

    device: str
    task_ids: list[str]


class TaskLeft(Msg, frozen=True):
    """Engine -> scheduler: in a step-level batch, this task is done (whatever its outcome): its images' room
    is free for a task to join (the scheduler knows where it ran)."""

    task_id: str


class Wake(Msg, frozen=True):
    """Fleet -> scheduler: the shared queue may have work (an idle engine should try to claim it)."""


SchedulerInbox = Submit | Cancel | EngineReady | EngineIdle | TaskLeft | Wake


class Assignment(msgspec.Struct, frozen=True, kw_only=True):
    """One task of a dispatched batch, already marked `running`, with the flag that cancels it alone."""

    task: TaskRecord
    cancel: CancelFlag
    request_id: str = ""


class Dispatch(Msg, frozen=True):
    """Scheduler -> engine: run these tasks as one batch (they share a batch key; often just one task). With
    step-level batching, a Dispatch to an engine that is running a batch of the same key joins it."""

    batch: list[Assignment]
    step_level: bool = False


EngineInbox = Dispatch


class Generated(Msg, frozen=True):
    """Engine -> post-processor: raw images of one attempt, ready to encode and store."""

    task: TaskRecord
    images: list[Any]
    model: ModelInfo
    device: str
    denoise_s: float
    request_id: str = ""


PostprocessInbox = Generated
