"""Pieces every daemon shell shares: config loading, socket binding, readiness.

These are the I/O edges around the pure cores (ChainReplica-style stores,
scheduler policy, allocator). Nothing here holds protocol state.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import stat
import sys
import tomllib
from collections.abc import Mapping
from typing import Any

from daemons import sdnotify
from libclient import hostconfig, logs, peer_guard
from libclient.hostconfig import ConfigError, HostConfig

__all__ = ["ConfigError", "HostConfig", "StopFlag", "add_config_flags", "bind_unix",
           "check_socket_dir", "child_env", "configured_logging", "fail", "load_config",
           "notify_ready", "private_dir", "resolve_config", "start_logging"]


def load_config(path: str | None, section: str) -> dict[str, Any]:
    """Read ``[section]`` (plus top-level keys) from a TOML config file.

    The old, unchecked reader; gcsd still uses it. New code uses
    :func:`resolve_config`, which checks the whole file against the schema.
    """
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    sect = data.get(section, {})
    if not isinstance(sect, dict):
        raise ConfigError(f"[{section}] in {path} must be a table")
    merged.update(sect)
    return merged


def private_dir(path: str) -> None:
    """Create ``path`` (mode 0700) or check that only its owner can reach it.

    Raises:
        PermissionError: ``path`` is shared (sticky, like /tmp) or another
            user's and open to others: we would not chmod it, nor trust it.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        if st.st_mode & stat.S_ISVTX or st.st_uid != os.getuid():
            raise PermissionError(13, f"{path} is shared (mode {stat.S_IMODE(st.st_mode):o}, "
                                      f"owner uid {st.st_uid}); use a directory of its own")
        os.chmod(path, 0o700)


def bind_unix(path: str, backlog: int = 512) -> socket.socket:
    """Bind a listening AF_UNIX socket, refusing one that a live daemon holds.

    A stale socket file (nobody accepting) is replaced; a live one is an error,
    so two daemons never fight over one path.
    """
    peer_guard.secure_dir(os.path.dirname(os.path.abspath(path)))
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise ConfigError(f"socket {path} is already in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    peer_guard.secure_socket(path)  # 0600, or 0660 with [security] allowed_group
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def notify_ready(ready_fd: int | None, line: str = "ready", status: str = "serving") -> None:
    """Tell whoever started us that we serve: systemd (READY=1) and/or a pipe.

    Call it only once requests are answered (socket listening, registered
    with gcsd), because systemd starts dependent units on READY=1.
    """
    sdnotify.Notifier().send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
    if ready_fd is not None and ready_fd >= 0:
        try:
            os.write(ready_fd, (line + "\n").encode())
            os.close(ready_fd)
        except OSError:
            pass


def child_env() -> dict[str, str]:
    """Our environment minus systemd's per-process variables, for children we start."""
    env = dict(os.environ)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(name, None)
    return env


# ---------------------------------------------------------------- config
def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The flags every daemon shares: config file, --set, logging, readiness pipe."""
    p.add_argument("--config", help=f"host config (TOML); default ${hostconfig.PATH_ENV} or "
                                    f"{hostconfig.DEFAULT_PATH} if it exists; 'none' for none")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any config key, e.g. --set stored.memory=2G (repeatable)")
    p.add_argument("--log-level", help="debug, info, warning, error (config [log] level)")
    p.add_argument("--log-destination",
                   help="'stderr' or a directory for <daemon>.log (config [log] destination)")
    p.add_argument("--ready-fd", type=int, help="write one JSON line here once serving")


def resolve_config(ns: argparse.Namespace, flags: Mapping[str, Any]) -> HostConfig:
    """The host config for a daemon: file, environment, then its flags.

    Raises:
        ConfigError: naming the key and the problem.
    """
    merged = {"log.level": ns.log_level, "log.destination": ns.log_destination, **flags}
    path = hostconfig.config_path(ns.config, os.environ)
    return hostconfig.resolve(path, os.environ, merged, ns.set)


def use_keys(sec: Mapping[str, Any], log: Any) -> Any:
    """Load the cluster keys ``[security]`` names and put them in force here and
    in the children we start (through the environment); None if it names none.
    Also puts ``[security] allowed_group`` (local socket access) in force.

    Raises:
        ConfigError: the keys are missing, malformed or readable by others.
    """
    from libclient import security

    try:  # who may use our Unix sockets; workers we start inherit it
        peer_guard.configure(sec.get("allowed_group"))
        peer_guard.configure_limits(sec.get("max_frame"), sec.get("max_connections"),
                                    sec.get("stall_s"), sec.get("stall_bytes"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    keys_dir, encrypt = sec.get("keys_dir"), bool(sec.get("encrypt_bulk", True))
    if not keys_dir:  # the *_started line says so (security_summary)
        security.use(None)
        os.environ.pop(security.KEYS_ENV, None)
        return None
    try:
        keys = security.load(keys_dir, encrypt_bulk=encrypt)
    except security.SecurityError as exc:
        raise ConfigError(str(exc)) from None
    security.use(keys)
    os.environ[security.KEYS_ENV] = keys.directory
    os.environ[security.ENCRYPT_BULK_ENV] = "1" if encrypt else "0"
    return keys


def security_summary() -> str:
    """What a daemon's ``*_started`` line says about its links between hosts."""
    from libclient import security

    keys = security.current()
    if keys is None:
        return "OFF: no [security] keys_dir, links between hosts are open (docs/security.md)"
    bulk = ("TLS-keyed AES-GCM" if keys.encrypt_bulk
            else "HMAC-authenticated, GMAC-checked, unencrypted")
    return f"TLS 1.3 + CURVE with {keys.directory}; stored transfers {bulk}"


def start_logging(daemon: str, ns: argparse.Namespace) -> Any:
    """A logger for the time before the config is read: stderr, at the flag's level.

    Also routes uncaught exceptions into the log as structured tracebacks.
    """
    level = ns.log_level if ns.log_level in logs.LEVELS else "info"
    log = logs.configure(daemon, level=level)
    logs.log_uncaught_exceptions()
    return log


def configured_logging(daemon: str, node_id: str, conf: HostConfig) -> Any:
    """Switch logging to the config's level and destination.

    Raises:
        ConfigError: the log directory cannot be written.
    """
    try:
        return logs.configure(daemon, node_id=node_id, level=conf["log"]["level"],
                              destination=conf["log"]["destination"])
    except OSError as exc:
        raise ConfigError(f"[log] destination {conf['log']['destination']} is not usable: "
                          f"{exc.strerror or exc}") from None


def check_socket_dir(path: str) -> None:
    """Create a socket's directory (0700) or say plainly why we cannot.

    Raises:
        ConfigError: naming the directory and the reason (permission, not a directory...).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        peer_guard.secure_dir(directory)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ConfigError(f"socket directory {directory} is not usable by uid {os.getuid()}: "
                          f"{exc.strerror or exc}") from None


class StopFlag:
    """Set by SIGTERM/SIGINT; the main loop polls it. A second signal forces exit."""

    def __init__(self) -> None:
        self.stopping = False
        self.wake_fd_r, self.wake_fd_w = os.pipe()
        os.set_blocking(self.wake_fd_r, False)
        os.set_blocking(self.wake_fd_w, False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stopping:
            os._exit(128 + signum)
        self.stopping = True
        try:
            os.write(self.wake_fd_w, b"x")
        except OSError:
            pass


def tune_gc() -> None:
    """Call once set up, just before serving: keep the cyclic GC out of the request path.

    Everything built at startup (modules, classes, config) moves to the
    permanent generation, and young collections run less often. Measured on
    gcsd under load, full collections of the default settings paused the
    loop for 10-25 ms several times in 10 s; the daemons make few cycles
    (reference counting frees nearly everything), so this costs little memory.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 1000)


def fail(log: Any, message: str, code: int = 2) -> None:
    """Log a fatal start-up problem and exit.

    The line stays JSON (journald and supervisord keep stderr as the log);
    its ``summary`` reads "error: <message>" for the person at a terminal.
    """
    log.error("fatal", error=message, summary=f"error: {message}")
    if sys.stderr.isatty():
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
