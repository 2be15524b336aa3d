"""``gcsd``: the cluster's control store daemon.

    gcsd --data-dir DIR [--host 127.0.0.1] [--port 6379] [--config shoal.toml]
         [--ready-fd FD] [--node-timeout-s 10] [--log-level info]

Requests arrive on a ZeroMQ ROUTER at tcp://HOST:PORT, changes are
published on tcp://HOST:PORT+1 (both random when PORT is 0). Once serving,
one JSON line ``{"address": ..., "pubsub": ...}`` goes to --ready-fd.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
import tomllib
from typing import IO, Any

import zmq

from daemons import shell
from daemons.gcsd.core import ControlStore
from daemons.gcsd.replication import SingleReplica
from daemons.gcsd.server import GcsServer, bind_sockets
from daemons.gcsd.tables import LmdbTableStore, StorageError
from libclient import __version__, logs

DEFAULT_PORT = 6379  # Ray's default GCS port, so existing firewall rules carry over
DEFAULT_NODE_TIMEOUT_S = 10.0
_KNOWN = {"host", "port", "data_dir", "node_timeout_s", "sync"}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gcsd", description=__doc__.splitlines()[0])
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help=f"request port; pub-sub uses port+1; "
                                            f"0 picks free ports (default {DEFAULT_PORT})")
    p.add_argument("--data-dir", help="LMDB directory; created 0700 if missing")
    p.add_argument("--config", help="TOML file; its [gcsd] table sets host, port, data_dir, "
                                    "node_timeout_s, sync")
    p.add_argument("--ready-fd", type=int, help="write one JSON line here once serving")
    p.add_argument("--node-timeout-s", type=float,
                   help=f"declare a silent node DEAD after this long "
                        f"(default {DEFAULT_NODE_TIMEOUT_S:g})")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def _settings(ns: argparse.Namespace) -> dict[str, Any]:
    """Merge the config file and flags (flags win) and check every value."""
    conf = shell.load_config(ns.config, "gcsd")
    if ns.config:
        # Top-level keys are shared by every daemon; only our own table is checked.
        with open(ns.config, "rb") as f:
            own = tomllib.load(f).get("gcsd", {})
        unknown = set(own) - _KNOWN
        if unknown:
            raise shell.ConfigError(f"unknown [gcsd] config keys: {sorted(unknown)}")
    conf = {k: v for k, v in conf.items() if k in _KNOWN}
    for key in ("host", "port", "data_dir", "node_timeout_s"):
        value = getattr(ns, key)
        if value is not None:
            conf[key] = value
    conf.setdefault("host", "127.0.0.1")
    conf.setdefault("port", DEFAULT_PORT)
    conf.setdefault("node_timeout_s", DEFAULT_NODE_TIMEOUT_S)
    conf.setdefault("sync", False)
    if not isinstance(conf["host"], str) or not conf["host"]:
        raise shell.ConfigError(f"host must be a non-empty string, got {conf['host']!r}")
    port = conf["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65534:
        raise shell.ConfigError(f"port must be an integer 0..65534, got {port!r}")
    timeout = conf["node_timeout_s"]
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise shell.ConfigError(f"node_timeout_s must be a number > 0, got {timeout!r}")
    conf["node_timeout_s"] = float(timeout)
    if not isinstance(conf.get("data_dir"), str) or not conf["data_dir"]:
        raise shell.ConfigError("gcsd needs --data-dir (flag or [gcsd] data_dir)")
    if not isinstance(conf["sync"], bool):
        raise shell.ConfigError(f"sync must be true or false, got {conf['sync']!r}")
    return conf


def _lock_data_dir(path: str) -> IO[bytes]:
    """Create the data dir and hold an exclusive lock on it for our lifetime.

    LMDB itself lets several processes write one environment; two gcsds
    doing so would each publish a different history, so refuse the second.
    """
    try:
        shell.private_dir(path)
        lock = open(os.path.join(path, "gcsd.lock"), "ab")  # held until we exit
    except OSError as exc:
        raise shell.ConfigError(f"data dir {path} is not usable: {exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise shell.ConfigError(f"data dir {path} is in use by another gcsd") from None
    return lock


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``gcsd`` console script; exits 0 on SIGTERM, 2 on bad setup."""
    ns = _args(argv)
    log = logs.configure("gcsd", level=ns.log_level)
    try:
        conf = _settings(ns)
        lock = _lock_data_dir(conf["data_dir"])
    except shell.ConfigError as exc:
        shell.fail(log, str(exc))
        return
    stop = shell.StopFlag()
    try:
        store = LmdbTableStore(conf["data_dir"], sync=conf["sync"])
    except StorageError as exc:
        shell.fail(log, str(exc))
        return
    ctx = zmq.Context()
    try:
        router, pub, address, pubsub = bind_sockets(ctx, conf["host"], conf["port"])
    except shell.ConfigError as exc:
        store.close()
        ctx.term()
        shell.fail(log, str(exc))
        return
    core = ControlStore(SingleReplica(store), node_timeout_s=conf["node_timeout_s"],
                        pubsub_address=pubsub, version=__version__, now=time.monotonic())
    tick_s = min(1.0, max(0.05, conf["node_timeout_s"] / 4))
    server = GcsServer(router, pub, core, log, tick_s)
    log.info("gcsd_started", address=address, pubsub=pubsub, data_dir=conf["data_dir"],
             node_timeout_s=conf["node_timeout_s"], seq=core.shard.last_seq,
             version=__version__)
    shell.notify_ready(ns.ready_fd, json.dumps({"address": address, "pubsub": pubsub}))
    try:
        server.run(stop)
    finally:
        server.close()
        store.close()
        ctx.term()
        lock.close()
        log.info("gcsd_stopped", requests=server.handled)
    sys.exit(0)


if __name__ == "__main__":
    main()
