"""The log schema of docs/logging.md: required fields, context fields, tracebacks."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from test_ops_support import ROOT, check_log_line, check_log_text

from libclient import logs


def test_required_fields_first_and_ids_as_hex():
    out = io.StringIO()
    log = logs.configure("raylet", node_id="ab12", stream=out)
    log.info("task_done", task_id=b"\x01\x02", job_id="0001", peer="/run/x.sock")
    log.debug("hidden")
    event = check_log_line(out.getvalue())
    assert list(event)[:6] == list(logs.REQUIRED_FIELDS)
    assert event["event"] == "task_done" and event["task_id"] == "0102"
    assert event["daemon"] == "raylet" and event["node_id"] == "ab12"
    assert len(out.getvalue().splitlines()) == 1


def test_exceptions_are_structured_tracebacks():
    out = io.StringIO()
    log = logs.configure("stored", stream=out)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("request_failed", object_id="ff")
    event = check_log_line(out.getvalue())
    exc = event["exception"][0]
    assert exc["exc_type"] == "ValueError" and exc["exc_value"] == "boom"
    assert exc["frames"] and {"filename", "lineno", "name"} <= set(exc["frames"][0])


def test_uncaught_exception_in_a_daemon_process_is_one_json_line():
    code = ("from libclient import logs\n"
            "logs.configure('gcsd')\n"
            "logs.log_uncaught_exceptions()\n"
            "import threading\n"
            "t = threading.Thread(target=lambda: 1 / 0, name='helper'); t.start(); t.join()\n"
            "raise RuntimeError('main died')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 1
    events = check_log_text(res.stderr)
    assert [e["event"] for e in events] == ["crashed", "crashed"]
    assert events[0]["thread"] == "helper"
    assert events[0]["exception"][0]["exc_type"] == "ZeroDivisionError"
    assert events[1]["level"] == "critical"
    assert json.dumps(events)  # round-trips
