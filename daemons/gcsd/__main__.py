"""``gcsd``: the cluster's control store daemon (a member, or the chain master).

    gcsd --data-dir DIR [--host 127.0.0.1] [--port 6379] [--config shoal.toml]
         [--ready-fd FD] [--node-timeout-s 10] [--log-level info]
         [--shards 4] [--chain-length 1] [--members A,B,C --member-id K]
         [--master ADDR] [--role member|master] [--heartbeat-s 0.1] [--dead-s 0.6]

Alone (no ``--members``), one process hosts every shard as a chain of one,
and needs no master: the laptop setup. With ``--members`` (request addresses
of every member, in id order) the process is member ``--member-id`` and
follows the chain master at ``--master``, which is the same program run with
``--role master``. See docs/gcs.md.

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
from typing import IO, Any

import zmq

from daemons import sdnotify, shell
from daemons.gcsd.core import ControlStore
from daemons.gcsd.master import ChainMaster
from daemons.gcsd.master_server import MasterServer, bind_master, load_state
from daemons.gcsd.replication import LocalReads
from daemons.gcsd.server import Deployment, GcsServer, bind_sockets
from daemons.gcsd.shardstore import ShardStore
from daemons.gcsd.tables import StorageError
from libclient import __version__, hostconfig, logs, security
from libclient.protocol import MAX_FRAME

DEFAULT_PORT = 6379  # Ray's default GCS port, so existing firewall rules carry over
DEFAULT_NODE_TIMEOUT_S = 10.0
DEFAULT_SHARDS = 4
# On a first start the master waits this long for a member it has never
# heard from before taking it out of the initial chains (see ChainMaster).
BOOTSTRAP_S = 10.0
# After this long without a config change, the master moves one head off a
# member that heads too many shards (ChainMaster rule 6).
REBALANCE_S = 5.0
_KNOWN = {"host", "port", "data_dir", "node_timeout_s", "sync", "shards", "chain_length",
          "members", "member_id", "master", "role", "heartbeat_s", "dead_s", "max_message"}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gcsd", description=__doc__.splitlines()[0])
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help=f"request port; pub-sub uses port+1; "
                                            f"0 picks free ports (default {DEFAULT_PORT})")
    p.add_argument("--data-dir", help="LMDB directory; created 0700 if missing")
    p.add_argument("--config", help="TOML file; its [gcsd] table sets any of: "
                                    + ", ".join(sorted(_KNOWN)))
    p.add_argument("--ready-fd", type=int, help="write one JSON line here once serving")
    p.add_argument("--node-timeout-s", type=float,
                   help=f"declare a silent node DEAD after this long "
                        f"(default {DEFAULT_NODE_TIMEOUT_S:g})")
    p.add_argument("--shards", type=int, help=f"number of shards N (default {DEFAULT_SHARDS})")
    p.add_argument("--chain-length", type=int,
                   help="replicas per shard R (default 1; at most the number of members)")
    p.add_argument("--members", help="comma-separated request addresses of all members, "
                                     "in member-id order")
    p.add_argument("--member-id", type=int, help="this member's index in --members")
    p.add_argument("--master", help="the chain master's address (needed with --members)")
    p.add_argument("--role", choices=("member", "master"), help="default member")
    p.add_argument("--heartbeat-s", type=float, help="member -> master heartbeat (default 0.1)")
    p.add_argument("--dead-s", type=float,
                   help="master: remove a member silent this long (default 0.6)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def _host_config(ns: argparse.Namespace) -> dict[str, Any]:
    """Our keys from the host config file and SHOAL_* variables, if one is in effect.

    The shared schema (libclient/hostconfig.py, docs/operations.md) checks every
    key; [gcs] holds what clients also need (members, shards, chain length).
    """
    path = hostconfig.config_path(ns.config, os.environ)
    if path is None and not any(k.startswith(("SHOAL_GCSD_", "SHOAL_GCS_")) for k in os.environ):
        return {}
    try:
        hc = hostconfig.resolve(path, os.environ, {}, [])
    except hostconfig.ConfigError as exc:
        raise shell.ConfigError(str(exc)) from None
    own, gcs = hc.values["gcsd"], hc.values["gcs"]
    conf = {k: v for k, v in own.items() if v is not None}
    conf["shards"], conf["chain_length"] = gcs["shards"], gcs["chain_length"]
    if len(gcs["members"]) > 1:
        conf["members"] = list(gcs["members"])
    return conf


def _term(ctx: zmq.Context, zap: security.ZapHandler | None) -> None:
    """End the ZAP handler (its socket would keep ``term`` waiting), then the context."""
    if zap is not None:
        zap.stop()
    ctx.term()


def _security(ns: argparse.Namespace) -> dict[str, Any]:
    """``[security]`` from the host config and SHOAL_SECURITY_* (docs/security.md)."""
    try:
        hc = hostconfig.resolve(hostconfig.config_path(ns.config, os.environ), os.environ, {}, [])
    except hostconfig.ConfigError as exc:
        raise shell.ConfigError(str(exc)) from None
    return hc.values["security"]


def _settings(ns: argparse.Namespace) -> dict[str, Any]:
    """Merge the config file and flags (flags win) and check every value."""
    conf = _host_config(ns)
    for key in ("host", "port", "data_dir", "node_timeout_s", "shards", "chain_length",
                "members", "member_id", "master", "role", "heartbeat_s", "dead_s"):
        value = getattr(ns, key)
        if value is not None:
            conf[key] = value
    conf.setdefault("host", "127.0.0.1")
    conf.setdefault("node_timeout_s", DEFAULT_NODE_TIMEOUT_S)
    conf.setdefault("sync", False)
    conf.setdefault("shards", DEFAULT_SHARDS)
    conf.setdefault("chain_length", 1)
    conf.setdefault("role", "member")
    conf.setdefault("heartbeat_s", 0.1)
    conf.setdefault("dead_s", 0.6)
    members = conf.get("members")
    if isinstance(members, str):
        members = [m.strip() for m in members.split(",") if m.strip()]
    if members is not None and (not isinstance(members, list) or not members
                                or not all(isinstance(m, str) and m.startswith("tcp://")
                                           and m.rpartition(":")[2].isdigit()
                                           for m in members)):
        raise shell.ConfigError(f"members must be tcp://host:port addresses, got {members!r}")
    conf["members"] = members
    if not isinstance(conf["host"], str) or not conf["host"]:
        raise shell.ConfigError(f"host must be a non-empty string, got {conf['host']!r}")
    for key, lo in (("shards", 1), ("chain_length", 1)):
        v = conf[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise shell.ConfigError(f"{key} must be an integer >= {lo}, got {v!r}")
    for key in ("node_timeout_s", "heartbeat_s", "dead_s"):
        v = conf[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise shell.ConfigError(f"{key} must be a number > 0, got {v!r}")
        conf[key] = float(v)
    if conf["role"] not in ("member", "master"):
        raise shell.ConfigError(f"role must be member or master, got {conf['role']!r}")
    if members is not None and conf["role"] == "member":
        mid = conf.get("member_id")
        if isinstance(mid, bool) or not isinstance(mid, int) or not 0 <= mid < len(members):
            raise shell.ConfigError(f"member_id must be 0..{len(members) - 1} with members")
        if len(members) > 1 and not conf.get("master"):
            raise shell.ConfigError("a member of several needs --master")
        conf.setdefault("port", int(members[mid].rpartition(":")[2]))
    if conf["role"] == "master" and members is None:
        raise shell.ConfigError("the master needs --members")
    if conf["chain_length"] > len(members or [None]):
        raise shell.ConfigError(f"chain_length {conf['chain_length']} exceeds the "
                                f"{len(members or [None])} member(s)")
    conf.setdefault("port", DEFAULT_PORT)
    port = conf["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65534:
        raise shell.ConfigError(f"port must be an integer 0..65534, got {port!r}")
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


def _run_master(conf: dict[str, Any], ns: argparse.Namespace, log: Any) -> None:
    members = conf["members"]
    tick_s = 0.05
    try:
        master = ChainMaster(len(members), conf["shards"], conf["chain_length"],
                             dead_ticks=max(2, round(conf["dead_s"] / tick_s)),
                             state=load_state(conf["data_dir"]),
                             bootstrap_ticks=round(BOOTSTRAP_S / tick_s),
                             rebalance_ticks=round(REBALANCE_S / tick_s),
                             suspect_ticks=max(1, round(2 * conf["heartbeat_s"] / tick_s)))
    except (ValueError, OSError) as exc:
        shell.fail(log, f"master state in {conf['data_dir']} is unusable: {exc}")
        return
    ctx = zmq.Context()
    zap = security.start_zap(ctx, log)  # before any bind: CURVE clients are checked by it
    try:
        router, address = bind_master(ctx, conf["host"], conf["port"], conf["max_message"])
    except zmq.ZMQError as exc:
        _term(ctx, zap)
        shell.fail(log, f"cannot bind {conf['host']}:{conf['port']}: {exc}")
        return
    server = MasterServer(router, master, conf["data_dir"], members, log, tick_s)
    log.info("gcsd_started", role="master", security=shell.security_summary(), address=address, data_dir=conf["data_dir"],
             configs=master.configs(), version=__version__)
    shell.notify_ready(ns.ready_fd, json.dumps({"address": address}))
    stop = shell.StopFlag()
    try:
        shell.tune_gc()
        server.run(stop)
    finally:
        server.close()
        _term(ctx, zap)
        log.info("gcsd_stopped", requests=server.handled)


def _open_replicas(conf: dict[str, Any], pubsub: str
                   ) -> dict[int, tuple[ShardStore, ControlStore]]:
    """Open this member's replicas: every shard (each member may join any chain)."""
    out: dict[int, tuple[ShardStore, ControlStore]] = {}
    for s in range(conf["shards"]):
        store = ShardStore(os.path.join(conf["data_dir"], f"shard-{s}"), sync=conf["sync"])
        core = ControlStore(LocalReads(store.tables, store),
                            node_timeout_s=conf["node_timeout_s"], pubsub_address=pubsub,
                            version=__version__, now=time.monotonic())
        out[s] = (store, core)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``gcsd`` console script; exits 0 on SIGTERM, 2 on bad setup."""
    ns = _args(argv)
    log = logs.configure("gcsd", level=ns.log_level)
    try:
        conf = _settings(ns)
        shell.use_keys(_security(ns), log)
        conf.setdefault("max_message", MAX_FRAME)  # [gcsd] max_message, checked by hostconfig
        lock = _lock_data_dir(conf["data_dir"])
    except shell.ConfigError as exc:
        shell.fail(log, str(exc))
        return
    if conf["role"] == "master":
        try:
            _run_master(conf, ns, log)
        finally:
            lock.close()
        sys.exit(0)
    stop = shell.StopFlag()
    ctx = zmq.Context()
    zap = security.start_zap(ctx, log)  # before any bind: CURVE clients are checked by it
    try:
        router, pub, address, pubsub = bind_sockets(ctx, conf["host"], conf["port"],
                                                    conf["max_message"])
    except shell.ConfigError as exc:
        _term(ctx, zap)
        shell.fail(log, str(exc))
        return
    members = conf["members"] or [address]
    member = conf.get("member_id", 0) if conf["members"] else 0
    try:
        replicas = _open_replicas(conf, pubsub)
    except StorageError as exc:
        router.close()
        pub.close()
        _term(ctx, zap)
        shell.fail(log, str(exc))
        return
    deployment = Deployment(member, members, conf["shards"],
                            conf.get("master") if conf["members"] else None,
                            heartbeat_s=conf["heartbeat_s"], chain_length=conf["chain_length"])
    tick_s = min(1.0, max(0.05, conf["node_timeout_s"] / 4))
    server = GcsServer(router, pub, replicas, deployment, log, tick_s, ctx, pubsub,
                       max_message=conf["max_message"])
    log.info("gcsd_started", address=address, pubsub=pubsub, security=shell.security_summary(), data_dir=conf["data_dir"],
             max_message=conf["max_message"],
             node_timeout_s=conf["node_timeout_s"], member=member, members=members,
             shards=conf["shards"], chain_length=conf["chain_length"],
             master=deployment.master, seq=sum(s.applied for s, _c in replicas.values()),
             version=__version__)
    shell.notify_ready(ns.ready_fd, json.dumps({"address": address, "pubsub": pubsub}))
    watchdog = sdnotify.start_watchdog(lambda: server.last_loop, log)
    try:
        shell.tune_gc()
        server.run(stop)
    finally:
        sdnotify.notify_stopping()
        if watchdog is not None:
            watchdog.stop()
        server.close()
        _term(ctx, zap)
        lock.close()
        log.info("gcsd_stopped", requests=server.handled)
    sys.exit(0)


if __name__ == "__main__":
    main()

