"""``shoal config``: print the resolved host config, or just check it (exit 2 if bad)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from libclient import hostconfig
from libclient.cli import common


def add_parser(sub: Any) -> None:
    p = sub.add_parser("config", help="print the resolved host config (file, env, flags)")
    common.add_config_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--check", action="store_true", help="print nothing; exit 2 if invalid")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    conf = common.host_config(ns)
    if ns.check:
        return 0
    if ns.json:
        print(json.dumps({"path": conf.path, **conf.values}, indent=2))
    else:
        print(f"# from {conf.path or 'defaults (no config file)'}, environment and flags")
        print(hostconfig.render(conf))
    return 0
