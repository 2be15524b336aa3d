"""``shoal logs``: merge, filter and follow the JSON logs of this host's daemons.

Sources are files or directories of ``*.log`` files (the default is the
config's [log] destination, or ``<runtime_dir>/logs`` where ``shoal start``
puts them); ``-`` reads stdin, e.g. ``journalctl -o cat -u raylet | shoal logs -``.
Lines are merged by their ``ts`` (each file is already in time order), then
filtered. A line that is not a JSON object is kept as ``event: "unparsed"``
so nothing is silently lost.
"""

from __future__ import annotations

import argparse
import glob
import heapq
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from libclient.cli import common
from libclient.logs import LEVELS, REQUIRED_FIELDS

_RANK = {name: i for i, name in enumerate(LEVELS)}
_FOLLOW_POLL_S = 0.2


def add_parser(sub: Any) -> None:
    p = sub.add_parser("logs", help="merge and filter the daemons' JSON logs")
    common.add_config_flags(p)
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="log files or directories ('-' for stdin); default: this host's logs")
    p.add_argument("--daemon", action="append", help="only these daemons (repeatable)")
    p.add_argument("--level", choices=LEVELS, help="only this level and above")
    p.add_argument("--node", help="only this node id (a prefix is enough)")
    p.add_argument("--task", help="only lines about this task id (a prefix is enough)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--json", action="store_true", help="print the JSON lines unchanged")
    p.set_defaults(run=run)


def parse_line(line: str, source: str) -> dict[str, Any]:
    """A log line as a dict; a non-JSON line is wrapped, never dropped."""
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        return {"ts": "", "level": "info", "daemon": os.path.basename(source).split(".")[0],
                "node_id": "", "pid": None, "event": "unparsed", "line": line.rstrip("\n")}
    return event


class Filter:
    """The command's filters as one predicate."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.daemons = set(ns.daemon or [])
        self.min_rank = _RANK[ns.level] if ns.level else 0
        self.node = (ns.node or "").lower()
        self.task = (ns.task or "").lower()

    def __call__(self, e: dict[str, Any]) -> bool:
        if self.daemons and e.get("daemon") not in self.daemons:
            return False
        if _RANK.get(str(e.get("level")), 0) < self.min_rank:
            return False
        if self.node and not str(e.get("node_id", "")).startswith(self.node):
            return False
        return not self.task or str(e.get("task_id", "")).startswith(self.task)


def format_line(e: dict[str, Any]) -> str:
    """One line for a person: the required fields in columns, the rest as key=value."""
    rest = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                    for k, v in e.items() if k not in REQUIRED_FIELDS)
    node = str(e.get("node_id") or "-")[:8]
    return (f"{e.get('ts', '')} {str(e.get('level', '')).upper():<8} "
            f"{e.get('daemon', '')}[{e.get('pid', '')}] {node} {e.get('event', '')} {rest}"
            ).rstrip()


def find_files(paths: Iterable[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.log")))
        else:
            files.append(path)
    return files


def _read(f: IO[str], source: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    for n, line in enumerate(f):
        if line.strip():
            e = parse_line(line, source)
            yield str(e.get("ts") or e.get("timestamp") or ""), n, e


def default_paths(ns: argparse.Namespace) -> list[str]:
    conf = common.host_config(ns)
    dest = conf["log"]["destination"]
    paths = [os.path.join(conf["node"]["runtime_dir"], "logs")]
    if dest != "stderr":
        paths.insert(0, dest)
    return [p for p in dict.fromkeys(paths) if os.path.isdir(p)]


def run(ns: argparse.Namespace) -> int:
    paths = ns.paths or default_paths(ns)
    if not paths:
        raise common.CliError("no log files here: name files or directories, or pipe "
                              "journalctl -o cat into 'shoal logs -'")
    keep = Filter(ns)
    emit = (lambda e: json.dumps(e)) if ns.json else format_line
    if paths == ["-"]:
        for _ts, _n, e in _read(sys.stdin, "stdin"):
            if keep(e):
                print(emit(e), flush=True)
        return 0
    files = find_files(paths)
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise common.CliError(f"no such log file: {missing[0]}")
    handles = {path: open(path, encoding="utf-8", errors="replace") for path in files}
    try:
        for _ts, _n, e in heapq.merge(*(_read(f, p) for p, f in handles.items()),
                                      key=lambda item: item[0]):
            if keep(e):
                print(emit(e), flush=ns.follow)
        if ns.follow:
            _follow(handles, paths, keep, emit)
    finally:
        for f in handles.values():
            f.close()
    return 0


def _follow(handles: dict[str, IO[str]], paths: list[str], keep: Filter, emit: Any) -> None:
    """Print lines as they are appended; pick up new files; reopen rotated ones."""
    partial: dict[str, str] = {}
    while True:
        batch = []
        for path in find_files(paths):
            if path not in handles:
                try:
                    handles[path] = open(path, encoding="utf-8", errors="replace")
                except OSError:
                    continue
            f = handles[path]
            try:
                if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino or \
                        os.stat(path).st_size < f.tell():
                    f.close()  # rotated or truncated: start over on the new file
                    f = handles[path] = open(path, encoding="utf-8", errors="replace")
            except OSError:
                continue
            data = partial.pop(path, "") + f.read()
            lines = data.split("\n")
            if lines[-1]:
                partial[path] = lines[-1]  # an unfinished line waits for its end
            batch += [parse_line(line, path) for line in lines[:-1] if line.strip()]
        for e in sorted(batch, key=lambda e: str(e.get("ts") or e.get("timestamp") or "")):
            if keep(e):
                print(emit(e), flush=True)
        time.sleep(_FOLLOW_POLL_S)
