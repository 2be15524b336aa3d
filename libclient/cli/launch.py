"""``shoal start`` and ``shoal stop``: run this host's daemons without systemd.

``start`` launches gcsd (with ``--head``), stored and raylet in that order,
each only after the previous one reports ready, from the same host config
the units use. In the background (the default) they run in their own
session, log to ``<log dir>/<daemon>.log`` and ``start`` returns; with
``--foreground`` it stays, the daemons log to its stderr, and Ctrl-C or
SIGTERM stops them all. Either way each daemon's pid goes to
``<runtime_dir>/<daemon>.pid``, which is what ``stop`` reads. ``stop`` checks
that a pid still belongs to that daemon before signalling it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import IO, Any

import psutil

from libclient import hostconfig
from libclient.cli import common
from libclient.spin import wait_readable

ORDER = ("gcsd", "stored", "raylet")
_PR_SET_PDEATHSIG = 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser("start", help="start this host's daemons (head: with gcsd)")
    common.add_config_flags(p)
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="also start gcsd on this host")
    role.add_argument("--address", help="worker node: the head's gcs address (host:port)")
    p.add_argument("--foreground", action="store_true",
                   help="stay attached; Ctrl-C stops the daemons")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds each daemon may take to become ready")
    p.set_defaults(run=run_start)
    q = sub.add_parser("stop", help="stop the daemons 'shoal start' started on this host")
    common.add_config_flags(q)
    q.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for each daemon before SIGKILL")
    q.set_defaults(run=run_stop)


# ---------------------------------------------------------------- pid files
def pid_path(conf: hostconfig.HostConfig, name: str) -> str:
    return os.path.join(conf["node"]["runtime_dir"], f"{name}.pid")


def running(conf: hostconfig.HostConfig, name: str) -> psutil.Process | None:
    """The live process recorded for ``name``, if it is still that daemon."""
    try:
        with open(pid_path(conf, name)) as f:
            proc = psutil.Process(int(f.read().strip()))
        cmdline = " ".join(proc.cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    if proc.status() == psutil.STATUS_ZOMBIE or (
            f"daemons.{name}" not in cmdline and not cmdline.split(" ")[0].endswith(name)):
        return None  # the pid was reused by something else: never signal it
    return proc


def _write_pid(conf: hostconfig.HostConfig, name: str, pid: int) -> None:
    tmp = pid_path(conf, name) + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, pid_path(conf, name))


def _remove_pid(conf: hostconfig.HostConfig, name: str) -> None:
    try:
        os.unlink(pid_path(conf, name))
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- start
def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _read_ready(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {timeout:g} s")
        if wait_readable(fd, 0.2):
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"exited with status {proc.wait()} before it was ready")
            buf += chunk
        elif proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before it was ready")
    return json.loads(buf.split(b"\n", 1)[0])


class Launcher:
    """Starts daemons one by one and remembers them, to undo a partial start."""

    def __init__(self, conf: hostconfig.HostConfig, ns: argparse.Namespace) -> None:
        self.conf = conf
        self.foreground = ns.foreground
        self.timeout = ns.timeout
        self.log_dir = (conf["log"]["destination"] if conf["log"]["destination"] != "stderr"
                        else os.path.join(conf["node"]["runtime_dir"], "logs"))
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str]) -> dict[str, Any]:
        """Start one daemon and wait for its ready line.

        Raises:
            CliError: it exited or timed out; the message carries its last log lines.
        """
        r, w = os.pipe()
        err: IO[bytes] | None = None
        if not self.foreground:
            os.makedirs(self.log_dir, mode=0o750, exist_ok=True)
            # gcsd logs to stderr; the others are told to use the log dir and
            # keep stderr for what escapes logging (an interpreter crash).
            suffix = "log" if name == "gcsd" else "stderr"
            err = open(os.path.join(self.log_dir, f"{name}.{suffix}"), "ab")
            if name != "gcsd":
                args = [*args, "--log-destination", self.log_dir]
        proc = subprocess.Popen(
            [sys.executable, "-m", f"daemons.{name}", *args, "--ready-fd", str(w)],
            pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=not self.foreground,
            preexec_fn=_die_with_parent if self.foreground else None)
        os.close(w)
        if err is not None:
            err.close()
        self.procs.append((name, proc))
        try:
            ready = _read_ready(r, proc, self.timeout)
        except RuntimeError as exc:
            raise common.CliError(f"{name} failed to start: {exc}{self._tail(name)}") from None
        finally:
            os.close(r)
        _write_pid(self.conf, name, proc.pid)
        return ready

    def _tail(self, name: str) -> str:
        if self.foreground:
            return ""
        lines: list[str] = []
        for suffix in ("log", "stderr"):
            try:
                with open(os.path.join(self.log_dir, f"{name}.{suffix}"), errors="replace") as f:
                    lines += f.read().splitlines()[-5:]
            except OSError:
                pass
        return "".join(f"\n  {line}" for line in lines[-5:])

    def stop_all(self, timeout: float = 15.0) -> list[tuple[str, int | None]]:
        """Stop what we started, newest first; return (name, exit status)."""
        codes = []
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _remove_pid(self.conf, name)
            codes.append((name, proc.returncode))
        self.procs.clear()
        return codes


def _daemon_args(conf: hostconfig.HostConfig, ns: argparse.Namespace) -> list[str]:
    """What stored and raylet need to resolve the same config as we did."""
    args = ["--config", conf.path or hostconfig.NO_FILE]
    for item in common.dir_assignments(ns.dir) + list(ns.set):
        args += ["--set", item]
    return args


def _gcsd_args(conf: hostconfig.HostConfig) -> list[str]:
    # gcsd reads its own [gcsd] table; the rest of the host config reaches it as flags.
    g = conf["gcsd"]
    args = ["--host", g["host"], "--port", str(g["port"]), "--data-dir", g["data_dir"],
            "--node-timeout-s", str(g["node_timeout_s"]), "--log-level", conf["log"]["level"]]
    return (["--config", conf.path] if conf.path else []) + args


def run_start(ns: argparse.Namespace) -> int:
    conf = common.host_config(ns)
    runtime = conf["node"]["runtime_dir"]
    try:
        os.makedirs(runtime, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise common.CliError(f"cannot create [node] runtime_dir {runtime}: "
                              f"{exc.strerror}", 2) from None
    live = [(n, p.pid) for n in ORDER if (p := running(conf, n)) is not None]
    if live:
        raise common.CliError(f"Shoal already runs here ({', '.join(f'{n} pid {p}' for n, p in live)}"
                              f"); run 'shoal stop' first")
    node_id = conf["node"]["id"] or os.urandom(16).hex()  # one id for stored and raylet logs
    launcher = Launcher(conf, ns)
    common_args = _daemon_args(conf, ns)
    try:
        if ns.head:
            gcs_address = launcher.start("gcsd", _gcsd_args(conf))["address"]
        else:
            try:
                gcs_address = hostconfig.gcs_address(ns.address)
            except ValueError as exc:
                raise common.CliError(f"--address {exc}", 2) from None
        launcher.start("stored", [*common_args, "--node-id", node_id])
        head = ["--set", "raylet.head=true"] if ns.head else []
        ready = launcher.start("raylet", [*common_args, "--node-id", node_id,
                                          "--gcs-address", gcs_address, *head])
    except BaseException:
        launcher.stop_all()
        raise
    print(f"Shoal node {node_id} is serving.\n"
          f"  gcs address:   {gcs_address}\n"
          f"  raylet socket: {ready['socket']}   (init(address=...) or SHOAL_ADDRESS)\n"
          + (f"  logs:          {launcher.log_dir}  (shoal logs)\n" if not ns.foreground else "")
          + ("  Ctrl-C stops it." if ns.foreground else "  'shoal stop' stops it."),
          flush=True)
    if not ns.foreground:
        return 0
    return _supervise(launcher)


def _supervise(launcher: Launcher) -> int:
    """Foreground: wait for a signal or for a daemon to exit, then stop them all."""
    stopping = False

    def on_signal(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    exited: tuple[str, int] | None = None
    while not stopping and exited is None:
        for name, proc in launcher.procs:
            if proc.poll() is not None:
                exited = (name, proc.returncode)
                break
        else:
            time.sleep(0.2)
    launcher.stop_all()
    if exited is not None and exited[1] != 0:
        print(f"shoal: error: {exited[0]} exited with status {exited[1]}; stopped the others",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- stop
def run_stop(ns: argparse.Namespace) -> int:
    conf = common.host_config(ns)
    found = False
    for name in reversed(ORDER):
        proc = running(conf, name)
        if proc is None:
            if os.path.exists(pid_path(conf, name)):
                _remove_pid(conf, name)  # stale: the daemon is gone already
            continue
        found = True
        try:
            proc.terminate()
            try:
                proc.wait(ns.timeout)
                how = "stopped"
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                how = f"killed (no exit within {ns.timeout:g} s)"
        except psutil.NoSuchProcess:
            how = "stopped"
        except psutil.AccessDenied:
            raise common.CliError(f"not allowed to stop {name} (pid {proc.pid})") from None
        _remove_pid(conf, name)
        print(f"{name} (pid {proc.pid}) {how}")
    if not found:
        print("no Shoal daemons started by 'shoal start' are running here")
    return 0
