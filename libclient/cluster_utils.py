"""Several Shoal nodes on one machine, behind the interface of Ray's ``cluster_utils``.

Each node is a real node: its own launcher process, stored, raylet, worker
pool, runtime directory and ports. The head also runs the cluster's gcsd;
the others join it by its TCP address. Nodes never share a Unix socket, an
arena or a file: everything between them goes over TCP, as between hosts,
so tests and benchmarks written for Ray's ``Cluster`` run unchanged and
exercise the real multi-host paths.

``remove_node(node, allow_graceful=False)`` is a host dying: every process
of that node, its workers included, gets SIGKILL at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from typing import Any

import psutil

from libclient import security
from libclient.cluster import EmbeddedCluster, runtime_base

# Test clusters put several nodes on one machine: a small default store each
# (Ray's cluster_utils does the same) instead of 30% of RAM per node.
_DEFAULT_NODE_ARGS = {"num_cpus": 1, "object_store_memory": 512 * 1024 * 1024}


class Node:
    """One node of a :class:`Cluster`: the processes behind it and its ids."""

    def __init__(self, launcher: EmbeddedCluster, head: bool, args: dict[str, Any]) -> None:
        self._launcher = launcher
        self.head = head
        self.node_args = args
        self.node_id: str = launcher.node_id  # hex, as get_runtime_context().get_node_id()
        self.unique_id = self.node_id
        self.raylet_socket_name = launcher.raylet_socket
        self.session_dir = launcher.session_dir
        self.address = launcher.gcs_address

    @property
    def pids(self) -> list[int]:
        """The node's daemons (gcsd on the head, stored, raylet)."""
        return list(self._launcher.pids)

    def daemon_pid(self, name: str) -> int:
        """The pid of this node's ``gcsd``, ``stored`` or ``raylet`` as started
        (fault tests kill one by pid)."""
        return self._launcher.daemon_pids[name]

    def all_processes(self) -> list[psutil.Process]:
        """Launcher, daemons and workers: everything that would die with the host."""
        try:
            root = psutil.Process(self._launcher.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_all_processes(self) -> None:
        """SIGKILL every process of the node at once (a host losing power)."""
        procs = self.all_processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self._launcher.proc.wait()

    def stop(self) -> None:
        self._launcher.stop()

    def __repr__(self) -> str:
        return f"Node({'head' if self.head else 'worker'}, {self.node_id})"


class Cluster:
    """A Shoal cluster of nodes on this machine (Ray's ``cluster_utils.Cluster``).

    Args:
        initialize_head: start the head node now, with ``head_node_args``.
        connect: also ``init()`` this process against the cluster.
        head_node_args: node arguments for the head (``num_cpus``, ``num_gpus``,
            ``resources``, ``object_store_memory``; Shoal also takes
            ``node_timeout_s``, how long gcsd waits before declaring a silent
            node dead, default 10).
        gcs_address: Shoal only: a gcsd deployment that is already running
            (one member's ``tcp://`` address, or several comma-separated).
            Every node joins it and the head starts no gcsd of its own, so a
            test can run gcsd as a chain, or kill and restart it.
        secure: Shoal only: False runs the nodes without keys (plain TCP,
            no CURVE), to measure what security costs.
    """

    def __init__(self, initialize_head: bool = False, connect: bool = False,
                 head_node_args: dict[str, Any] | None = None,
                 gcs_address: str | None = None, secure: bool = True,
                 **_ignored: Any) -> None:
        self.external_gcs = gcs_address
        # One key for every node of the test cluster, and for this process
        # (the driver, and the GcsClients that watch the nodes join). A gcsd
        # started elsewhere has the keys of this process's environment, if any.
        self._saved_keys_env = os.environ.get(security.KEYS_ENV)
        self.keys_dir = ""
        if gcs_address is None and secure:
            self.keys_dir = security.keygen(os.path.join(
                tempfile.mkdtemp(prefix="keys-", dir=runtime_base()), "keys"))
            os.environ[security.KEYS_ENV] = self.keys_dir
            security.reset()
        self.head_node: Node | None = None
        self.worker_nodes: set[Node] = set()
        self.connected = False
        # Every node's runtime directory, removed ones too: a node killed with
        # SIGKILL (a host losing power) leaves its sockets and logs behind,
        # and the test that killed it may still read those logs.
        self._session_dirs: list[str] = []
        if initialize_head:
            self.add_node(**(head_node_args or {}))
            if connect:
                self.connect()
        elif connect:
            raise ValueError("connect=True needs initialize_head=True")

    @property
    def address(self) -> str:
        """The gcsd address (``host:port``) that ``init(address=...)`` takes."""
        if self.head_node is None:
            raise RuntimeError("the cluster has no head node yet")
        # init() takes one member; the client learns the others from it.
        return _strip_scheme(self.head_node.address.split(",")[0].strip())

    @property
    def gcs_address(self) -> str:
        return self.address

    def add_node(self, wait: bool = True, **node_args: Any) -> Node:
        """Start a node: the head first (it runs gcsd), then workers that join it."""
        args = {**_DEFAULT_NODE_ARGS, **node_args}
        unknown = set(args) - {"num_cpus", "num_gpus", "resources", "object_store_memory",
                               "node_ip_address", "node_timeout_s"}
        if unknown:
            raise ValueError(f"unsupported node arguments: {sorted(unknown)}")
        head = self.head_node is None
        launcher = EmbeddedCluster(
            num_cpus=args.get("num_cpus"), num_gpus=args.get("num_gpus"),
            resources=args.get("resources"),
            object_store_memory=args.get("object_store_memory"),
            gcs_address=self.external_gcs or (
                None if head else self.head_node.address),  # type: ignore[union-attr]
            head=head, node_ip=args.get("node_ip_address") or "127.0.0.1",
            node_timeout_s=args.get("node_timeout_s") if head else None,
            keys_dir=self.keys_dir or self._saved_keys_env or "none")
        node = Node(launcher, head, args)
        self._session_dirs.append(node.session_dir)
        if head:
            self.head_node = node
        else:
            self.worker_nodes.add(node)
        if wait:
            self._wait_for_node(node, 30.0)
        return node

    def remove_node(self, node: Node, allow_graceful: bool = True) -> None:
        """Stop a node; ``allow_graceful=False`` kills all its processes with SIGKILL."""
        if allow_graceful:
            node.stop()
        else:
            node.kill_all_processes()
        if node is self.head_node:
            self.head_node = None
        else:
            self.worker_nodes.discard(node)

    def list_all_nodes(self) -> list[Node]:
        return ([self.head_node] if self.head_node else []) + sorted(
            self.worker_nodes, key=lambda n: n.node_id)

    def wait_for_nodes(self, timeout: float = 30) -> None:
        """Wait until gcsd lists every node of this cluster as alive."""
        deadline = time.monotonic() + timeout
        for node in self.list_all_nodes():
            self._wait_for_node(node, max(0.1, deadline - time.monotonic()))

    def _wait_for_node(self, node: Node, timeout: float) -> None:
        from libclient.gcs_client import GcsClient

        deadline = time.monotonic() + timeout
        with GcsClient(self.head_node.address, timeout=timeout) as gcs:  # type: ignore[union-attr]
            while True:
                alive = {n["node_id"].hex() for n in gcs.get_nodes() if n.get("state") == "ALIVE"}
                if node.node_id in alive:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {node.node_id} did not join within {timeout} s")
                time.sleep(0.05)

    def connect(self, namespace: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """``init()`` this process as a driver on the head node."""
        import libclient

        info = libclient.init(address=self.address, namespace=namespace, **kwargs)
        self.connected = True
        return info

    def shutdown(self) -> None:
        """Disconnect the driver (if connected), then stop every node, workers first."""
        if self.connected:
            import libclient

            libclient.shutdown()
            self.connected = False
        for node in sorted(self.worker_nodes, key=lambda n: n.node_id):
            node.stop()
        self.worker_nodes.clear()
        if self.head_node is not None:
            self.head_node.stop()
            self.head_node = None
        for path in self._session_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._session_dirs.clear()
        self._forget_keys()

    def _forget_keys(self) -> None:
        if self.keys_dir and os.environ.get(security.KEYS_ENV) == self.keys_dir:
            if self._saved_keys_env is None:
                os.environ.pop(security.KEYS_ENV, None)
            else:
                os.environ[security.KEYS_ENV] = self._saved_keys_env
            security.reset()
        if self.keys_dir:
            shutil.rmtree(os.path.dirname(self.keys_dir), ignore_errors=True)
            self.keys_dir = ""

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _strip_scheme(address: str) -> str:
    return address[len("tcp://"):] if address.startswith("tcp://") else address
