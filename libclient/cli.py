"""``shoal``: the operator's command line (only ``status`` so far).

    shoal status [--address RAYLET_SOCKET]
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="shoal", description="Shoal cluster tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="print nodes and resources as JSON")
    st.add_argument("--address", default="auto",
                    help="raylet socket (default: $SHOAL_ADDRESS or /run/shoal/raylet.sock)")
    ns = p.parse_args(argv)
    import libclient

    try:
        libclient.init(address=ns.address)
    except (ConnectionError, OSError) as exc:
        print(f"error: cannot reach a raylet: {exc}", file=sys.stderr)
        sys.exit(1)
    try:
        print(json.dumps({"nodes": libclient.nodes(),
                          "cluster_resources": libclient.cluster_resources(),
                          "available_resources": libclient.available_resources()}, indent=2))
    finally:
        libclient.shutdown()


if __name__ == "__main__":
    main()
