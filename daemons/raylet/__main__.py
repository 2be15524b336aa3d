"""``raylet``: the per-node scheduler daemon.

    raylet --socket /run/shoal/raylet.sock --store-socket /run/shoal/stored.sock \
           --gcs-address tcp://127.0.0.1:6379 [--num-cpus N] [--num-gpus N]
           [--resources '{"accel": 2}'] [--config shoal.toml] [--ready-fd FD]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from daemons import shell
from daemons.raylet.detect import detect
from daemons.raylet.server import Raylet
from daemons.raylet.worker_pool import WorkerPool
from libclient import logs


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raylet", description=__doc__.splitlines()[0])
    p.add_argument("--socket")
    p.add_argument("--store-socket")
    p.add_argument("--gcs-address")
    p.add_argument("--node-id")
    p.add_argument("--num-cpus", type=float)
    p.add_argument("--num-gpus", type=float)
    p.add_argument("--memory", type=int)
    p.add_argument("--resources", help="JSON map of custom resources")
    p.add_argument("--max-workers", type=int)
    p.add_argument("--worker-python", help="interpreter for workers (default: this one)")
    p.add_argument("--gcs-timeout", type=float, default=10.0,
                   help="seconds to wait for gcsd at start-up")
    p.add_argument("--config")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def _settings(ns: argparse.Namespace) -> dict[str, Any]:
    conf = shell.load_config(ns.config, "raylet")
    known = {"socket", "store_socket", "gcs_address", "node_id", "num_cpus", "num_gpus",
             "memory", "resources", "max_workers", "worker_python"}
    unknown = set(conf) - known - {"session_dir"}
    if unknown:
        raise shell.ConfigError(f"unknown raylet config keys: {sorted(unknown)}")
    for key in known:
        value = getattr(ns, key)
        if value is not None:
            conf[key] = value
    if isinstance(conf.get("resources"), str):
        try:
            conf["resources"] = json.loads(conf["resources"])
        except json.JSONDecodeError as exc:
            raise shell.ConfigError(f"--resources is not JSON: {exc}") from None
    for key in ("socket", "store_socket", "gcs_address"):
        if not conf.get(key):
            raise shell.ConfigError(f"raylet needs {key.replace('_', '-')} (flag or config)")
    custom = conf.get("resources") or {}
    if not isinstance(custom, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for v in custom.values()):
        raise shell.ConfigError("resources must map names to non-negative numbers")
    for key in ("num_cpus", "num_gpus", "memory"):
        if conf.get(key) is not None and (not isinstance(conf[key], (int, float)) or conf[key] < 0):
            raise shell.ConfigError(f"{key} must be a non-negative number")
    return conf


def main(argv: list[str] | None = None) -> None:
    ns = _args(argv)
    log = logs.configure("raylet", level=ns.log_level)
    try:
        conf = _settings(ns)
    except shell.ConfigError as exc:
        shell.fail(log, str(exc))
        return
    node_id = bytes.fromhex(conf["node_id"]) if conf.get("node_id") else os.urandom(16)
    log = logs.configure("raylet", node_id=node_id.hex(), level=ns.log_level)
    resources, gpus, why = detect(conf.get("num_cpus"), conf.get("num_gpus"),
                                  conf.get("memory"), conf.get("resources"))
    if why and not gpus:
        log.info("no_gpus", reason=why)
    stop = shell.StopFlag()
    try:
        listen = shell.bind_unix(conf["socket"])
    except (shell.ConfigError, OSError) as exc:
        shell.fail(log, f"cannot listen on {conf['socket']}: {exc}")
        return
    from libclient.gcs_client import GcsClient

    gcs = GcsClient(conf["gcs_address"], timeout=ns.gcs_timeout)
    info = {"node_id": node_id, "address": "127.0.0.1", "raylet_socket": conf["socket"],
            "store_socket": conf["store_socket"], "resources": resources, "gpus": gpus,
            "pid": os.getpid(), "hostname": os.uname().nodename}
    try:
        gcs.register_node(node_id, info)
    except Exception as exc:
        listen.close()
        os.unlink(conf["socket"])
        shell.fail(log, f"cannot register with gcsd at {conf['gcs_address']}: {exc}")
        return
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    pool = WorkerPool(["--raylet", conf["socket"]], os.path.dirname(os.path.abspath(conf["socket"])),
                      env, python=conf.get("worker_python") or sys.executable)
    ncpu = int(resources.get("CPU", 1))
    raylet = Raylet(listen=listen, socket_path=conf["socket"], node_id=node_id,
                    resources=resources, gpus=gpus, pool=pool,
                    store_socket=conf["store_socket"], gcs=gcs,
                    gcs_address=conf["gcs_address"], log=log,
                    max_workers=conf.get("max_workers") or max(8, 4 * ncpu + 4),
                    wake_fd=stop.wake_fd_r)
    raylet.start_workers()
    log.info("raylet_started", socket=conf["socket"], resources=resources, gpus=len(gpus))
    shell.notify_ready(ns.ready_fd, json.dumps({"socket": conf["socket"],
                                                 "node_id": node_id.hex()}))
    try:
        raylet.run(stop)
    finally:
        raylet.close()
        try:
            gcs.call("unregister_node", node_id=node_id)
        except Exception as exc:
            log.warning("unregister_failed", error=str(exc))
        gcs.close()
        log.info("raylet_stopped")
    sys.exit(0)


if __name__ == "__main__":
    main()
