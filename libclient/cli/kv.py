"""``shoal kv get|put|list``: gcsd's key-value store from the shell.

Keys are text; values are bytes, written to stdout as they are (so binary
values survive a pipe) and read from the argument or, with ``-``, stdin.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from libclient.cli import common
from libclient.gcs_client import GcsClient, GcsError

DEFAULT_NAMESPACE = "default"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("kv", help="get, put and list keys in gcsd's key-value store")
    kv_sub = p.add_subparsers(dest="kv_cmd", required=True, metavar="ACTION")
    for name, help_text in (("get", "print a key's value"), ("put", "set a key"),
                            ("list", "list keys (with a prefix)")):
        q = kv_sub.add_parser(name, help=help_text)
        common.add_config_flags(q)
        q.add_argument("--address", help="raylet socket or gcs address")
        q.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE)
        if name == "list":
            q.add_argument("prefix", nargs="?", default="")
        else:
            q.add_argument("key")
        if name == "put":
            q.add_argument("value", help="the value, or '-' to read it from stdin")
            q.add_argument("--no-overwrite", action="store_true",
                           help="fail (exit 1) if the key exists")
        q.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    _raylet, address = common.locate(ns, common.host_config(ns))
    try:
        with GcsClient(address, timeout=5.0) as gcs:
            return _run(gcs, ns)
    except GcsError as exc:
        raise common.CliError(f"gcsd at {address}: {exc}") from None


def _run(gcs: GcsClient, ns: argparse.Namespace) -> int:
    if ns.kv_cmd == "get":
        value = gcs.kv_get(ns.namespace, ns.key)
        if value is None:
            raise common.CliError(f"no key {ns.key!r} in namespace {ns.namespace!r}")
        sys.stdout.buffer.write(value)
        if sys.stdout.isatty() and not value.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
        return 0
    if ns.kv_cmd == "put":
        value = sys.stdin.buffer.read() if ns.value == "-" else ns.value.encode()
        added = gcs.kv_put(ns.namespace, ns.key, value, overwrite=not ns.no_overwrite)
        if ns.no_overwrite and not added:
            raise common.CliError(f"key {ns.key!r} exists in namespace {ns.namespace!r}")
        return 0
    for key in gcs.kv_keys(ns.namespace, ns.prefix):
        print(key.decode(errors="backslashreplace"))
    return 0
