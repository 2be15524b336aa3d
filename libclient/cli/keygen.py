"""``shoal keygen DIR``: make a cluster's key material (docs/security.md)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from libclient import security
from libclient.cli import common


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keygen", help="make a cluster's keys: CA, node certificate, CURVE "
                                      "keypair, HMAC secret")
    p.add_argument("dir", help="directory to create (0700; files 0600)")
    p.add_argument("--ca-dir", help="issue a new node certificate from this directory's CA "
                                    "instead of making a new CA (rotation)")
    p.add_argument("--days", type=int, default=3650, help="certificate lifetime (default 3650)")
    p.add_argument("--force", action="store_true", help="replace keys already in DIR")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(ns.dir, security.NODE_KEY)) and not ns.force:
        raise common.CliError(f"{ns.dir} already holds keys (--force replaces them)", 2)
    try:
        security.keygen(ns.dir, days=ns.days, ca_dir=ns.ca_dir)
        security.load(ns.dir)
    except (OSError, security.SecurityError) as exc:
        raise common.CliError(str(exc)) from None
    print(f"keys written to {os.path.abspath(ns.dir)}; copy the directory to every host "
          f"(keep mode 0700/0600) and set [security] keys_dir to it")
    return 0
