"""Runtime environments (Ray's ``runtime_env``): what this process runs in, and
how a user's dict becomes the wire form that tasks and actors carry.

A driver's job-level env comes from ``init(runtime_env=...)``; a worker's is
the env it was started with. Either is the *parent* env: a task or actor
with its own ``runtime_env`` is merged over it (``spec.merge``), one without
inherits it, as in Ray. Local paths (working_dir, py_modules) are zipped and
stored in gcsd when a task first needs them (``packages``); the raylet then
starts workers with the env applied (``worker_setup``) and never hands a
worker of one env to a task of another.
"""

from __future__ import annotations

from typing import Any

from libclient.runtime_env.spec import RuntimeEnvError, env_key, merge, validate

__all__ = ["RuntimeEnv", "RuntimeEnvError", "current", "for_task", "resolve", "set_current"]

_current: dict[str, Any] = {}
# Bumped whenever the parent env changes, so remote functions re-resolve.
generation = 0


class RuntimeEnv(dict):
    """Ray's ``RuntimeEnv``: a checked runtime_env dict (``RuntimeEnv(env_vars=...)``)."""

    def __init__(self, **fields: Any) -> None:
        validate(fields)
        super().__init__(fields)


def current() -> dict[str, Any]:
    """This process's env in wire form: the job's (driver) or the worker's own."""
    return _current


def set_current(wire: dict[str, Any]) -> None:
    global _current, generation
    _current = dict(wire)
    generation += 1


def resolve(runtime_env: Any, gcs: Any) -> dict[str, Any]:
    """Check a user's runtime_env and upload its local paths; return the wire form."""
    env = validate(runtime_env)
    if not env:
        return {}
    from libclient.runtime_env import packages

    excludes = env.pop("excludes", [])
    if "working_dir" in env:
        env["working_dir"] = packages.upload_path(gcs, env["working_dir"], excludes)
    if "py_modules" in env:
        env["py_modules"] = [packages.upload_path(gcs, p, excludes, top=True)
                             for p in env["py_modules"]]
    return env


def for_task(runtime_env: Any, gcs: Any) -> tuple[str, dict[str, Any]] | None:
    """What a task or actor with option ``runtime_env`` runs in: ``(key, wire)``,
    or None for the default env (the fast path: no key, plain workers)."""
    own = resolve(runtime_env, gcs) if runtime_env else {}
    wire = merge(_current, own)
    return (env_key(wire), wire) if wire else None
