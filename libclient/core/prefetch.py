"""Pulls objects to this node ahead of need: ``wait(fetch_local=True)`` and
``get`` of several remote objects at once.

Each pull blocks its caller in stored until the copy is sealed, so the
prefetcher runs them on a few daemon threads, each with its own store
connection (stored shares one transfer among every request for an object
and admits pulls only as space allows). A failed prefetch is forgotten: the
later ``get`` pulls again and reports the error where the user sees it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

THREADS = 4
PULL_TIMEOUT_S = 30.0


class Prefetcher:
    """Background pulls of (object id, source store address), deduplicated."""

    def __init__(self, socket_path: str, pid: int) -> None:
        self._socket_path = socket_path
        self._pid = pid
        self._q: queue.SimpleQueue[tuple[bytes, str] | None] = queue.SimpleQueue()
        self._inflight: set[bytes] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._clients: list[Any] = []
        self._closed = False

    def prefetch(self, oid: bytes, source: str) -> None:
        with self._lock:
            if self._closed or oid in self._inflight:
                return
            self._inflight.add(oid)
            if len(self._threads) < min(THREADS, len(self._inflight)):
                t = threading.Thread(target=self._run, name="shoal-prefetch", daemon=True)
                self._threads.append(t)
                t.start()
        self._q.put((oid, source))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._q.put(None)
        for t in threads:
            t.join(timeout=2.0)

    def _run(self) -> None:
        from libclient.store_client import StoreClient

        client = None
        try:
            client = StoreClient(self._socket_path, name=f"prefetch-{self._pid}")
            while True:
                item = self._q.get()
                if item is None:
                    return
                oid, source = item
                try:
                    client.pull(oid, [source], PULL_TIMEOUT_S)
                except Exception:
                    pass  # the get that follows pulls again and raises
                finally:
                    with self._lock:
                        self._inflight.discard(oid)
        except (OSError, ConnectionError):
            return
        finally:
            if client is not None:
                client.close()
