"""Logging: structlog, JSON lines in production and a readable console format in a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """Route structlog and stdlib logging to stderr; JSON unless stderr is a terminal.

    ``STREAMER_LOG_LEVEL`` and ``STREAMER_LOG_FORMAT`` (``json`` or ``console``) override.
    """
    level_name = (level or os.environ.get("STREAMER_LOG_LEVEL", "INFO")).upper()
    fmt = os.environ.get("STREAMER_LOG_FORMAT")
    use_json = json if json is not None else (fmt == "json" or (fmt is None and not sys.stderr.isatty()))
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level_name]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level_name, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
