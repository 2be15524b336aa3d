"""Frees an owner's copies on other nodes' stores, off the I/O thread.

When an owner lets go of an object whose copies live on other nodes (a
remote task's big return, or arguments its tasks pulled there), it tells each
of those stores over their TCP transfer port: ``{t: free, r, oid}``, answered
``{t: freed, r}`` (see ``daemons/stored/transfer.py``). A store deletes a copy
nobody is reading; one being read stays cached and evictable. Best effort: a
store that cannot be reached has died, and its copies with it.

The I/O thread only queues; one daemon thread connects, sends and reads the
answers, with a timeout, so a dead peer never stalls the owner.
"""

from __future__ import annotations

import queue
import threading

from libclient import security
from libclient.protocol import FrameDecoder, pack

TIMEOUT_S = 2.0


class RemoteFreer:
    """Queue of (store address, object ids) to free there."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[str, list[bytes]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.sent = 0  # frees answered, for tests and stats

    def free(self, by_store: dict[str, list[bytes]]) -> None:
        for addr, oids in by_store.items():
            self._q.put((addr, list(oids)))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shoal-remote-free",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=TIMEOUT_S)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            addr, oids = item
            try:
                self.sent += _free_at(addr, oids)
            except (OSError, ValueError):
                pass  # that store is gone, and its copies with it


def _free_at(addr: str, oids: list[bytes]) -> int:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    with security.connect((host, int(port)), TIMEOUT_S, bulk=True) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.sendall(b"".join(pack({"t": "free", "r": i + 1, "oid": oid})
                              for i, oid in enumerate(oids)))
        dec = FrameDecoder()
        answered = 0
        while answered < len(oids):
            data = sock.recv(65536)
            if not data:
                break
            dec.feed(data)
            while dec.next() is not None:
                answered += 1
        return answered
