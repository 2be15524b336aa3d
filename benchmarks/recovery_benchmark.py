"""Lineage reconstruction of a lost 100 MB object, Shoal and Ray 2.60 side by side.

    python benchmarks/recovery_benchmark.py                  # both backends
    python benchmarks/recovery_benchmark.py --backend shoal

Each backend, in its own process, through its own ``cluster_utils``: a head
(0 CPUs, the driver's node) and two worker nodes with a custom resource. A
task makes a 100 MB array on one of them; we time that (compute plus the
driver's wait). The node is then killed (SIGKILL of all its processes) and
the driver's ``get`` of the object is timed: the owner finds every copy gone,
runs the task again on the other node and pulls the result. The output is
JSON: seconds for the original run and for the rebuilt get, per trial.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

SIZE = 100 * 1000 * 1000


def _backend(name: str) -> tuple[Any, Any]:
    if name == "ray":
        import ray
        from ray.cluster_utils import Cluster
        return ray, Cluster
    import libclient as ray
    from libclient.cluster_utils import Cluster
    return ray, Cluster


def run_child(backend: str, trials: int) -> dict[str, Any]:
    import numpy as np

    ray, Cluster = _backend(backend)
    out: dict[str, Any] = {"original_s": [], "rebuilt_get_s": []}
    for _ in range(trials):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            first = cluster.add_node(num_cpus=1, resources={"w": 1},
                                     object_store_memory=512 << 20)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)

            @ray.remote(resources={"w": 1}, max_retries=3)
            def make():
                a = np.empty(SIZE // 8, dtype=np.float64)
                a[:] = np.arange(SIZE // 8, dtype=np.float64)  # some real compute
                return a

            t = time.perf_counter()
            ref = make.remote()
            ray.wait([ref], fetch_local=False)
            out["original_s"].append(time.perf_counter() - t)
            cluster.add_node(num_cpus=1, resources={"w": 1}, object_store_memory=512 << 20)
            cluster.wait_for_nodes()
            cluster.remove_node(first, allow_graceful=False)
            t = time.perf_counter()
            arr = ray.get(ref, timeout=120)
            out["rebuilt_get_s"].append(time.perf_counter() - t)
            assert arr.nbytes == SIZE and arr[-1] == SIZE // 8 - 1
            del arr, ref
        finally:
            ray.shutdown()
            cluster.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["shoal", "ray", "both"], default="both")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args.backend, args.trials)))
        return
    backends = ["shoal", "ray"] if args.backend == "both" else [args.backend]
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "size_bytes": SIZE}
    for b in backends:
        proc = subprocess.run([sys.executable, __file__, "--child", "--backend", b,
                               "--trials", str(args.trials)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            result[b] = {"error": proc.stderr[-2000:]}
            continue
        result[b] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
