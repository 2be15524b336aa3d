"""``stored``: the per-node shared-memory object store daemon.

    stored [--config /etc/shoal/shoal.toml] [--socket PATH] [--memory BYTES] [--node-id HEX]
           [--prefault BYTES] [--transfer-address HOST:PORT] [--transfer-timeout SECONDS]
           [--set SECTION.KEY=VALUE] [--log-level info]
           [--log-destination stderr|DIR] [--ready-fd FD]

Settings come from the host config (docs/operations.md); flags win. The
ready line is JSON: ``{"socket", "capacity", "transfer_address"}``, the last
being the ``host:port`` other stores pull from (the bound port when the
config asks for port 0, and ``[node] address`` when it binds a wildcard).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import mmap
import os
import selectors
import socket
import sys
import threading
import time
from typing import Any

import psutil

from daemons import sdnotify, shell
from daemons.stored.peers import TransferShell
from daemons.stored.pull import PullManager
from daemons.stored.server import StoreServer
from daemons.stored.spill import FUSE_BYTES, SpillPolicy
from daemons.stored.spill_io import SpillFiles
from daemons.stored.store import ObjectTable

# Linux 5.14+: populate (allocate and map writable) a range without writing it.
# Python 3.11's mmap module does not export the constant.
MADV_POPULATE_WRITE = 23
DEFAULT_MEMORY_FRACTION = 0.30  # Ray's default object store share of RAM


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stored", description=__doc__.splitlines()[0])
    p.add_argument("--socket", help="Unix socket path to serve on ([stored] socket)")
    p.add_argument("--memory", help="arena size in bytes (K/M/G suffixes ok); "
                                    "default 30%% of RAM ([stored] memory)")
    p.add_argument("--node-id", help="hex node id, for log lines ([node] id)")
    p.add_argument("--prefault", help="pre-fault the first N bytes of the arena after start")
    p.add_argument("--transfer-address", metavar="HOST:PORT",
                   help="TCP address other stores pull objects from; port 0 picks a free "
                        "one ([stored] transfer_address, default 127.0.0.1:0)")
    p.add_argument("--transfer-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="drop a transfer peer silent this long (default 10)")
    shell.add_config_flags(p)
    return p.parse_args(argv)


def _settings(ns: argparse.Namespace) -> shell.HostConfig:
    """The host config with our flags on top; fills in the default capacity."""
    conf = shell.resolve_config(ns, {"stored.socket": ns.socket, "stored.memory": ns.memory,
                                     "node.id": ns.node_id, "stored.prefault": ns.prefault,
                                     "stored.transfer_address": ns.transfer_address})
    if not ns.transfer_timeout > 0:
        raise shell.ConfigError(f"--transfer-timeout must be > 0, got {ns.transfer_timeout}")
    if conf["stored"]["memory"] is None:
        conf["stored"]["memory"] = int(psutil.virtual_memory().total * DEFAULT_MEMORY_FRACTION)
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


def _bind_transfer(address: str, node_address: str) -> tuple[socket.socket, str]:
    """Listen for other stores on ``address``; return the socket and how to reach it.

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    if ipaddress.ip_address(bound_host).is_unspecified:
        bound_host = node_address  # a wildcard is no address for another host
    reach = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    return sock, reach


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``stored`` console script; exits 0 on SIGTERM, 2 on bad setup."""
    ns = _args(argv)
    log = shell.start_logging("stored", ns)
    try:
        conf = _settings(ns)
        log = shell.configured_logging("stored", conf["node"]["id"], conf)
        shell.check_socket_dir(conf["stored"]["socket"])
        shell.use_keys(conf["security"], log)
    except shell.ConfigError as exc:
        shell.fail(log, str(exc))
        return
    path = conf["stored"]["socket"]
    capacity = conf["stored"]["memory"]
    prefault = conf["stored"]["prefault"]
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
    try:
        tlisten, transfer_address = _bind_transfer(
            conf["stored"]["transfer_address"] or f"{conf['node']['address']}:0",
            conf["node"]["address"])
    except (OSError, ValueError) as exc:
        listen.close()
        os.unlink(path)
        shell.fail(log, f"cannot listen for transfers on "
                        f"{conf['stored']['transfer_address']}: {exc}")
        return
    spill_files = None
    policy = None
    if conf["stored"]["spill"]:
        try:
            spill_files = SpillFiles(conf["stored"]["spill_dir"], arena, log)
        except OSError as exc:
            listen.close()
            tlisten.close()
            os.unlink(path)
            shell.fail(log, f"cannot read spill directory {conf['stored']['spill_dir']}: "
                            f"{exc} (set [stored] spill_dir, or spill = false)")
            return
        # Fuse up to 64 MiB per file, less in a small store so one spill
        # does not empty most of it.
        policy = SpillPolicy(fuse_bytes=max(1 << 20, min(FUSE_BYTES, capacity // 8)))
    table = ObjectTable(capacity, arena_size, spill=policy)

    def transfer(sel: selectors.BaseSelector, deliver: Any) -> TransferShell:
        pulls = PullManager(table.capacity, stall_timeout=ns.transfer_timeout)
        return TransferShell(tlisten, transfer_address, table, arena, sel, log, deliver, pulls,
                             timeout=ns.transfer_timeout,
                             spill_read=spill_files.read_range if spill_files else None)

    server = StoreServer(listen, table, arena_fd, log, node_id=conf["node"]["id"],
                         transfer=transfer, spill=spill_files)
    interval = sdnotify.watchdog_interval()
    if interval is not None:  # the idle loop must turn often enough to feed the watchdog
        server.max_wait_s = min(server.max_wait_s, interval / 2)
    log.info("stored_started", security=shell.security_summary(), socket=path, capacity=table.capacity, arena_size=arena_size,
             prefault=prefault, transfer_address=transfer_address, config=conf.path,
             spill_dir=conf["stored"]["spill_dir"] if spill_files else None)
    shell.notify_ready(ns.ready_fd, json.dumps({"socket": path, "capacity": table.capacity,
                                                "transfer_address": transfer_address}))
    watchdog = sdnotify.start_watchdog(lambda: server.last_loop, log)
    if prefault:
        threading.Thread(target=_prefault, name="prefault", daemon=True,
                         args=(arena, arena_fd, min(prefault, arena_size), log)).start()
    try:
        shell.tune_gc()
        server.run(stop)
    finally:
        sdnotify.notify_stopping()
        if watchdog is not None:
            watchdog.stop()
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
