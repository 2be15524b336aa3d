"""``stored``: the per-node shared-memory object store daemon.

    stored --socket /run/shoal/stored.sock [--memory BYTES] [--node-id HEX]
           [--config shoal.toml] [--ready-fd FD] [--prefault BYTES] [--log-level info]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import mmap
import os
import re
import sys
import threading
import time
import tomllib
from typing import Any

import psutil

from daemons import shell
from daemons.stored.server import StoreServer
from daemons.stored.store import ObjectTable
from libclient import logs

# Linux 5.14+: populate (allocate and map writable) a range without writing it.
# Python 3.11's mmap module does not export the constant.
MADV_POPULATE_WRITE = 23
DEFAULT_MEMORY_FRACTION = 0.30  # Ray's default object store share of RAM
_KNOWN = {"socket", "memory", "prefault", "node_id"}
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stored", description=__doc__.splitlines()[0])
    p.add_argument("--socket", help="Unix socket path to serve on")
    p.add_argument("--memory", help="arena size in bytes (K/M/G suffixes ok); "
                                    "default 30%% of RAM")
    p.add_argument("--node-id", help="hex node id, for log lines")
    p.add_argument("--config", help="TOML file; its [stored] table sets socket, memory, prefault")
    p.add_argument("--ready-fd", type=int, help="write one JSON line here once serving")
    p.add_argument("--prefault", help="pre-fault the first N bytes of the arena after start")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def parse_bytes(value: Any, what: str) -> int:
    """Accept an int or a string like ``"512M"``/``"2GiB"``; raise ConfigError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
        if m:
            return int(m.group(1)) * _UNITS[m.group(2)]
    raise shell.ConfigError(f"{what} must be a byte count like 1073741824 or '1G', got {value!r}")


def _settings(ns: argparse.Namespace) -> dict[str, Any]:
    conf = shell.load_config(ns.config, "stored")
    if ns.config:
        # Top-level keys are shared by every daemon; only our own table is checked.
        with open(ns.config, "rb") as f:
            own = tomllib.load(f).get("stored", {})
        unknown = set(own) - _KNOWN
        if unknown:
            raise shell.ConfigError(f"unknown [stored] config keys: {sorted(unknown)}")
    for key in _KNOWN:
        value = getattr(ns, key)
        if value is not None:
            conf[key] = value
    if not isinstance(conf.get("socket"), str) or not conf["socket"]:
        raise shell.ConfigError("stored needs --socket (flag or [stored] socket)")
    if conf.get("memory") is None:
        conf["memory"] = int(psutil.virtual_memory().total * DEFAULT_MEMORY_FRACTION)
    conf["memory"] = parse_bytes(conf["memory"], "memory")
    if conf["memory"] <= 0:
        raise shell.ConfigError(f"memory must be > 0, got {conf['memory']}")
    conf["prefault"] = parse_bytes(conf.get("prefault", 0), "prefault")
    if conf["prefault"] < 0:
        raise shell.ConfigError("prefault must be >= 0")
    node_id = conf.get("node_id") or ""
    if not isinstance(node_id, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2})*", node_id):
        raise shell.ConfigError(f"node-id must be hex, got {node_id!r}")
    conf["node_id"] = node_id.lower()
    return conf


def _prefault(mm: mmap.mmap, fd: int, nbytes: int, log: Any) -> None:
    """Fault in the arena's first pages so early objects skip the zero-fill cost.

    MADV_POPULATE_WRITE allocates the pages without writing them, so it is safe
    while clients already write objects. ctypes drops the GIL during the call,
    so the serving loop keeps running. Older kernels get posix_fallocate, which
    allocates the same shmem pages (also without touching their contents);
    writing to each page, the classic fallback, would race with clients.
    """
    start = time.monotonic()
    method = "madvise"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        anchor = ctypes.c_char.from_buffer(mm)
        addr = ctypes.addressof(anchor)
        del anchor  # release the buffer export; the mapping lives until exit
        chunk = 256 << 20
        for off in range(0, nbytes, chunk):
            if libc.madvise(addr + off, min(chunk, nbytes - off), MADV_POPULATE_WRITE) != 0:
                err = ctypes.get_errno()
                if err not in (errno.EINVAL, errno.ENOSYS):
                    raise OSError(err, os.strerror(err))
                method = "fallocate"
                os.posix_fallocate(fd, off, nbytes - off)
                break
    except OSError as exc:
        log.warning("prefault_failed", error=str(exc), method=method)
        return
    log.info("prefault_done", bytes=nbytes, method=method,
             seconds=round(time.monotonic() - start, 3))


def main(argv: list[str] | None = None) -> None:
    ns = _args(argv)
    log = logs.configure("stored", level=ns.log_level)
    try:
        conf = _settings(ns)
    except shell.ConfigError as exc:
        shell.fail(log, str(exc))
        return
    log = logs.configure("stored", node_id=conf["node_id"], level=ns.log_level)
    path = conf["socket"]
    capacity = conf["memory"]
    total_ram = psutil.virtual_memory().total
    if capacity > total_ram:
        log.warning("memory_exceeds_ram", memory=capacity, ram=total_ram)
    page = mmap.PAGESIZE
    arena_size = (capacity + page - 1) // page * page
    try:
        # An anonymous memfd, not /dev/shm: it needs no name, cannot collide, is
        # not capped by /dev/shm's size (Ray's SIGBUS reports), and the kernel
        # frees it when the last process holding it exits, even after SIGKILL.
        arena_fd = os.memfd_create("shoal-store", os.MFD_CLOEXEC)
        os.ftruncate(arena_fd, arena_size)
        arena = mmap.mmap(arena_fd, arena_size, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        shell.fail(log, f"cannot create a {arena_size}-byte arena: {exc}")
        return
    stop = shell.StopFlag()
    try:
        listen = shell.bind_unix(path)
    except (shell.ConfigError, OSError) as exc:
        shell.fail(log, f"cannot listen on {path}: {exc}")
        return
    ino = os.stat(path).st_ino
    table = ObjectTable(capacity, arena_size)
    server = StoreServer(listen, table, arena_fd, log)
    log.info("stored_started", socket=path, capacity=table.capacity, arena_size=arena_size,
             prefault=conf["prefault"])
    shell.notify_ready(ns.ready_fd, json.dumps({"socket": path, "capacity": table.capacity}))
    if conf["prefault"]:
        threading.Thread(target=_prefault, name="prefault", daemon=True,
                         args=(arena, arena_fd, min(conf["prefault"], arena_size), log)).start()
    try:
        server.run(stop)
    finally:
        server.close()
        try:
            if os.stat(path).st_ino == ino:  # never unlink a successor's socket
                os.unlink(path)
        except OSError:
            pass
        log.info("stored_stopped", stats=table.stats())
    sys.exit(0)


if __name__ == "__main__":
    main()
