"""What every ``shoal`` command shares: its error type, config, and finding the cluster."""

from __future__ import annotations

import argparse
import os
from typing import Any

from libclient import hostconfig
from libclient.protocol import Connection, ProtocolError


class CliError(Exception):
    """A failure to report in one line; ``code`` is the exit status (1 or 2)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """--config, --set and --dir, read the same way the daemons read them."""
    p.add_argument("--config", help=f"host config; default ${hostconfig.PATH_ENV} or "
                                    f"{hostconfig.DEFAULT_PATH}; 'none' for none")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--dir", help="a self-contained local node: sockets in DIR/run, "
                                 "data in DIR/state, logs in DIR/logs")


def dir_assignments(directory: str | None) -> list[str]:
    """The --set items that --dir stands for (explicit --set items come after, and win)."""
    if not directory:
        return []
    base = os.path.abspath(directory)
    return [f"node.runtime_dir={base}/run", f"node.state_dir={base}/state",
            f"log.destination={base}/logs"]


def host_config(ns: argparse.Namespace) -> hostconfig.HostConfig:
    """Resolve the host config for a command; a bad config is a usage error (2)."""
    try:
        path = hostconfig.config_path(ns.config, os.environ)
        return hostconfig.resolve(path, os.environ, {},
                                  dir_assignments(ns.dir) + list(ns.set))
    except hostconfig.ConfigError as exc:
        raise CliError(str(exc), 2) from None


def unix_call(path: str, msg: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
    """One request to a daemon's Unix socket, with a deadline on the whole exchange.

    Raises:
        OSError: not listening, refused, timed out.
        ProtocolError: a reply that is not a reply to this request.
    """
    conn = Connection.connect_unix(path, timeout=timeout)
    try:
        conn.sock.settimeout(timeout)
        return conn.call(dict(msg))
    finally:
        conn.close()


def is_gcs_address(address: str) -> bool:
    """``tcp://host:port`` or ``host:port`` names gcsd; anything else is a raylet socket."""
    if address.startswith("tcp://"):
        return True
    try:
        hostconfig.gcs_address(address)
    except ValueError:
        return False
    return os.path.sep not in address


def raylet_hello(path: str, timeout: float = 3.0) -> dict[str, Any]:
    """Ask a raylet who it is (node id, gcs address, stored socket).

    Raises:
        CliError: the raylet does not answer.
    """
    try:
        reply = unix_call(path, {"t": "hello", "kind": "driver"}, timeout)
    except (OSError, ProtocolError) as exc:
        raise CliError(f"cannot reach a raylet at {path}: {exc}") from None
    if not reply.get("ok"):
        raise CliError(f"raylet at {path} refused hello: {reply.get('error')}")
    return reply


def locate(ns: argparse.Namespace, conf: hostconfig.HostConfig) -> tuple[str | None, str]:
    """(raylet socket or None, gcs address) for a command run on this host.

    ``--address`` may name either; else ``$SHOAL_ADDRESS``; else the config.
    Given a raylet, the gcs address is the one that raylet registered with.
    """
    address = getattr(ns, "address", None) or os.environ.get("SHOAL_ADDRESS")
    if address and address != "auto" and is_gcs_address(address):
        return None, hostconfig.gcs_address(address)
    raylet = address if address and address != "auto" else conf["raylet"]["socket"]
    return raylet, raylet_hello(raylet)["gcs_address"]
