"""Applying a runtime env in a worker process that the raylet just started.

The raylet puts ``env_vars`` straight into the worker's environment (so they
are there before the interpreter starts) and hands over the wire form, the
node's package cache and gcsd's address in three variables. Before the
worker registers (so no lease can reach a half-ready worker) this module
fetches and unpacks the packages into the node's cache, installs pip
requirements, makes working_dir the cwd and puts working_dir, py_modules
and the pip directory first on ``sys.path`` (and ``PYTHONPATH``, for the
task's own subprocesses). If that fails the worker tells the raylet
(``env_failed``), which fails the leases waiting for this env with
RuntimeEnvSetupError, and exits.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from libclient.runtime_env import packages, pip_env, set_current
from libclient.runtime_env.spec import check_wire, setup_timeout

WIRE_VAR = "SHOAL_RUNTIME_ENV"
CACHE_VAR = "SHOAL_RUNTIME_RESOURCES"
GCS_VAR = "SHOAL_RUNTIME_ENV_GCS"


def worker_environ(wire: dict[str, Any], cache_dir: str, gcs_address: str) -> dict[str, str]:
    """The variables a worker of env ``wire`` is started with (the raylet's side)."""
    out = dict(wire.get("env_vars") or {})
    out.update({WIRE_VAR: json.dumps(wire), CACHE_VAR: cache_dir, GCS_VAR: gcs_address})
    return out


def apply(wire: dict[str, Any], cache_dir: str, gcs_address: str) -> None:
    """Make this process run in ``wire``. Raises on any failure."""
    from libclient.gcs_client import GcsClient

    paths: list[str] = []
    if wire.get("working_dir") or wire.get("py_modules"):
        with GcsClient(gcs_address, timeout=30.0) as gcs:
            if wire.get("working_dir"):
                workdir = packages.ensure_local(gcs, wire["working_dir"], cache_dir)
                os.chdir(workdir)
                paths.append(workdir)
            for uri in wire.get("py_modules") or ():
                paths.append(packages.ensure_local(gcs, uri, cache_dir))
    if wire.get("pip"):
        paths.append(pip_env.ensure(wire["pip"], cache_dir, setup_timeout(wire)))
    if paths:
        sys.path[0:0] = paths
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))


def prepare(raylet_socket: str, worker_id: bytes) -> bool:
    """Apply the env this worker was started with, if any. False: it failed,
    the raylet was told, and the worker should exit."""
    raw = os.environ.pop(WIRE_VAR, None)
    cache_dir = os.environ.pop(CACHE_VAR, "")
    gcs_address = os.environ.pop(GCS_VAR, "")
    wire: dict[str, Any] = {}
    try:
        if raw:
            _key, wire = check_wire(json.loads(raw))
            apply(wire, cache_dir, gcs_address)
    except Exception as exc:
        _report(raylet_socket, worker_id, f"{type(exc).__name__}: {exc}")
        return False
    if wire:
        set_current(wire)  # what nested tasks and actors inherit
    return True


def _report(raylet_socket: str, worker_id: bytes, error: str) -> None:
    from libclient.protocol import Connection

    try:
        conn = Connection.connect_unix(raylet_socket, timeout=10.0)
        try:
            conn.call({"t": "env_failed", "worker_id": worker_id, "error": error[:8000]})
        finally:
            conn.close()
    except Exception:
        pass  # the raylet sees the worker exit before registering
