"""The embedded single-node cluster that ``init()`` starts when given no address.

``EmbeddedCluster`` starts a launcher process (``python -m libclient.cluster``)
whose stdin is a pipe from the driver. The launcher starts gcsd, stored and
raylet as its children in a private runtime directory, reports their
addresses, and tears everything down when the pipe closes: on ``shutdown()``,
at interpreter exit, and when the driver is killed (the kernel closes the
pipe). Its children also get PR_SET_PDEATHSIG, so they stop even if the
launcher itself is killed. The launcher gets it only when started from the
main thread: the kernel's "parent" is the forking *thread*, so a node added
from another thread would die when that thread ends (the pipe covers it).

This module never imports the daemons; it runs them as programs.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from libclient import security

_PR_SET_PDEATHSIG = 1
_START_TIMEOUT_S = 30.0


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def runtime_base() -> str:
    """Directory under which sessions live; only this user can enter it."""
    base = os.environ.get("SHOAL_TMPDIR") or os.path.join(tempfile.gettempdir(),
                                                            f"shoal-{os.getuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    os.chmod(base, 0o700)
    return base


class EmbeddedCluster:
    """Handle on a running launcher; ``stop()`` ends it and waits."""

    def __init__(self, *, num_cpus: float | None, num_gpus: float | None,
                 resources: dict | None, object_store_memory: int | None,
                 gcs_address: str | None = None, head: bool = True,
                 node_ip: str = "127.0.0.1", node_timeout_s: float | None = None,
                 keys_dir: str | None = None) -> None:
        """Start one node: with no ``gcs_address`` it is a whole cluster (gcsd
        too); with one, it joins that cluster as a further node. ``keys_dir``:
        the cluster's keys (default: fresh ones in the session directory)."""
        spec = {"keys_dir": keys_dir, "num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources or {},
                "object_store_memory": object_store_memory, "gcs_address": gcs_address,
                "head": head, "node_ip": node_ip, "node_timeout_s": node_timeout_s}
        ready_r, ready_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "libclient.cluster", json.dumps(spec), str(ready_w)],
            stdin=subprocess.PIPE, pass_fds=(ready_w,),
            preexec_fn=_die_with_parent if _on_main_thread() else None,
            close_fds=True)
        os.close(ready_w)
        try:
            info = _read_ready(ready_r, _START_TIMEOUT_S, self.proc)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(ready_r)
        if "error" in info:
            self.stop()
            raise RuntimeError(f"embedded cluster failed to start: {info['error']}")
        self.session_dir: str = info["session_dir"]
        self.raylet_socket: str = info["raylet_socket"]
        self.gcs_address: str = info["gcs_address"]
        self.keys_dir: str = info["keys_dir"]
        self.node_id: str = info.get("node_id", "")
        self.pids: list[int] = info["pids"]
        self.daemon_pids: dict[str, int] = info.get("daemons", {})  # "raylet" -> pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                shutil.rmtree(self.session_dir, ignore_errors=True)  # it had no time to


def _read_ready(fd: int, timeout: float, proc: subprocess.Popen | None = None) -> dict[str, Any]:
    """Read one JSON line from a readiness pipe, with a deadline."""
    from libclient.spin import wait_readable

    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("daemon did not become ready in time")
        if wait_readable(fd, min(remaining, 0.5)):
            chunk = os.read(fd, 4096)
            if not chunk:
                code = proc.wait() if proc is not None else None
                raise RuntimeError(f"daemon exited before it was ready (status {code})")
            buf += chunk
        elif proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited before it was ready (status {proc.returncode})")
    return json.loads(buf.split(b"\n", 1)[0])


# ---------------------------------------------------------------- launcher side
def _start(name: str, argv: list[str], logdir: str, procs: list,
           keys_dir: str) -> dict[str, Any]:
    ready_r, ready_w = os.pipe()
    log = open(os.path.join(logdir, f"{name}.log"), "ab")
    # The embedded cluster is private to this driver: a host's shoal.toml and
    # SHOAL_* settings (meant for the system daemons) must not leak into it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_CONFIG"] = "none"
    if keys_dir:
        env[security.KEYS_ENV] = keys_dir
        # The one security switch a test or benchmark cluster may turn
        # (encrypt_bulk = false) travels with the keys.
        if security.ENCRYPT_BULK_ENV in os.environ:
            env[security.ENCRYPT_BULK_ENV] = os.environ[security.ENCRYPT_BULK_ENV]
    proc = subprocess.Popen([sys.executable, "-m", f"daemons.{name}", *argv,
                             "--ready-fd", str(ready_w)],
                            pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stderr=log,
                            preexec_fn=_die_with_parent, close_fds=True, env=env)
    log.close()
    os.close(ready_w)
    procs.append(proc)
    try:
        return _read_ready(ready_r, _START_TIMEOUT_S, proc)
    except Exception as exc:
        tail = ""
        try:
            with open(os.path.join(logdir, f"{name}.log"), "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
        except OSError:
            pass
        raise RuntimeError(f"{name} failed to start: {exc}\n{tail}") from None
    finally:
        os.close(ready_r)


def _stop_all(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _launcher(spec: dict[str, Any], ready_fd: int) -> None:
    stop = []

    def _on_term(*_: Any) -> None:
        stop.append(True)  # only a flag: raising here could skip the cleanup below

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which stops us
    session = tempfile.mkdtemp(prefix="s-", dir=runtime_base())
    logdir = os.path.join(session, "logs")
    os.makedirs(logdir, mode=0o700)
    procs: list[subprocess.Popen] = []
    host = spec.get("node_ip") or "127.0.0.1"
    try:
        # A cluster of its own gets a fresh key (0600, in the 0700 session
        # directory); a node joining one is given the cluster's.
        # (keys_dir "none": a node joining a gcsd that runs without keys).
        keys_dir = spec.get("keys_dir") or security.keygen(os.path.join(session, "keys"))
        keys_dir = "" if keys_dir == "none" else keys_dir
        gcs_address = spec.get("gcs_address")
        if not gcs_address:  # the head: this node runs the cluster's gcsd
            gcs_args = ["--host", host, "--port", "0", "--data-dir", os.path.join(session, "gcs")]
            if spec.get("node_timeout_s"):
                gcs_args += ["--node-timeout-s", str(float(spec["node_timeout_s"]))]
            gcs = _start("gcsd", gcs_args, logdir, procs, keys_dir)
            gcs_address = gcs["address"]
        store_sock = os.path.join(session, "stored.sock")
        store_args = ["--socket", store_sock, "--set", f"node.address={host}",
                      "--set", f"stored.spill_dir={os.path.join(session, 'spill')}"]
        if spec.get("object_store_memory"):
            store_args += ["--memory", str(int(spec["object_store_memory"]))]
        _start("stored", store_args, logdir, procs, keys_dir)
        raylet_sock = os.path.join(session, "raylet.sock")
        raylet_args = ["--socket", raylet_sock, "--store-socket", store_sock,
                       "--gcs-address", gcs_address, "--set", f"node.address={host}"]
        if spec.get("head"):
            raylet_args += ["--set", "raylet.head=true"]
        if spec.get("num_cpus") is not None:
            raylet_args += ["--num-cpus", str(spec["num_cpus"])]
        if spec.get("num_gpus") is not None:
            raylet_args += ["--num-gpus", str(spec["num_gpus"])]
        if spec.get("resources"):
            raylet_args += ["--resources", json.dumps(spec["resources"])]
        raylet = _start("raylet", raylet_args, logdir, procs, keys_dir)
        info = {"session_dir": session, "raylet_socket": raylet_sock, "keys_dir": keys_dir,
                "gcs_address": gcs_address, "node_id": raylet.get("node_id", ""),
                "pids": [p.pid for p in procs],
                "daemons": {p.args[2].split(".")[1]: p.pid for p in procs}}
    except Exception as exc:
        _stop_all(procs)
        shutil.rmtree(session, ignore_errors=True)
        os.write(ready_fd, (json.dumps({"error": str(exc)}) + "\n").encode())
        os.close(ready_fd)
        sys.exit(1)
    os.write(ready_fd, (json.dumps(info) + "\n").encode())
    os.close(ready_fd)
    # Run until the driver's pipe closes (shutdown, exit or death) or SIGTERM.
    from libclient.spin import wait_readable

    stdin = sys.stdin.fileno()
    try:
        while not stop:
            readable = wait_readable(stdin, 0.2)
            if readable and not os.read(stdin, 4096):
                break
    except (OSError, ValueError):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_all(procs)
        shutil.rmtree(session, ignore_errors=True)


if __name__ == "__main__":
    _launcher(json.loads(sys.argv[1]), int(sys.argv[2]))
