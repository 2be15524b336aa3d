"""JSON logging for the daemons and workers: one line per event.

Every line is a JSON object whose first keys are ``ts`` (ISO-8601, UTC),
``level``, ``daemon``, ``node_id``, ``pid`` and ``event``, so ops tooling
(``shoal logs``, journald, a log shipper) can filter a node's logs without
parsing free text. docs/logging.md is the contract; change it, not just this.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from typing import IO, Any

import structlog

#: The fields every line carries, in the order they are written.
REQUIRED_FIELDS = ("ts", "level", "daemon", "node_id", "pid", "event")
#: Context fields a line carries where they apply (ids are lowercase hex).
CONTEXT_FIELDS = ("job_id", "task_id", "actor_id", "object_id", "peer")
LEVELS = ("debug", "info", "warning", "error", "critical")


def _hex_bytes(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    # Ids travel as bytes inside Shoal; in logs they are hex, never "b'\\x..'".
    for key, value in event.items():
        if isinstance(value, bytes | bytearray):
            event[key] = bytes(value).hex()
    return event


def _required_first(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    # Humans read these lines too; the stable fields lead, context follows.
    ordered = {key: event.pop(key) for key in REQUIRED_FIELDS if key in event}
    ordered.update(event)
    return ordered


def open_destination(daemon: str, destination: str) -> IO[str]:
    """Return the stream for ``destination``: ``"stderr"`` or a directory.

    A directory gets one append-only file per daemon, ``<dir>/<daemon>.log``,
    line-buffered so that a crash loses at most the line being written.

    Raises:
        OSError: the directory cannot be created or the file opened.
    """
    if destination in ("", "stderr"):
        return sys.stderr
    os.makedirs(destination, mode=0o750, exist_ok=True)
    return open(os.path.join(destination, f"{daemon}.log"), "a", buffering=1,
                encoding="utf-8")


def configure(daemon: str, node_id: str = "", stream: IO[str] | None = None,
              level: str = "info", destination: str = "stderr") -> Any:
    """Configure structlog to write JSON lines and return a bound logger.

    Args:
        daemon: value of the ``daemon`` field ("gcsd", "stored", "raylet", ...).
        node_id: hex node id, "" while unknown.
        stream: write here (tests); overrides ``destination``.
        level: minimum level name.
        destination: "stderr" or a log directory (see :func:`open_destination`).
    """
    out = stream if stream is not None else open_destination(daemon, destination)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.dict_tracebacks,
            _hex_bytes,
            _required_first,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Off so that tests (and a daemon that learns its node id late) can
        # reconfigure; the cost is one dict lookup per log call.
        cache_logger_on_first_use=False,
    )
    global _current
    _current = structlog.get_logger().bind(daemon=daemon, node_id=node_id, pid=os.getpid())
    return _current


_current: Any = None


def log_uncaught_exceptions() -> None:
    """Log uncaught exceptions (main thread and others) as ``crashed`` lines.

    Without this, Python prints a plain-text traceback to stderr, which is
    the one thing that would break "every line is a JSON object".
    """
    def on_main(exc_type: Any, exc: BaseException, tb: Any) -> None:
        if _current is None or issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        _current.critical("crashed", exc_info=(exc_type, exc, tb))

    def on_thread(args: threading.ExceptHookArgs) -> None:
        if _current is None or args.exc_value is None:
            threading.__excepthook__(args)
            return
        _current.critical("crashed", thread=getattr(args.thread, "name", ""),
                          exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = on_main
    threading.excepthook = on_thread
