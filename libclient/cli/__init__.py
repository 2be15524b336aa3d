"""``shoal``: the operator's command line.

    shoal start [--head | --address GCS] [--foreground] [--dir DIR]
    shoal stop [--dir DIR]
    shoal status [--json] [--address RAYLET_SOCKET|GCS_ADDRESS]
    shoal health [--json]
    shoal logs [PATH ...] [--daemon D] [--level L] [--node N] [--task T] [-f]
    shoal kv get|put|list ...
    shoal config [--json]
    shoal keygen DIR [--ca-dir CA_DIR]

Every command takes --config FILE (default $SHOAL_CONFIG or
/etc/shoal/shoal.toml) and --set SECTION.KEY=VALUE, like the daemons.
Exit status: 0 success, 1 failure (cluster unreachable, key not found, a
daemon not serving), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import sys

from libclient.cli import common, configcmd, health, keygen, kv, launch, logview, status

_COMMANDS = (launch, status, health, logview, kv, configcmd, keygen)


def build_parser() -> argparse.ArgumentParser:
    """The full ``shoal`` parser; each command module adds its own subcommands."""
    p = argparse.ArgumentParser(prog="shoal", description="Run and inspect a Shoal cluster.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``shoal`` console script."""
    ns = build_parser().parse_args(argv)
    try:
        code = ns.run(ns)
    except common.CliError as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `shoal logs | head`
        sys.stderr.close()
        code = 0
    sys.exit(code)
