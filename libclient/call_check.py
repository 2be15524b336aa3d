"""The shape of a direct task or actor call, checked before a worker acts on it.

A worker takes ``task`` and ``call`` frames from lease holders and callers:
trusted peers (same uid or cluster keys), but a garbled frame must cost the
caller its connection, not kill the worker or the actor (found by
tests/fuzz_ports.py). Pure: one look at the fields the worker reads before
its own error handling takes over.
"""

from __future__ import annotations

from typing import Any

MAX_RETURNS = 1 << 16


def malformed_call(msg: dict[str, Any]) -> str | None:
    """Why ``msg`` is not a well-formed ``task``/``call`` frame, or None if it is."""
    tid = msg.get("tid")
    if type(tid) is not bytes or not tid:
        return "tid must be non-empty bytes"
    if not isinstance(msg.get("name", "?"), str):
        return "name must be a string"
    nret = msg.get("nret", 1)
    if type(nret) is not int or not 0 <= nret <= MAX_RETURNS:
        return f"nret must be an integer 0..{MAX_RETURNS}"
    if msg.get("t") == "call" and not isinstance(msg.get("method"), str):
        return "method must be a string"
    return None
