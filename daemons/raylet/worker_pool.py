"""The raylet's worker processes: start, track, replace.

Workers are ``python -m libclient.worker`` children. Each one dies with the
raylet (PR_SET_PDEATHSIG), registers back over the raylet socket, and serves
one lease holder at a time on its own Unix socket.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

_PR_SET_PDEATHSIG = 1

STARTING = "STARTING"
IDLE = "IDLE"
LEASED = "LEASED"
ENV_FAILED = "ENV_FAILED"  # its runtime env could not be set up; it exits
RETIRING = "RETIRING"  # killed while idle (an unused runtime-env worker); never leased


def _die_with(parent: int) -> Any:
    """A preexec_fn for workers of the process ``parent`` (the raylet)."""

    def _die_with_parent() -> None:
        # Runs in the child between fork and exec: ask the kernel to SIGKILL
        # us when the raylet dies, so no worker outlives its node daemon. If
        # the raylet died before the prctl took effect we were already
        # reparented, and the signal will never come: leave now.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return _die_with_parent


@dataclass
class Worker:
    worker_id: bytes
    proc: subprocess.Popen[bytes]
    socket_path: str
    address: str = ""  # "host:port" holders on other nodes connect to
    state: str = STARTING
    conn: Any = None
    lease_id: int | None = None
    actor_id: bytes | None = None  # set while the worker hosts an actor
    env_key: str = ""  # runtime env it was started with ("" for none); never mixed
    idle_since: float = 0.0  # monotonic time it last became idle (env workers are reaped)

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class WorkerPool:
    """Starts workers and remembers them. I/O is only process spawning and reaping."""

    argv_base: list[str]
    socket_dir: str
    env: dict[str, str]
    python: str = sys.executable
    tcp_host: str | None = None  # also listen on TCP here, for other nodes
    workers: dict[bytes, Worker] = field(default_factory=dict)

    def start(self, env_key: str = "", extra_env: dict[str, str] | None = None) -> Worker:
        """Start a worker; ``extra_env`` (a runtime env's variables) joins its environment."""
        worker_id = os.urandom(8)
        path = os.path.join(self.socket_dir, f"w-{worker_id.hex()}.sock")
        argv = [self.python, "-m", "libclient.worker", *self.argv_base,
                "--worker-id", worker_id.hex(), "--socket", path]
        # The raylet binds the worker's TCP port itself and hands the socket
        # over, so it knows the address before the worker has even started.
        tcp = socket.create_server((self.tcp_host, 0), backlog=64) if self.tcp_host else None
        try:
            if tcp is not None:
                argv += ["--tcp-fd", str(tcp.fileno())]
            env = {**self.env, **extra_env} if extra_env else self.env
            proc = subprocess.Popen(argv, env=env, preexec_fn=_die_with(os.getpid()),
                                    stdin=subprocess.DEVNULL, close_fds=True,
                                    pass_fds=(tcp.fileno(),) if tcp is not None else ())
        finally:
            address = f"{self.tcp_host}:{tcp.getsockname()[1]}" if tcp is not None else ""
            if tcp is not None:
                tcp.close()
        worker = Worker(worker_id, proc, path, address, env_key=env_key)
        self.workers[worker_id] = worker
        return worker

    def idle(self, env_key: str = "") -> Worker | None:
        for w in self.workers.values():
            if w.state == IDLE and w.env_key == env_key:
                return w
        return None

    def count(self, *states: str) -> int:
        return sum(1 for w in self.workers.values() if w.state in states)

    def reap(self) -> list[Worker]:
        """Workers whose process has exited; the caller forgets them."""
        return [w for w in self.workers.values() if w.proc.poll() is not None]

    def forget(self, worker: Worker) -> None:
        self.workers.pop(worker.worker_id, None)
        try:
            os.unlink(worker.socket_path)
        except FileNotFoundError:
            pass

    def kill(self, worker: Worker) -> None:
        try:
            worker.proc.kill()
        except ProcessLookupError:
            pass

    def stop_all(self, timeout: float = 3.0) -> None:
        for w in list(self.workers.values()):
            try:
                w.proc.terminate()
            except ProcessLookupError:
                pass
        for w in list(self.workers.values()):
            try:
                w.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            self.forget(w)
