"""Multi-node cases of issue 9, Shoal and Ray 2.60 side by side, both through ``cluster_utils``.

    python benchmarks/multinode_benchmark.py                  # both backends
    python benchmarks/multinode_benchmark.py --backend shoal  # one only
    python benchmarks/multinode_benchmark.py --cases "tiny,actor"

The cluster is a head (0 CPUs: the driver's node) and two worker nodes with
one CPU each, all on this machine and connected over loopback TCP; the
spillback case adds a CPU to the head so three 1-CPU nodes share 600 tasks.
Each backend runs in its own process, one after the other; the output is
JSON with rates per case and the Shoal/Ray ratio where both ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

CASES = [
    "driver get of a 1 GiB array made on another node",
    "a 100 MB put read by a task on another node",
    "tiny tasks pinned to another node, async",
    "sync calls to an actor on another node",
    "async calls to an actor on another node",
    "spillback: 600 x 10 ms tasks on three 1-CPU nodes, ideal/elapsed",
]


def _backend(name: str) -> tuple[Any, Any, Any]:
    if name == "ray":
        import ray
        from ray.cluster_utils import Cluster
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        return ray, Cluster, NodeAffinitySchedulingStrategy
    import functools

    import libclient as ray
    from libclient.cluster_utils import Cluster
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    # "shoal-insecure": the same cluster without keys (plain TCP, no CURVE).
    # "shoal-bulk-plain": keys, with [security] encrypt_bulk = false.
    if name == "shoal-bulk-plain":
        from libclient import security
        os.environ[security.ENCRYPT_BULK_ENV] = "0"
    return (ray, functools.partial(Cluster, secure=name != "shoal-insecure"),
            NodeAffinitySchedulingStrategy)


def _rate(fn: Any, n: int, duration: float) -> float:
    """Calls of ``fn`` (each doing n units) per second over about ``duration`` s."""
    fn()  # warm
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        fn()
        done += n
    return done / (time.perf_counter() - start)


def run_child(backend: str, cases: list[str], duration: float) -> dict[str, float]:
    import numpy as np

    ray, Cluster, Affinity = _backend(backend)
    out: dict[str, float] = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
                                                           "object_store_memory": 3 << 30})
    try:
        remote = [cluster.add_node(num_cpus=1, object_store_memory=3 << 30) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        there = Affinity(node_id=remote[0].node_id, soft=False)

        @ray.remote(num_cpus=1)
        def make(nbytes):
            return np.ones(nbytes // 8, dtype=np.float64)

        @ray.remote(num_cpus=1)
        def nbytes(a):
            return a.nbytes

        @ray.remote(num_cpus=1)
        def tiny():
            return b"ok"

        @ray.remote(num_cpus=0)
        class Echo:
            def ping(self):
                return 1

        for case in cases:
            if case.startswith("driver get"):
                size = 1 << 30
                ray.get(make.options(scheduling_strategy=there).remote(1 << 20))

                def one(size=size):
                    ref = make.options(scheduling_strategy=there).remote(size)
                    ray.wait([ref], fetch_local=False)
                    t = time.perf_counter()
                    arr = ray.get(ref)
                    dt = time.perf_counter() - t
                    assert arr.nbytes == size
                    return dt

                times = [one() for _ in range(3)]
                out[case] = size / min(times) / 1e9  # GB/s
            elif case.startswith("a 100 MB put"):
                size = 100 * 1000 * 1000

                def one(size=size):
                    ref = ray.put(np.ones(size // 8, dtype=np.float64))
                    t = time.perf_counter()
                    assert ray.get(nbytes.options(scheduling_strategy=there).remote(ref)) == size
                    return time.perf_counter() - t

                one()
                times = [one() for _ in range(5)]
                out[case] = size / min(times) / 1e9
            elif case.startswith("tiny tasks"):
                def batch():
                    ray.get([tiny.options(scheduling_strategy=there).remote()
                             for _ in range(1000)])
                out[case] = _rate(batch, 1000, duration)
            elif case.startswith("sync calls"):
                a = Echo.options(scheduling_strategy=there).remote()
                ray.get(a.ping.remote())
                out[case] = _rate(lambda a=a: ray.get(a.ping.remote()), 1, duration)
                ray.kill(a)
            elif case.startswith("async calls"):
                a = Echo.options(scheduling_strategy=there).remote()
                ray.get(a.ping.remote())
                out[case] = _rate(lambda a=a: ray.get([a.ping.remote() for _ in range(1000)]),
                                  1000, duration)
                ray.kill(a)
            elif case.startswith("spillback"):
                extra = cluster.add_node(num_cpus=1, object_store_memory=1 << 30)
                cluster.wait_for_nodes()

                @ray.remote(num_cpus=1)
                def work():
                    time.sleep(0.01)

                ray.get([work.remote() for _ in range(30)])  # warm every node's pool
                t = time.perf_counter()
                ray.get([work.remote() for _ in range(600)])
                elapsed = time.perf_counter() - t
                out[case] = (600 * 0.01 / 3) / elapsed
                cluster.remove_node(extra)
            print(json.dumps({"case": case, "value": out[case]}), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["shoal", "shoal-insecure", "shoal-bulk-plain", "ray",
                                         "both", "all"],
                   default="both", help="all: shoal (keys), shoal-insecure and ray; "
                   "shoal-bulk-plain: keys with encrypt_bulk = false")
    p.add_argument("--cases", help="comma-separated substrings of case names (e.g. 'tiny,sync')")
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case-ids", help=argparse.SUPPRESS)
    ns = p.parse_args()
    cases = CASES
    if ns.case_ids:
        cases = [CASES[int(i)] for i in ns.case_ids.split(",")]
    elif ns.cases:
        wanted = [w.strip() for w in ns.cases.split(",")]
        cases = [c for c in CASES if any(w in c for w in wanted)]
    if ns.child:
        print(json.dumps(run_child(ns.backend, cases, ns.duration)))
        return
    backends = {"both": ["shoal", "ray"], "all": ["shoal", "shoal-insecure", "ray"]}.get(
        ns.backend, [ns.backend])
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cases": cases}
    for backend in backends:
        proc = subprocess.run([sys.executable, __file__, "--child", "--backend", backend,
                               "--duration", str(ns.duration), "--case-ids",
                               ",".join(str(CASES.index(c)) for c in cases)],
                              capture_output=True, text=True,
                              env={**os.environ, "RAY_DEDUP_LOGS": "0"})
        if proc.returncode != 0:
            results[backend] = {"error": proc.stderr[-3000:]}
            continue
        results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "shoal" in results and "ray" in results and "error" not in results["ray"]:
        results["ratio"] = {c: results["shoal"].get(c, 0) / results["ray"][c]
                            for c in results["ray"] if results["ray"].get(c)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
