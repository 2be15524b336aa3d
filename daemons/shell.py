"""Pieces every daemon shell shares: config loading, socket binding, readiness.

These are the I/O edges around the pure cores (ChainReplica-style stores,
scheduler policy, allocator). Nothing here holds protocol state.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
import tomllib
from typing import Any


class ConfigError(Exception):
    """Bad flags or config file; the daemon exits with status 2."""


def load_config(path: str | None, section: str) -> dict[str, Any]:
    """Read ``[section]`` (plus top-level keys) from a TOML config file."""
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
    """Create ``path`` (mode 0700) or check that only its owner can reach it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.chmod(path, 0o700)


def bind_unix(path: str, backlog: int = 512) -> socket.socket:
    """Bind a listening AF_UNIX socket, refusing one that a live daemon holds.

    A stale socket file (nobody accepting) is replaced; a live one is an error,
    so two daemons never fight over one path.
    """
    private_dir(os.path.dirname(os.path.abspath(path)))
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
    os.chmod(path, 0o600)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def notify_ready(ready_fd: int | None, line: str = "ready") -> None:
    """Tell whoever started us that we serve: systemd's NOTIFY_SOCKET and/or a pipe."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.sendto(b"READY=1", addr)
        except OSError:
            pass
        finally:
            s.close()
    if ready_fd is not None and ready_fd >= 0:
        try:
            os.write(ready_fd, (line + "\n").encode())
            os.close(ready_fd)
        except OSError:
            pass


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


def fail(log: Any, message: str, code: int = 2) -> None:
    """Log a fatal start-up problem, print it plainly too, and exit."""
    log.error("fatal", error=message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
