"""Placement-group create/remove cycles per second, Shoal and Ray 2.60 side by side.

    python benchmarks/placement_group_benchmark.py                 # both backends
    python benchmarks/placement_group_benchmark.py --backend shoal --seconds 5

Cases, each backend in its own process on a fresh single-node cluster with
``--cpus`` CPUs, warmed up, counted for ``--seconds``, ``--trials`` times:

* ``ready_loop_per_s``: create a group of one bundle ``{"CPU": 1}``, wait
  until it is ready (``ray.get(pg.ready())``), remove it; loop.
* ``ray_perf_batch_per_s``: Ray's own microbenchmark case ("placement group
  create/removal", ray/_private/ray_perf.py): create 100 one-bundle groups of
  ``{"custom": 0.001}``, ``pg.wait()`` each, remove them; groups per second.
* ``--multinode``: the ready loop with a 2-bundle STRICT_SPREAD group on a
  2-node ``cluster_utils`` cluster.

Output: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any


def _backend(name: str) -> tuple[Any, Any, Any, Any]:
    if name == "ray":
        import ray
        from ray.cluster_utils import Cluster
        from ray.util.placement_group import placement_group, remove_placement_group
        return ray, Cluster, placement_group, remove_placement_group
    import libclient as ray
    from libclient.cluster_utils import Cluster
    from libclient.util.placement_group import placement_group, remove_placement_group
    return ray, Cluster, placement_group, remove_placement_group


def _cycles(ray: Any, create: Any, remove: Any, bundles: list, strategy: str,
            seconds: float) -> float:
    for _ in range(20):  # warm-up: workers started, functions exported
        pg = create(bundles, strategy=strategy)
        ray.get(pg.ready(), timeout=60)
        remove(pg)
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pg = create(bundles, strategy=strategy)
        ray.get(pg.ready(), timeout=60)
        remove(pg)
        n += 1
    return n / (time.perf_counter() - start)


def _batches(ray: Any, create: Any, remove: Any, seconds: float) -> float:
    """Ray's ray_perf case: 100 one-bundle groups of {"custom": 0.001}, ``wait`` on
    each, then remove them all; groups per second."""
    def batch() -> None:
        pgs = [create([{"custom": 0.001}]) for _ in range(100)]
        assert all(pg.wait(timeout_seconds=30) for pg in pgs)
        for pg in pgs:
            remove(pg)

    batch()  # warm-up
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch()
        n += 100
    return n / (time.perf_counter() - start)


def run_child(backend: str, cpus: int, seconds: float, trials: int,
              multinode: bool) -> dict[str, Any]:
    ray, Cluster, create, remove = _backend(backend)
    out: dict[str, Any] = {}
    if backend == "ray":
        ray.init(num_cpus=cpus, resources={"custom": 100}, include_dashboard=False)
    else:
        ray.init(num_cpus=cpus, resources={"custom": 100})
    try:
        out["ready_loop_per_s"] = [round(_cycles(ray, create, remove, [{"CPU": 1}], "PACK",
                                                 seconds), 1) for _ in range(trials)]
        out["ray_perf_batch_per_s"] = [round(_batches(ray, create, remove, seconds), 1)
                                       for _ in range(trials)]
    finally:
        ray.shutdown()
    if multinode:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            out["two_node_strict_spread_per_s"] = [
                round(_cycles(ray, create, remove, [{"CPU": 1}, {"CPU": 1}], "STRICT_SPREAD",
                              seconds), 1) for _ in range(trials)]
            ray.shutdown()
        finally:
            cluster.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["shoal", "ray", "both"], default="both")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--multinode", action="store_true", help="also a 2-node STRICT_SPREAD case")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args.backend, args.cpus, args.seconds, args.trials,
                                   args.multinode)))
        return
    backends = ["shoal", "ray"] if args.backend == "both" else [args.backend]
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpus": args.cpus,
                              "seconds": args.seconds}
    for b in backends:
        cmd = [sys.executable, __file__, "--child", "--backend", b, "--cpus", str(args.cpus),
               "--seconds", str(args.seconds), "--trials", str(args.trials)]
        if args.multinode:
            cmd.append("--multinode")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            result[b] = {"error": proc.stderr[-2000:]}
            continue
        result[b] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
