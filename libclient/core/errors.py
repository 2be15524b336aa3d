"""Errors as they travel: the wire form of an exception, for the owner's entries.

A failed task's return values hold a serialized exception ("error wire",
``[KIND_ERROR, meta, bufs]``) exactly where a value would be, so ``get``
raises it and a dependent task fails with it. Pure: no I/O.
"""

from __future__ import annotations

import os
import traceback

from libclient import serialization
from libclient.exceptions import ActorDiedError, RayError, RayTaskError


def error_wire(exc: BaseException) -> list:
    """The wire form of a system error (not raised by user code)."""
    return serialization.serialize(exc, serialization.KIND_ERROR).to_wire()


def error_wire_from(exc: BaseException, name: str) -> list:
    """Wrap an exception raised by user code for the trip back to the owner.

    Called from an ``except`` block: the traceback is the current one. An
    exception that cannot be pickled travels as its type name and message.
    """
    tb = traceback.format_exc()
    # A task that lets a nested task's error through: keep the innermost user
    # error as the cause (so the caller's error is an instance of its class),
    # while ``tb`` (which ends with the nested error's text) shows every level.
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    err = RayTaskError(name, tb, cause, os.getpid())
    try:
        return serialization.serialize(err, serialization.KIND_ERROR).to_wire()
    except Exception:
        plain = RayTaskError(name, tb, RayError(f"{type(cause).__name__}: {cause}"), os.getpid())
        return serialization.serialize(plain, serialization.KIND_ERROR).to_wire()


def actor_died_wire(actor_id: bytes, cause: str, init_wire: list | None = None) -> list:
    """ActorDiedError for calls to a dead actor; carries ``__init__``'s error if it raised."""
    init_error = None
    if init_wire is not None:
        try:
            init_error = serialization.deserialize_wire(init_wire)[1]
        except Exception:
            init_error = None
    return error_wire(ActorDiedError(actor_id.hex(), cause, init_error))
