"""The synchronous Redis client that files, uploads, keys, characters, the result cache and callers' models share
(called from threads). An outage on any of its commands, scripts or pipelines is StoreUnavailable: a 503 with
Retry-After for whoever asked, never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.client import Pipeline

from actors.redis_store import client_options, is_outage
from forge.errors import StoreUnavailable


@contextmanager
def _outage_is_unavailable() -> Iterator[None]:
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as exc:
        if is_outage(exc):
            raise StoreUnavailable("the store (Redis) is unreachable; retry shortly", retry_after_s=5) from exc
        raise


class _OutageAwarePipeline(Pipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        with _outage_is_unavailable():
            return super().execute(raise_on_error)


class OutageAwareRedis(redis.Redis):
    def execute_command(self, *args: Any, **options: Any) -> Any:
        with _outage_is_unavailable():
            return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        return _OutageAwarePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def sync_redis(url: str) -> OutageAwareRedis:
    options = client_options(for_asyncio=False) | {"decode_responses": False}
    options.pop("health_check_interval")
    client: OutageAwareRedis = OutageAwareRedis.from_url(url, **options)  # type: ignore[assignment]
    return client
