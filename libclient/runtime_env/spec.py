"""Runtime environments as data: validation, merging and the pool key (pure).

A user's ``runtime_env`` dict (Ray's fields) is checked here and turned
into its *wire form*, which names packages by URI instead of local paths:

    {"env_vars": {str: str}, "working_dir": "gcs://_shoal_pkg_<sha1>.zip",
     "py_modules": [uri, ...], "pip": [requirement, ...], "config": {...}}

Only non-empty fields appear; the empty env is ``{}``. The raylet keys its
idle workers by :func:`env_key` of the wire form, so workers with different
environments are never handed to the wrong task. Nothing here touches files,
sockets or processes; the driver side that zips and uploads local paths is
``libclient.runtime_env.packages``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import msgpack

# Fields Shoal builds. ``excludes`` only shapes how working_dir/py_modules
# are packed and does not reach the wire form.
FIELDS = frozenset({"env_vars", "working_dir", "py_modules", "pip", "excludes", "config"})
# Ray fields Shoal does not build: a clear refusal rather than "unknown".
UNSUPPORTED = {
    "conda": "conda environments need a conda installation on every node",
    "uv": "use 'pip' (uv is not installed on the nodes)",
    "container": "container images cannot be pulled here",
    "image_uri": "container images cannot be pulled here",
    "py_executable": "workers always run the raylet's Python",
    "java_jars": "Shoal has no Java workers",
    "nsight": "profilers are not integrated",
    "mpi": "MPI is not integrated",
    "worker_process_setup_hook": "not built yet",
}
CONFIG_FIELDS = {"setup_timeout_seconds": int, "eager_install": bool}
URI_PREFIX = "gcs://_shoal_pkg_"
DEFAULT_SETUP_TIMEOUT_S = 600


class RuntimeEnvError(ValueError):
    """A runtime_env dict that cannot be used as given."""


def validate(runtime_env: Any) -> dict[str, Any]:
    """Check a user's ``runtime_env``; return a normalised copy (local paths kept).

    Raises:
        RuntimeEnvError: unknown or unsupported fields, wrong types, a missing
            working_dir, an empty requirement.
    """
    if runtime_env is None:
        return {}
    if not isinstance(runtime_env, dict):
        raise RuntimeEnvError(f"runtime_env must be a dict, got {type(runtime_env).__name__}")
    out: dict[str, Any] = {}
    for name, value in runtime_env.items():
        if not isinstance(name, str):
            raise RuntimeEnvError(f"runtime_env keys must be strings, got {name!r}")
        if name in UNSUPPORTED:
            raise RuntimeEnvError(f"runtime_env[{name!r}] is not supported by Shoal: "
                                  f"{UNSUPPORTED[name]}")
        if name not in FIELDS:
            raise RuntimeEnvError(f"unknown runtime_env field {name!r}; Shoal supports "
                                  f"{sorted(FIELDS)}")
        if value is None:
            continue
        out[name] = _CHECKS[name](value)
    if "excludes" in out and "working_dir" not in out and "py_modules" not in out:
        raise RuntimeEnvError("runtime_env['excludes'] only applies to working_dir and "
                              "py_modules, and neither is given")
    return {k: v for k, v in out.items() if v or k == "working_dir"}


def _env_vars(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RuntimeEnvError("runtime_env['env_vars'] must be a dict of str to str, got "
                              f"{value!r}")
    for k in value:
        if not k or "=" in k or "\0" in k:
            raise RuntimeEnvError(f"runtime_env['env_vars'] has an invalid variable name {k!r}")
    return dict(value)


def _working_dir(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise RuntimeEnvError("runtime_env['working_dir'] must be a path to a local "
                              f"directory, got {type(value).__name__}")
    value = os.fspath(value)
    if value.startswith(URI_PREFIX):
        return value  # already uploaded (a wire form handed back in)
    if "://" in value:
        raise RuntimeEnvError(f"runtime_env['working_dir'] {value!r}: only local directories "
                              "are supported (remote URIs need storage the nodes cannot reach)")
    if not os.path.isdir(value):
        raise RuntimeEnvError(f"runtime_env['working_dir'] {value!r} is not a directory")
    return os.path.abspath(value)


def _py_modules(value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise RuntimeEnvError("runtime_env['py_modules'] must be a list of module directories "
                              f"or files, got {type(value).__name__}")
    out = []
    for item in value:
        if hasattr(item, "__file__") and not isinstance(item, (str, os.PathLike)):
            # A module object: ship its package directory (or its single file).
            path = getattr(item, "__path__", None)
            item = list(path)[0] if path else item.__file__
        if not isinstance(item, (str, os.PathLike)):
            raise RuntimeEnvError(f"runtime_env['py_modules'] entries must be paths or modules, "
                                  f"got {item!r}")
        item = os.fspath(item)
        if item.startswith(URI_PREFIX):
            out.append(item)
            continue
        if "://" in item:
            raise RuntimeEnvError(f"runtime_env['py_modules'] {item!r}: only local paths are "
                                  "supported")
        if not (os.path.isdir(item) or (os.path.isfile(item) and item.endswith(".py"))):
            raise RuntimeEnvError(f"runtime_env['py_modules'] {item!r} is neither a directory "
                                  "nor a .py file")
        out.append(os.path.abspath(item))
    return out


def _pip(value: Any) -> list[str]:
    if isinstance(value, dict):
        unknown = set(value) - {"packages", "pip_check", "pip_version"}
        if unknown:
            raise RuntimeEnvError(f"unknown runtime_env['pip'] fields {sorted(unknown)}")
        if "packages" not in value:
            raise RuntimeEnvError("runtime_env['pip'] as a dict needs 'packages'")
        if value.get("pip_version"):
            raise RuntimeEnvError("runtime_env['pip']['pip_version'] is not supported: "
                                  "the nodes' own pip is used")
        value = value["packages"]
    if isinstance(value, str):
        # A requirements file, read on the driver (as Ray does).
        if not os.path.isfile(value):
            raise RuntimeEnvError(f"runtime_env['pip'] {value!r} is not a requirements file; "
                                  "pass a list of requirements")
        with open(value, encoding="utf-8") as f:
            value = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(r, str) for r in value):
        raise RuntimeEnvError("runtime_env['pip'] must be a list of requirement strings, a "
                              "requirements file path, or {'packages': [...]}")
    reqs = [r.strip() for r in value]
    for r in reqs:
        if not r or r.startswith("-") and not r.startswith(("-r ", "-e ")) or "\n" in r:
            raise RuntimeEnvError(f"runtime_env['pip'] has an invalid requirement {r!r}")
        if r.startswith(("-r ", "-e ")):
            raise RuntimeEnvError(f"runtime_env['pip'] entry {r!r}: pass plain requirements")
    return reqs


def _excludes(value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise RuntimeEnvError("runtime_env['excludes'] must be a list of path patterns")
    return list(value)


def _config(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RuntimeEnvError("runtime_env['config'] must be a dict")
    for k, v in value.items():
        kind = CONFIG_FIELDS.get(k)
        if kind is None:
            raise RuntimeEnvError(f"unknown runtime_env['config'] field {k!r}; known: "
                                  f"{sorted(CONFIG_FIELDS)}")
        if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
            raise RuntimeEnvError(f"runtime_env['config'][{k!r}] must be {kind.__name__}")
        if k == "setup_timeout_seconds" and v <= 0 and v != -1:
            raise RuntimeEnvError("runtime_env['config']['setup_timeout_seconds'] must be "
                                  "positive (or -1: no limit)")
    return dict(value)


_CHECKS = {"env_vars": _env_vars, "working_dir": _working_dir, "py_modules": _py_modules,
           "pip": _pip, "excludes": _excludes, "config": _config}


def merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Ray's inheritance: the child's fields replace the parent's, except
    ``env_vars``, which are merged (the child wins on a shared name)."""
    if not child:
        return parent
    if not parent:
        return child
    out = {**parent, **child}
    if "env_vars" in parent and "env_vars" in child:
        out["env_vars"] = {**parent["env_vars"], **child["env_vars"]}
    return out


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return [[k, _canonical(value[k])] for k in sorted(value)]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def env_key(wire: dict[str, Any]) -> str:
    """The pool key of a wire-form env: "" for the empty env, else a short hash."""
    if not wire:
        return ""
    data = msgpack.packb(_canonical(wire), use_bin_type=True)
    return hashlib.sha1(data).hexdigest()[:20]


def check_wire(wire: Any) -> tuple[str, dict[str, Any]]:
    """What a daemon does with a wire-form env from a socket: check every
    field's type (never trust it), return ``(key, env)``.

    Raises:
        ValueError: a malformed env.
    """
    if not isinstance(wire, dict):
        raise ValueError("renv must be a map")
    for name, value in wire.items():
        if name == "env_vars":
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and k and "=" not in k and "\0" not in k
                    and isinstance(v, str) and "\0" not in v for k, v in value.items()):
                raise ValueError("renv env_vars must map names to strings")
        elif name == "working_dir":
            if not _is_uri(value):
                raise ValueError("renv working_dir must be a package URI")
        elif name == "py_modules":
            if not isinstance(value, list) or not all(_is_uri(u) for u in value):
                raise ValueError("renv py_modules must be a list of package URIs")
        elif name == "pip":
            if not isinstance(value, list) or not all(
                    isinstance(r, str) and r and not r.startswith("-") and "\n" not in r
                    for r in value):
                raise ValueError("renv pip must be a list of requirements")
        elif name == "config":
            if not isinstance(value, dict) or any(
                    k not in CONFIG_FIELDS or not isinstance(v, CONFIG_FIELDS[k])
                    for k, v in value.items()):
                raise ValueError("renv config is malformed")
        else:
            raise ValueError(f"renv has an unknown field {name!r}")
    return env_key(wire), wire


def _is_uri(value: Any) -> bool:
    return (isinstance(value, str) and value.startswith(URI_PREFIX) and value.endswith(".zip")
            and len(value) < 200 and "/" not in value[len("gcs://"):])


def package_name(uri: str) -> str:
    """The directory name a package URI unpacks to (no scheme, no suffix)."""
    return uri[len("gcs://"):-len(".zip")]


def setup_timeout(wire: dict[str, Any]) -> float | None:
    t = (wire.get("config") or {}).get("setup_timeout_seconds", DEFAULT_SETUP_TIMEOUT_S)
    return None if t == -1 else float(t)
