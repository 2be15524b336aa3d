"""Object spilling throughput: Shoal and Ray 2.x doing the same thing.

    python benchmarks/spill_benchmark.py                  # both backends
    python benchmarks/spill_benchmark.py --backend shoal --object-mib 1 --total-mib 1536

One driver, a store of ``--store-mib`` (default 512 MiB), keeps
``--total-mib`` (default 3x the store) of live objects of ``--object-mib``
each:

* spill: ``put`` them all; MB/s over the whole loop. Once the store is full
  every put waits for older objects to be written to disk, so the rate is
  the spill rate (plus the copy into the store).
* restore: ``get`` them all back in put order (the oldest are on disk) and
  touch one byte of each; MB/s. The spill files were just written, so they
  are read from the page cache.

Each backend runs in its own process, one after the other; the output is
JSON. Both use their defaults otherwise (no fsync on spill files, as Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def run(backend: str, store_mib: int, total_mib: int, object_mib: float) -> dict:
    import numpy as np

    store = store_mib << 20
    size = int(object_mib * (1 << 20))
    n = int(total_mib * (1 << 20) // size)
    spill_dir = ""
    if backend == "ray":
        import ray

        spill_dir = tempfile.mkdtemp(prefix="spill-bench-ray-", dir="/tmp")
        ray.init(num_cpus=1, object_store_memory=store, include_dashboard=False,
                 _system_config={"object_spilling_config": json.dumps(
                     {"type": "filesystem", "params": {"directory_path": spill_dir}})})
    else:
        import libclient as ray

        ray.init(num_cpus=1, object_store_memory=store)
    arr = np.ones(size, dtype=np.uint8)
    ray.get(ray.put(arr))  # warm up
    refs = []
    start = time.perf_counter()
    for _ in range(n):
        refs.append(ray.put(arr))
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    for ref in refs:
        a = ray.get(ref)
        assert a[size // 2] == 1
        del a
    get_s = time.perf_counter() - start
    nbytes = n * size
    out = {"backend": backend, "store_mib": store_mib, "objects": n, "object_bytes": size,
           "total_mib": round(nbytes / (1 << 20)),
           "spill_MBps": round(nbytes / put_s / 1e6, 1),
           "restore_MBps": round(nbytes / get_s / 1e6, 1),
           "put_s": round(put_s, 3), "get_s": round(get_s, 3)}
    del refs
    ray.shutdown()
    if spill_dir:
        shutil.rmtree(spill_dir, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["shoal", "ray", "both"], default="both")
    p.add_argument("--store-mib", type=int, default=512)
    p.add_argument("--total-mib", type=int, default=0, help="default: 3x the store")
    p.add_argument("--object-mib", type=float, default=16)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args()
    total = ns.total_mib or 3 * ns.store_mib
    if ns.child:
        print(json.dumps(run(ns.backend, ns.store_mib, total, ns.object_mib)))
        return
    results = []
    for backend in (["shoal", "ray"] if ns.backend == "both" else [ns.backend]):
        cmd = [sys.executable, __file__, "--child", "--backend", backend, "--store-mib",
               str(ns.store_mib), "--total-mib", str(total), "--object-mib", str(ns.object_mib)]
        res = subprocess.run(cmd, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not lines:
            results.append({"backend": backend, "error": res.stderr[-2000:]})
        else:
            results.append(json.loads(lines[-1]))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
