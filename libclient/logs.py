"""JSON logging for the daemons and workers: one line per event.

Every line carries timestamp, level, daemon, node_id, pid and event, so ops
tooling can filter a node's logs without parsing free text.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Any

import structlog


def configure(daemon: str, node_id: str = "", stream: IO[str] | None = None,
              level: str = "info") -> Any:
    """Configure structlog to write JSON lines and return a bound logger."""
    out = stream if stream is not None else sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Off so that tests (and a daemon that learns its node id late) can
        # reconfigure; the cost is one dict lookup per log call.
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(daemon=daemon, node_id=node_id, pid=os.getpid())
