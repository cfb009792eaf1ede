"""Errors that cross actor and protocol boundaries, each with a stable machine-readable code."""

from __future__ import annotations


class ForgeError(Exception):
    """Base class: `code` is stable and documented; `status` is the HTTP status an adapter maps it to."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, field: str | None = None, rule: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.rule = rule


class InvalidRequest(ForgeError):
    code = "invalid_request"
    status = 422


class PayloadTooLarge(ForgeError):
    code = "payload_too_large"
    status = 413


class NotFound(ForgeError):
    code = "not_found"
    status = 404


class Conflict(ForgeError):
    code = "conflict"
    status = 409


class ServiceUnavailable(ForgeError):
    code = "unavailable"
    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(ServiceUnavailable):
    code = "queue_full"

    def __init__(self, max_queue: int) -> None:
        super().__init__(f"the queue is full ({max_queue} tasks); retry later", retry_after_s=30)


class ConfigError(ForgeError):
    """Bad configuration or a missing dependency: a clear startup error, never a silent fallback."""

    code = "config_error"


class ModelUnavailable(ForgeError):
    """The model exists in the catalog but its weights failed to load; an admin may retry the load."""

    code = "model_unavailable"
    status = 409


class Forbidden(ForgeError):
    code = "forbidden"
    status = 403


class StoreUnavailable(ServiceUnavailable):
    """The shared store (Redis) does not answer: nothing was accepted; the client may retry."""

    code = "store_unavailable"
