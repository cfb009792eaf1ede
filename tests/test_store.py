"""The store's contract, run against both backends (a real SQLite file and a real redis-server): inserts,
compare-and-set transitions with attempts, recovery of lost work, idempotency, listing, limits and keys."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import redis

from actors.caller_models import CallerModels, RedisCallerModels, SqliteCallerModels
from actors.characters import CharacterStore, NameTaken, RedisCharacters, SqliteCharacters
from actors.keys import KeyStore, RedisKeys, SqliteKeys
from actors.rate_limits import RateLimited
from actors.redis_store import RedisStore
from actors.sqlite_store import SqliteStore
from actors.store import Admission, IdempotencyConflict, TaskStore
from forge.auth import Plan
from forge.batching import batch_key
from forge.errors import ServiceUnavailable
from forge.requests import GenerationSpec
from forge.tasks import TaskRecord, TaskState
from tests.redis_server import REDIS_SERVER, running_redis

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
OPEN = Admission(max_queue=100)


@dataclass
class Backend:
    """A store and what differs in how its work is taken and lost: on one box the scheduler marks a task
    running and a restart recovers it; in a fleet a worker claims it and the reaper takes back silent claims."""

    store: TaskStore
    keys: KeyStore
    characters: CharacterStore
    caller_models: CallerModels

    async def start(self, task: TaskRecord) -> None:
        if isinstance(self.store, RedisStore):
            assert task.id in await self.store.claim("w1", "cpu", 1, [task.spec.model], 10)
        else:
            assert await self.store.transition(
                task.id, attempt=task.attempt, from_states=[TaskState.QUEUED], to=TaskState.RUNNING
            )

    async def lose_workers(self, max_attempts: int) -> tuple[int, int]:
        """(retried, failed)"""
        if isinstance(self.store, RedisStore):
            await anyio.sleep(0.05)
            return await self.store.reap(0.01, max_attempts)
        recovery = await self.store.recover(max_attempts)
        return recovery.retried, recovery.failed


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        database = tmp_path / "forge.sqlite3"
        async with SqliteStore.open(database) as store:
            yield Backend(
                store, KeyStore(SqliteKeys(database)), SqliteCharacters(database), SqliteCallerModels(database)
            )
        return
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server); the Redis store tests need one")
    async with running_redis(tmp_path / "redis") as server, RedisStore.open(server.url) as fleet:
        client = redis.Redis.from_url(server.url)
        yield Backend(fleet, KeyStore(RedisKeys(client)), RedisCharacters(client), RedisCallerModels(client))


async def test_insert_then_get_gives_the_same_task(backend: Backend) -> None:
    task = await backend.store.insert(owner="a", spec=SPEC, admission=OPEN)
    again = await backend.store.get(task.id)
    assert again is not None and again.spec == SPEC and again.state is TaskState.QUEUED and again.attempt == 1
    assert again.seq == task.seq and again.owner == "a"
    assert await backend.store.get("0" * 32) is None


async def test_transition_refuses_wrong_state_or_older_attempt(backend: Backend) -> None:
    store = backend.store
    task = await store.insert(owner="a", spec=SPEC, admission=OPEN)
    await backend.start(task)
    assert not await store.transition(task.id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.RUNNING)
    assert not await store.transition(task.id, attempt=0, from_states=[TaskState.RUNNING], to=TaskState.SUCCEEDED)
    assert await store.transition(
        task.id, attempt=1, from_states=[TaskState.RUNNING], to=TaskState.FAILED, error_code="x", error_message="y"
    )
    final = await store.get(task.id)
    assert final is not None and final.state is TaskState.FAILED and final.finished_at is not None
    assert (final.error_code, final.error_message) == ("x", "y")
    assert (await store.count_by_state()).get(TaskState.FAILED) == 1


async def test_lost_work_runs_again_then_fails_as_worker_lost(backend: Backend) -> None:
    store = backend.store
    task = await store.insert(owner="a", spec=SPEC, admission=OPEN)
    await backend.start(task)
    assert await backend.lose_workers(max_attempts=2) == (1, 0)
    retried = await store.get(task.id)
    assert retried is not None and retried.attempt == 2 and retried.state is TaskState.QUEUED
    # A write from the lost first attempt changes nothing.
    assert not await store.transition(task.id, attempt=1, from_states=[TaskState.RUNNING], to=TaskState.SUCCEEDED)
    await backend.start(retried)
    assert await backend.lose_workers(max_attempts=2) == (0, 1)
    lost = await store.get(task.id)
    assert lost is not None and lost.state is TaskState.FAILED and lost.error_code == "worker_lost"


async def test_idempotency_key_is_unique_per_owner(backend: Backend) -> None:
    store = backend.store
    first = await store.insert(owner="a", spec=SPEC, admission=OPEN, idempotency_key="k", request_hash="h")
    await store.insert(owner="b", spec=SPEC, admission=OPEN, idempotency_key="k", request_hash="h")
    with pytest.raises(IdempotencyConflict) as taken:
        await store.insert(owner="a", spec=SPEC, admission=OPEN, idempotency_key="k", request_hash="h")
    assert taken.value.task_id == first.id and taken.value.request_hash == "h"
    found = await store.find_idempotent("a", "k")
    assert found is not None and found[0].id == first.id and found[1] == "h"


async def test_listing_is_newest_first_by_owner_and_state_with_cursors(backend: Backend) -> None:
    store = backend.store
    mine = [await store.insert(owner="a", spec=SPEC, admission=OPEN) for _ in range(5)]
    await store.insert(owner="b", spec=SPEC, admission=OPEN)
    await store.transition(mine[1].id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.CANCELLED)
    page = await store.list(owner="a", limit=3)
    assert [t.id for t in page] == [t.id for t in reversed(mine)][:3]
    rest = await store.list(owner="a", limit=3, before_seq=page[-1].seq)
    assert [t.id for t in rest] == [mine[1].id, mine[0].id]
    assert [t.id for t in await store.list(owner="a", before_id=mine[2].id)] == [mine[1].id, mine[0].id]
    assert [t.id for t in await store.list(owner="a", state=TaskState.CANCELLED)] == [mine[1].id]
    assert len(await store.list()) == 6


async def test_admission_counts_the_queue_and_each_plan(backend: Backend) -> None:
    store = backend.store
    plan = Plan(requests=3, window_s=60, max_queued=2)
    admission = Admission(max_queue=100, plan_name="small", plan=plan)
    first = await store.insert(owner="a", spec=SPEC, admission=admission)
    await store.insert(owner="a", spec=SPEC, admission=admission)
    with pytest.raises(RateLimited, match="2 generations queued or running"):
        await store.insert(owner="a", spec=SPEC, admission=admission)
    await store.insert(owner="b", spec=SPEC, admission=admission)  # another owner's own limits
    await store.transition(first.id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.CANCELLED)
    await store.insert(owner="a", spec=SPEC, admission=admission)  # the third of the window
    await store.transition(first.id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.CANCELLED)
    with pytest.raises(RateLimited) as refused:
        await store.insert(
            owner="a",
            spec=SPEC,
            admission=Admission(max_queue=100, plan_name="small", plan=Plan(requests=3, window_s=60)),
        )
    assert refused.value.retry_after_s >= 1 and "3 generations per 60 s" in refused.value.message
    with pytest.raises(ServiceUnavailable, match="queue is full"):
        await store.insert(owner="c", spec=SPEC, admission=Admission(max_queue=3))


async def test_keys_verify_until_revoked(backend: Backend) -> None:
    key, token = backend.keys.create("zoe", "premium", ["generate", "admin"])
    found = backend.keys.verify(token)
    assert found is not None and found.owner == "zoe" and found.scopes == ["admin", "generate"]
    assert backend.keys.verify(token[:-1] + ("x" if token[-1] != "x" else "y")) is None
    assert [k.id for k in backend.keys.list()] == [key.id]
    assert backend.keys.revoke(key.id) and not backend.keys.revoke(key.id)
    assert backend.keys.verify(token) is None


async def test_characters_have_unique_names_per_owner_and_versions(backend: Backend) -> None:
    import msgspec

    from forge.characters import Character, CharacterDefaults

    store = backend.characters
    hero = Character(
        id="ch_" + "1" * 32, owner="a", name="ayla", description="d", references=[], defaults=CharacterDefaults(),
        version=1, created_at=1.0, updated_at=1.0,
    )  # fmt: skip
    store.add(hero)
    store.add(msgspec.structs.replace(hero, id="ch_" + "2" * 32, owner="b"))  # another owner's ayla
    with pytest.raises(NameTaken):
        store.add(msgspec.structs.replace(hero, id="ch_" + "3" * 32))
    assert store.find("a", "ayla") == hero and store.get(hero.id) == hero
    renamed = msgspec.structs.replace(hero, name="aylin", version=2)
    assert store.replace(renamed) and not store.replace(renamed)  # version 1 is no longer there
    assert store.find("a", "ayla") is None and store.find("a", "aylin") == renamed
    store.add(msgspec.structs.replace(hero, id="ch_" + "4" * 32, name="bran"))
    with pytest.raises(NameTaken):
        store.replace(msgspec.structs.replace(renamed, name="bran", version=3))
    assert [c.name for c in store.all("a")] == ["aylin", "bran"] and len(store.all(None)) == 3
    assert store.delete(hero.id) and not store.delete(hero.id) and store.find("a", "aylin") is None


async def test_each_callers_model_is_kept_apart_and_replaced(backend: Backend) -> None:
    models = backend.caller_models
    assert models.get("a") is None
    models.set("a", "second")
    models.set("b", "tiny-sdxl")
    models.set("a", "third")
    assert (models.get("a"), models.get("b"), models.get("c")) == ("third", "tiny-sdxl", None)


async def test_sqlite_database_is_wal_and_rows_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "forge.sqlite3"
    async with SqliteStore.open(path) as store:
        task = await store.insert(owner="a", spec=SPEC, admission=OPEN)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    async with SqliteStore.open(path) as store:
        assert await store.get(task.id) is not None


async def test_a_box_moves_into_a_fleet_with_its_history_files_keys_and_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`chara-forge store migrate --from sqlite --to redis://…`"""
    import msgspec

    from actors.files import RedisFiles
    from forge.characters import Character, CharacterDefaults
    from forge.cli import main

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server); the Redis store tests need one")
    data = tmp_path / "box"
    async with SqliteStore.open(data / "forge.sqlite3") as box:
        done = await box.insert(owner="a", spec=SPEC, admission=OPEN, idempotency_key="k", request_hash="h")
        running = await box.insert(owner="a", spec=SPEC, admission=OPEN)
        waiting = await box.insert(owner="b", spec=_spec(steps=5), admission=OPEN)
        await box.transition(done.id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.RUNNING)
        await box.transition(
            done.id,
            attempt=1,
            from_states=[TaskState.RUNNING],
            to=TaskState.SUCCEEDED,
            images=[f"{done.id}/0.png"],
            metadata_path=f"{done.id}/metadata.json",
        )
        await box.transition(running.id, attempt=1, from_states=[TaskState.QUEUED], to=TaskState.RUNNING)
    (data / "outputs" / done.id).mkdir(parents=True)
    (data / "outputs" / done.id / "0.png").write_bytes(b"png bytes")
    _, token = KeyStore(SqliteKeys(data / "forge.sqlite3")).create("a", "free", ["generate"])
    hero = Character(
        id="ch_" + "1" * 32, owner="a", name="ayla", description="d", references=[], defaults=CharacterDefaults(),
        version=2, created_at=1.0, updated_at=2.0,
    )  # fmt: skip
    SqliteCharacters(data / "forge.sqlite3").add(hero)
    SqliteCharacters(data / "forge.sqlite3").add(msgspec.structs.replace(hero, id="ch_" + "2" * 32, name="bran"))
    SqliteCallerModels(data / "forge.sqlite3").set("a", "second")

    async with running_redis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        # The fleet already has another "bran" of the same owner: the fleet's is kept, and the clash is named.
        RedisCharacters(client).add(msgspec.structs.replace(hero, id="ch_" + "3" * 32, name="bran"))
        argv = ["store", "--data-dir", str(data), "migrate", "--from", "sqlite", "--to", server.url]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert "copied 3 task(s) (2 queued again), 1 file(s), 1 key(s) and 1 character(s)" in out
        assert "another character named a/bran" in err
        assert main(argv) == 0  # again: nothing is copied twice
        assert "copied 0 task(s)" in capsys.readouterr().out
        assert KeyStore(RedisKeys(client)).verify(token) is not None
        assert RedisCharacters(client).find("a", "ayla") == hero
        assert RedisCharacters(client).find("a", "bran").id == "ch_" + "3" * 32  # type: ignore[union-attr]
        assert RedisCallerModels(client).get("a") == "second"
        assert RedisFiles(client, "results", 0, tmp_path / "cache").read(f"{done.id}/0.png") == b"png bytes"
        async with RedisStore.open(server.url) as fleet:
            moved = await fleet.get(done.id)
            assert moved is not None and moved.state is TaskState.SUCCEEDED and moved.images == [f"{done.id}/0.png"]
            assert (await fleet.find_idempotent("a", "k")) is not None
            again = await fleet.get(running.id)
            assert again is not None and again.state is TaskState.QUEUED and again.attempt == 2
            assert [t.id for t in await fleet.list()] == [waiting.id, running.id, done.id]
            # Other step counts share a step-level batch: the migrated rows carry that key too.
            assert set(await fleet.claim("w", "cpu", 8, ["m"], 10, step_level=True)) == {running.id, waiting.id}
            new = await fleet.insert(owner="a", spec=SPEC, admission=OPEN)
            assert new.seq > waiting.seq


@pytest.fixture
async def fleet_store(tmp_path: Path) -> AsyncIterator[RedisStore]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server); the Redis store tests need one")
    async with running_redis(tmp_path / "redis") as server, RedisStore.open(server.url) as store:
        yield store


def _spec(**changes: object) -> GenerationSpec:
    import msgspec

    return msgspec.structs.replace(SPEC, **changes)


async def test_a_claim_takes_the_compatible_tasks_right_behind_the_head_as_one_batch(fleet_store: RedisStore) -> None:
    same = [await fleet_store.insert(owner="a", spec=SPEC, admission=OPEN) for _ in range(3)]
    other_size = await fleet_store.insert(owner="a", spec=_spec(width=128), admission=OPEN)
    last = await fleet_store.insert(owner="a", spec=SPEC, admission=OPEN)
    assert await fleet_store.claim("w", "cpu", 8, ["m"], 10) == [t.id for t in same]
    assert await fleet_store.claim("w", "cpu", 8, ["m"], 10) == [other_size.id]
    assert await fleet_store.claim("w", "cpu", 1, ["m"], 10) == [last.id]
    assert await fleet_store.claim("w", "cpu", 8, ["m"], 10) == []
    started = await fleet_store.get(same[1].id)
    assert started is not None and started.state is TaskState.RUNNING and started.worker == "w"
    assert await fleet_store.placement(same[1].id) == ("cpu", 3, "w")


async def test_a_running_step_level_batch_claims_the_next_task_only_if_it_can_join(fleet_store: RedisStore) -> None:
    first = await fleet_store.insert(owner="a", spec=SPEC, admission=OPEN)
    other_steps = await fleet_store.insert(owner="a", spec=_spec(steps=7, scheduler="euler_a"), admission=OPEN)
    wide = await fleet_store.insert(owner="a", spec=_spec(width=128), admission=OPEN)
    later = await fleet_store.insert(owner="a", spec=_spec(steps=4), admission=OPEN)
    running = batch_key(SPEC, step_level=True)
    assert await fleet_store.claim("w", "cpu", 8, ["m"], 10, step_level=True) == [first.id, other_steps.id]
    # The head of the queue (another size) cannot join, so nothing behind it may: the batch drains.
    assert await fleet_store.claim("w", "cpu", 6, ["m"], 10, step_level=True, joining=running) == []
    assert await fleet_store.claim("w", "cpu:1", 8, ["m"], 10, step_level=True) == [wide.id]
    assert await fleet_store.claim("w", "cpu", 6, ["m"], 10, step_level=True, joining=running) == [later.id]
    assert await fleet_store.placement(later.id) == ("cpu", 1, "w")


async def test_a_worker_prefers_its_models_until_another_model_waits_too_long(fleet_store: RedisStore) -> None:
    foreign = await fleet_store.insert(owner="a", spec=_spec(model="other"), admission=OPEN)
    held = await fleet_store.insert(owner="a", spec=SPEC, admission=OPEN)
    urgent = await fleet_store.insert(owner="a", spec=_spec(model="other", priority=5), admission=OPEN)
    assert await fleet_store.position(urgent.id) == 0 and await fleet_store.position(held.id) == 2
    assert await fleet_store.claim("w", "cpu", 1, ["m"], 10) == [urgent.id]  # priority comes first
    assert await fleet_store.claim("w", "cpu", 1, ["m"], 10) == [held.id]  # then a model it holds
    again = await fleet_store.insert(owner="a", spec=SPEC, admission=OPEN)
    await anyio.sleep(0.05)
    assert await fleet_store.claim("w", "cpu", 1, ["m"], 0.01) == [foreign.id]  # waited past the affinity
    assert await fleet_store.claim("w", "cpu", 1, ["m"], 10) == [again.id]


async def test_a_cancel_ends_a_queued_task_and_flags_a_running_one_for_its_worker(fleet_store: RedisStore) -> None:
    queued = await fleet_store.insert(owner="a", spec=SPEC, admission=OPEN)
    running = await fleet_store.insert(owner="a", spec=_spec(model="x"), admission=OPEN)
    assert await fleet_store.claim("w", "cpu", 1, ["x"], 10) == [running.id]
    assert await fleet_store.request_cancel(queued.id) == "cancelled"
    assert await fleet_store.claim("v", "cpu", 1, ["m"], 10) == []  # it left the queue
    assert await fleet_store.request_cancel(running.id) == "signalled"
    assert await fleet_store.heartbeat("w", [(running.id, 1)]) == [2]
    assert await fleet_store.heartbeat("v", [(running.id, 1)]) == [0]  # not v's claim
    assert await fleet_store.request_cancel(queued.id) == "cancelled"  # already ended: says how


async def test_a_redis_that_could_lose_work_is_reported_or_refused(
    fleet_store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    from forge.errors import ConfigError

    await fleet_store.check_durability(required=True)  # appendonly yes, noeviction: nothing to say
    await fleet_store.client.config_set("appendonly", "no")
    await fleet_store.client.config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level("WARNING"):
        await fleet_store.check_durability(required=False)
    assert "appendonly is off" in caplog.text and "maxmemory-policy is allkeys-lru" in caplog.text
    with pytest.raises(ConfigError) as refused:
        await fleet_store.check_durability(required=True)
    assert refused.value.field == "redis_require_durable"
