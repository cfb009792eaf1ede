"""A task's states and its stored record."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from forge.requests import GenerationSpec


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    POSTPROCESSING = "postprocessing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FILTERED = "filtered"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.FILTERED})
ACTIVE_STATES = frozenset({TaskState.RUNNING, TaskState.POSTPROCESSING})


class TaskRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the tasks table."""

    id: str
    seq: int
    owner: str
    spec: GenerationSpec
    state: TaskState
    attempt: int
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    images: list[str] = []
    metadata_path: str | None = None
    idempotency_key: str | None = None
    worker: str = ""  # the fleet node that claimed it last (Redis store)
