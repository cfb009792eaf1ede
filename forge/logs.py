"""Logging through structlog: every record (ours and the libraries') gets the context bound for the
task it belongs to (`task_id`, `request_id`), rendered as JSON lines or as readable console lines."""

from __future__ import annotations

import logging
import re
import sys
import uuid

import structlog

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(offered: str | None = None) -> str:
    """A client's X-Request-Id when it is a sane token, else a new one."""
    return offered if offered and REQUEST_ID.match(offered) else uuid.uuid4().hex


def setup_logging(level: str, fmt: str = "console") -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
