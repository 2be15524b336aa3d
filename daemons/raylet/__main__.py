"""``raylet``: the per-node scheduler daemon.

    raylet [--config /etc/shoal/shoal.toml] [--socket /run/shoal/raylet.sock]
           [--store-socket /run/shoal/stored.sock] [--gcs-address tcp://127.0.0.1:6379]
           [--num-cpus N] [--num-gpus N] [--resources '{"accel": 2}']
           [--set SECTION.KEY=VALUE] [--log-level info] [--log-destination stderr|DIR]
           [--ready-fd FD]

Settings come from the host config (docs/operations.md); flags win.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from daemons import sdnotify, shell
from daemons.raylet.detect import detect
from daemons.raylet.server import Raylet
from daemons.raylet.worker_pool import WorkerPool


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raylet", description=__doc__.splitlines()[0])
    p.add_argument("--socket", help="Unix socket to serve on ([raylet] socket)")
    p.add_argument("--store-socket", help="stored's socket ([stored] socket)")
    p.add_argument("--gcs-address", help="gcsd to register with ([gcs] members)")
    p.add_argument("--node-id", help="hex node id ([node] id; default random)")
    p.add_argument("--num-cpus", type=float)
    p.add_argument("--num-gpus", type=float)
    p.add_argument("--memory", type=int)
    p.add_argument("--resources", help="JSON map of custom resources")
    p.add_argument("--max-workers", type=int)
    p.add_argument("--worker-python", help="interpreter for workers (default: this one)")
    p.add_argument("--gcs-timeout", type=float,
                   help="seconds to wait for gcsd at start-up ([gcs] connect_timeout_s)")
    shell.add_config_flags(p)
    return p.parse_args(argv)


def _settings(ns: argparse.Namespace) -> shell.HostConfig:
    """The host config with our flags on top (flags win)."""
    return shell.resolve_config(ns, {
        "raylet.socket": ns.socket, "stored.socket": ns.store_socket,
        "gcs.members": ns.gcs_address, "node.id": ns.node_id,
        "raylet.num_cpus": ns.num_cpus, "raylet.num_gpus": ns.num_gpus,
        "raylet.memory": ns.memory, "raylet.resources": ns.resources,
        "raylet.max_workers": ns.max_workers, "raylet.worker_python": ns.worker_python,
        "gcs.connect_timeout_s": ns.gcs_timeout})


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``raylet`` console script; exits 0 on SIGTERM, 2 on bad setup."""
    ns = _args(argv)
    log = shell.start_logging("raylet", ns)
    try:
        conf = _settings(ns)
        node_id = bytes.fromhex(conf["node"]["id"]) if conf["node"]["id"] else os.urandom(16)
        log = shell.configured_logging("raylet", node_id.hex(), conf)
        shell.check_socket_dir(conf["raylet"]["socket"])
        shell.use_keys(conf["security"], log)  # workers inherit them through the environment
    except shell.ConfigError as exc:
        shell.fail(log, str(exc))
        return
    rconf = conf["raylet"]
    socket_path, store_socket = rconf["socket"], conf["stored"]["socket"]
    resources, gpus, why = detect(rconf["num_cpus"], rconf["num_gpus"], rconf["memory"],
                                  rconf["resources"])
    if why and not gpus:
        log.info("no_gpus", reason=why)
    stop = shell.StopFlag()
    try:
        listen = shell.bind_unix(socket_path)
    except (shell.ConfigError, OSError) as exc:
        shell.fail(log, f"cannot listen on {socket_path}: {exc}")
        return
    host = conf["node"]["address"]
    try:
        tcp_listen = socket.create_server((host, rconf["port"]), backlog=128)
    except OSError as exc:
        listen.close()
        os.unlink(socket_path)
        shell.fail(log, f"cannot listen on {host}:{rconf['port']} ([raylet] port): {exc}")
        return
    tcp_listen.setblocking(False)
    from libclient.gcs_client import GcsClient

    # Every member, for us and (through hello) for our drivers and workers:
    # a process that starts while the first member is down still finds gcsd.
    gcs_members = ",".join(conf["gcs"]["members"])
    gcs = GcsClient(gcs_members, timeout=conf["gcs"]["connect_timeout_s"])
    try:
        gcs.ping()  # an unreachable gcsd is a config error: say so before waiting for stored
    except Exception as exc:
        listen.close()
        tcp_listen.close()
        os.unlink(socket_path)
        shell.fail(log, f"cannot register with gcsd at {conf.gcs_address}: {exc}")
        return
    try:
        store_watch, store_address = _watch_store(store_socket,
                                                  conf["gcs"]["connect_timeout_s"])
    except OSError as exc:
        listen.close()
        tcp_listen.close()
        os.unlink(socket_path)
        shell.fail(log, f"stored is not serving at {store_socket}: {exc}")
        return
    info = {"node_id": node_id, "address": host,
            "raylet_address": f"{host}:{tcp_listen.getsockname()[1]}",
            "store_address": store_address,
            "head": bool(rconf["head"]),
            "raylet_socket": socket_path, "store_socket": store_socket,
            "resources": resources, "gpus": gpus, "pid": os.getpid(),
            "hostname": os.uname().nodename}
    try:
        gcs.register_node(node_id, info)
    except Exception as exc:
        listen.close()
        tcp_listen.close()
        store_watch.close()
        os.unlink(socket_path)
        shell.fail(log, f"cannot register with gcsd at {conf.gcs_address}: {exc}")
        return
    pool = WorkerPool(["--raylet", socket_path], os.path.dirname(os.path.abspath(socket_path)),
                      shell.child_env(), python=rconf["worker_python"] or sys.executable,
                      tcp_host=host)
    ncpu = int(resources.get("CPU", 1))
    raylet = Raylet(listen=listen, tcp_listen=tcp_listen, store_address=info["store_address"],
                    socket_path=socket_path,
                    node_id=node_id,
                    resources=resources, gpus=gpus, pool=pool,
                    store_socket=store_socket, gcs=gcs,
                    gcs_address=gcs_members, log=log,
                    max_workers=rconf["max_workers"] or max(8, 4 * ncpu + 4),
                    wake_fd=stop.wake_fd_r, store_watch=store_watch.sock)
    raylet.start_workers()
    log.info("raylet_started", security=shell.security_summary(), socket=socket_path, address=info["raylet_address"],
             resources=resources, gpus=len(gpus),
             gcs_address=gcs_members, config=conf.path)
    shell.notify_ready(ns.ready_fd, json.dumps({"socket": socket_path,
                                                 "node_id": node_id.hex()}))
    # The loop stamps raylet.last_loop on every turn (at least every 0.1 s).
    watchdog = sdnotify.start_watchdog(lambda: raylet.last_loop, log)
    try:
        shell.tune_gc()
        raylet.run(stop)
    finally:
        sdnotify.notify_stopping()
        if watchdog is not None:
            watchdog.stop()
        raylet.close()
        try:
            gcs.call("unregister_node", node_id=node_id)
        except Exception as exc:
            log.warning("unregister_failed", error=str(exc))
        gcs.close()
        log.info("raylet_stopped", status=raylet.exit_status)
    sys.exit(raylet.exit_status)


def _watch_store(store_socket: str, timeout: float) -> tuple[Any, str]:
    """Connect to stored, waiting up to ``timeout`` s for it (a supervisor may
    be starting it beside us); return the connection, kept open so the raylet
    sees stored die, and where other nodes pull our objects from.

    Raises:
        OSError: stored did not answer in time.
    """
    from libclient.protocol import Connection

    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = Connection.connect_unix(store_socket, timeout=2.0)
            try:
                conn.sock.settimeout(max(0.5, deadline - time.monotonic()))
                conn.send({"t": "health", "r": 1})
                reply = conn.recv()
                conn.sock.settimeout(None)
            except BaseException:
                conn.close()
                raise
            return conn, str(reply.get("transfer_address") or "")
        except (OSError, ConnectionError) as exc:
            if time.monotonic() >= deadline:
                raise OSError(str(exc)) from None
            time.sleep(0.1)


if __name__ == "__main__":
    main()
