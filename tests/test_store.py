"""The store on a real SQLite file: WAL, compare-and-set transitions, recovery after a crash."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from actors.store import Store
from forge.requests import GenerationSpec
from forge.tasks import TaskState

pytestmark = pytest.mark.anyio

SPEC = GenerationSpec(
    prompt="p",
    negative_prompt="",
    styles=[],
    width=64,
    height=64,
    num_images=1,
    steps=2,
    guidance_scale=5.0,
    seed=1,
    scheduler="euler",
    output_format="png",
    priority=0,
    model="m",
    styled_prompt="p",
    styled_negative_prompt="",
)


async def test_database_is_wal_and_rows_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "forge.sqlite3"
    async with Store.open(path) as store:
        task = await store.insert(owner="a", spec=SPEC)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    async with Store.open(path) as store:
        again = await store.get(task.id)
    assert again is not None and again.spec == SPEC and again.state is TaskState.QUEUED and again.attempt == 1


async def test_transition_refuses_wrong_state_or_older_attempt(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "db") as store:
        task = await store.insert(owner="a", spec=SPEC)
        assert await store.transition(task.id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.RUNNING)
        assert not await store.transition(task.id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.RUNNING)
        assert not await store.transition(task.id, attempt=0, from_states=[TaskState.RUNNING], to=TaskState.SUCCEEDED)
        assert await store.transition(
            task.id, attempt=1, from_states=[TaskState.RUNNING], to=TaskState.FAILED, error_code="x", error_message="y"
        )
        final = await store.get(task.id)
    assert final is not None and final.state is TaskState.FAILED and final.finished_at is not None


async def test_recover_requeues_in_order_and_gives_up_after_max_attempts(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "db") as store:
        first = await store.insert(owner="a", spec=SPEC)
        running = await store.insert(owner="a", spec=SPEC)
        last = await store.insert(owner="a", spec=SPEC)
        await store.transition(running.id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.RUNNING)

        recovery = await store.recover(max_attempts=2)
        assert [t.id for t in recovery.requeued] == [first.id, running.id, last.id]
        assert (recovery.retried, recovery.failed) == (1, 0)
        retried = await store.get(running.id)
        assert retried is not None and retried.attempt == 2 and retried.state is TaskState.QUEUED
        # A write from the lost first attempt changes nothing.
        assert not await store.transition(running.id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.RUNNING)

        await store.transition(running.id, attempt=2, from_states=[TaskState.QUEUED], to=TaskState.POSTPROCESSING)
        recovery = await store.recover(max_attempts=2)
        assert (recovery.retried, recovery.failed) == (0, 1)
        lost = await store.get(running.id)
    assert lost is not None and lost.state is TaskState.FAILED and lost.error_code == "worker_lost"


async def test_idempotency_key_is_unique_per_owner(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "db") as store:
        await store.insert(owner="a", spec=SPEC, idempotency_key="k", request_hash="h")
        await store.insert(owner="b", spec=SPEC, idempotency_key="k", request_hash="h")
        with pytest.raises(sqlite3.IntegrityError):
            await store.insert(owner="a", spec=SPEC, idempotency_key="k", request_hash="h")
        found = await store.find_idempotent("a", "k")
    assert found is not None and found[1] == "h"
