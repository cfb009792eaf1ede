"""Per-plan limits, shared by every interface because every submission passes through ingress: requests
per sliding window, and tasks queued or running at once, per owner. This is the one-box counter (SQLite
store); the Redis store counts the same in Redis, inside its submit script."""

from __future__ import annotations

import math
import time
from collections import deque

from forge.auth import Plan
from forge.errors import ForgeError


class RateLimited(ForgeError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def too_many_requests(plan_name: str, plan: Plan, retry_after_s: float) -> RateLimited:
    return RateLimited(
        f"plan {plan_name!r} allows {plan.requests} generations per {plan.window_s:g} s",
        retry_after_s=max(math.ceil(retry_after_s), 1),
    )


def too_many_in_flight(plan_name: str, plan: Plan) -> RateLimited:
    return RateLimited(
        f"plan {plan_name!r} allows {plan.max_queued} generations queued or running at once", retry_after_s=5
    )


class RateLimiter:
    def __init__(self) -> None:
        self._accepted: dict[str, deque[float]] = {}

    def admit(self, owner: str, plan_name: str, plan: Plan, in_flight: int) -> None:
        """Count one submission for `owner`, or refuse it (429 with when to retry)."""
        now = time.monotonic()
        accepted = self._accepted.setdefault(owner, deque())
        while accepted and accepted[0] <= now - plan.window_s:
            accepted.popleft()
        if plan.requests and len(accepted) >= plan.requests:
            raise too_many_requests(plan_name, plan, accepted[0] + plan.window_s - now)
        if plan.max_queued and in_flight >= plan.max_queued:
            raise too_many_in_flight(plan_name, plan)
        accepted.append(now)
