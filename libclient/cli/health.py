"""``shoal health``: is each daemon of this host serving, merely up, or down?

"Up" means a process holds the endpoint (connect works) but no answer came
within the deadline: wedged, overloaded, or still starting. "Serving" means
it answered a ping. Supervisors and scripts use the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from libclient.cli import common
from libclient.gcs_client import GcsClient, GcsError
from libclient.protocol import Connection, ProtocolError

SERVING, UP, DOWN = "serving", "up", "down"


@dataclass
class Probe:
    """One daemon's health as seen from here."""

    daemon: str
    endpoint: str
    state: str
    latency_ms: float | None = None
    error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def probe_unix(daemon: str, path: str, timeout: float = 2.0) -> Probe:
    """Ping a daemon on its Unix socket (stored and raylet answer ``ping``)."""
    if not os.path.exists(path):
        return Probe(daemon, path, DOWN, error="no socket")
    start = time.monotonic()
    try:
        conn = Connection.connect_unix(path, timeout=timeout)
    except OSError as exc:
        return Probe(daemon, path, DOWN, error=exc.strerror or str(exc))
    try:
        conn.sock.settimeout(timeout)
        reply = conn.call({"t": "ping"})
    except (OSError, ProtocolError) as exc:
        return Probe(daemon, path, UP, error=f"no answer: {exc or 'timed out'}")
    finally:
        conn.close()
    latency = round((time.monotonic() - start) * 1000, 2)
    if not reply.get("ok"):
        return Probe(daemon, path, UP, latency, error=str(reply.get("error")))
    detail = {k: v for k, v in reply.items() if k not in ("t", "r", "ok")}
    return Probe(daemon, path, SERVING, latency, detail=detail)


def probe_gcs(address: str, timeout: float = 2.0) -> Probe:
    """Ping gcsd; a ZeroMQ connect never fails, so silence is "down or wedged"."""
    start = time.monotonic()
    try:
        with GcsClient(address, timeout=timeout) as gcs:
            gcs.ping()
            info = gcs.info()
    except GcsError as exc:
        return Probe("gcsd", address, DOWN, error=str(exc) or "no answer")
    latency = round((time.monotonic() - start) * 1000, 2)
    return Probe("gcsd", address, SERVING, latency,
                 detail={k: v for k, v in info.items() if k not in ("t", "r", "ok")})


def local_probes(conf: Any, raylet: str | None, gcs_address: str | None,
                 store_socket: str | None = None) -> list[Probe]:
    """Probe gcsd (if known), stored and the raylet of this host."""
    probes = []
    if gcs_address:
        probes.append(probe_gcs(gcs_address))
    probes.append(probe_unix("stored", store_socket or conf["stored"]["socket"]))
    probes.append(probe_unix("raylet", raylet or conf["raylet"]["socket"]))
    return probes


def add_parser(sub: Any) -> None:
    p = sub.add_parser("health", help="ping this host's daemons; exit 1 unless all serve")
    common.add_config_flags(p)
    p.add_argument("--address", help="raylet socket or gcs address (default: config)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    conf = common.host_config(ns)
    raylet, gcs_address, store_socket = conf["raylet"]["socket"], None, None
    try:
        raylet_or_none, gcs_address = common.locate(ns, conf)
        raylet = raylet_or_none or raylet
        hello = common.raylet_hello(raylet) if raylet_or_none else {}
        store_socket = hello.get("store_socket")
    except common.CliError:
        gcs_address = conf.gcs_address  # the raylet is down: still check the rest
    probes = local_probes(conf, raylet, gcs_address, store_socket)
    if ns.json:
        print(json.dumps([asdict(p) for p in probes], indent=2, default=_jsonable))
    else:
        for p in probes:
            extra = f"{p.latency_ms} ms" if p.latency_ms is not None else p.error
            print(f"{p.daemon:<7} {p.state:<8} {p.endpoint}  {extra}")
    return 0 if all(p.state == SERVING for p in probes) else 1


def _jsonable(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else str(value)
