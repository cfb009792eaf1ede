"""Per-plan limits, shared by every interface because every submission passes through ingress: requests
per sliding window, and tasks queued or running at once, per owner."""

from __future__ import annotations

import math
import time
from collections import deque

from forge.auth import Plan, Principal
from forge.errors import Forbidden, ForgeError


class RateLimited(ForgeError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimiter:
    def __init__(self, plans: dict[str, Plan]) -> None:
        self._plans = plans
        self._accepted: dict[str, deque[float]] = {}

    def admit(self, principal: Principal, in_flight: int) -> None:
        """Count one submission for the principal's owner, or refuse it (429 with when to retry)."""
        plan = self._plans.get(principal.plan)
        if plan is None:
            raise Forbidden(f"unknown plan {principal.plan!r}", field="plan")
        now = time.monotonic()
        accepted = self._accepted.setdefault(principal.owner, deque())
        while accepted and accepted[0] <= now - plan.window_s:
            accepted.popleft()
        if plan.requests and len(accepted) >= plan.requests:
            wait = math.ceil(accepted[0] + plan.window_s - now)
            raise RateLimited(
                f"plan {principal.plan!r} allows {plan.requests} generations per {plan.window_s:g} s",
                retry_after_s=max(wait, 1),
            )
        if plan.max_queued and in_flight >= plan.max_queued:
            raise RateLimited(
                f"plan {principal.plan!r} allows {plan.max_queued} generations queued or running at once",
                retry_after_s=5,
            )
        accepted.append(now)
