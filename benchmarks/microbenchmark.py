"""Shoal's microbenchmark, case for case after `ray microbenchmark` (ray_perf.py).

    python benchmarks/microbenchmark.py                 # Shoal, and Ray if importable
    python benchmarks/microbenchmark.py --backend shoal # one backend only
    python benchmarks/microbenchmark.py --cases "tasks sync,put calls"

Each backend runs in its own process, one after the other, on the same
machine in the same run; the output is JSON with per-second rates and, when
Ray ran too, the ratio Shoal/Ray for every case.

Deviation from ray_perf: "multi client tasks async" uses 4 zero-CPU *tasks*
as the submitting clients on both backends (ray_perf uses actors), so both
sides run the identical workload. The actor cases follow ray_perf's shapes
with n reduced (1:n and n:n use 2,000 calls per client instead of 5,000) so
one case fits the timing window on 2 cores.
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
    "single client get calls",
    "single client put calls",
    "multi client put calls",
    "single client put gigabytes",
    "single client get 800 MB array",
    "single client tasks and get batch",
    "single client get object containing 10k refs",
    "single client wait 1k refs",
    "single client tasks sync",
    "single client tasks async",
    "multi client tasks async",
    "1:1 actor calls sync",
    "1:1 actor calls async",
    "1:1 actor calls concurrent",
    "1:n actor calls async",
    "n:n actor calls async",
    "n:n actor calls with arg async",
    "1:1 async-actor calls sync",
    "1:1 async-actor calls async",
    "1:1 async-actor calls with args async",
]


def _timeit(fn: Any, multiplier: float, warmup_s: float, run_s: float, trials: int) -> dict:
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        fn()
    rates = []
    for _ in range(trials):
        count = 0
        start = time.perf_counter()
        while True:
            fn()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= run_s:
                break
        rates.append(count * multiplier / elapsed)
    mean = sum(rates) / len(rates)
    std = (sum((r - mean) ** 2 for r in rates) / len(rates)) ** 0.5
    return {"rate": mean, "std": std}


def run_backend(backend: str, cases: list[str], warmup_s: float, run_s: float,
                trials: int) -> dict[str, dict]:
    import numpy as np

    if backend == "ray":
        import ray
    else:
        import libclient as ray
    ray.init(num_cpus=os.cpu_count(), object_store_memory=4 << 30)

    @ray.remote
    def small_value():
        return b"ok"

    @ray.remote(num_cpus=0)
    def do_put_small():
        for _ in range(100):
            ray.put(0)

    @ray.remote
    def create_object_containing_ref():
        return [ray.put(1) for _ in range(10000)]

    @ray.remote(num_cpus=0)
    def client_batch(n):
        ray.get([small_value.remote() for _ in range(n)])

    results: dict[str, dict] = {}

    def case(name: str, fn: Any, multiplier: float = 1.0) -> None:
        if name not in cases:
            return
        results[name] = _timeit(fn, multiplier, warmup_s, run_s, trials)
        print(f"  [{backend}] {name}: {results[name]['rate']:.2f}/s", file=sys.stderr, flush=True)

    value = ray.put(0)
    case("single client get calls", lambda: ray.get(value))
    case("single client put calls", lambda: ray.put(0))
    case("multi client put calls",
         lambda: ray.get([do_put_small.remote() for _ in range(10)]), 1000)
    if "single client put gigabytes" in cases or "single client get 800 MB array" in cases:
        arr = np.zeros(100 * 1024 * 1024, dtype=np.int64)
        case("single client put gigabytes", lambda: ray.put(arr), 8 * 0.1)
        big = ray.put(arr)
        case("single client get 800 MB array", lambda: ray.get(big))
        del big, arr
    case("single client tasks and get batch",
         lambda: ray.get([small_value.remote() for _ in range(1000)]))
    if "single client get object containing 10k refs" in cases:
        obj = create_object_containing_ref.remote()
        ray.get(obj)
        case("single client get object containing 10k refs", lambda: ray.get(obj))
        del obj

    def wait_1k() -> None:
        not_ready = [small_value.remote() for _ in range(1000)]
        for _ in range(1000):
            _ready, not_ready = ray.wait(not_ready)

    case("single client wait 1k refs", wait_1k)
    case("single client tasks sync", lambda: ray.get(small_value.remote()))
    case("single client tasks async",
         lambda: ray.get([small_value.remote() for _ in range(1000)]), 1000)
    n, m = 2500, 4
    case("multi client tasks async",
         lambda: ray.get([client_batch.remote(n) for _ in range(m)]), n * m)
    if any("actor" in c for c in cases):
        _actor_cases(ray, case)
    ray.shutdown()
    return results


def _actor_cases(ray: Any, case: Any) -> None:
    @ray.remote
    class Actor:
        def small_value(self):
            return b"ok"

        def small_value_arg(self, x):
            return b"ok"

    @ray.remote
    class AsyncActor:
        async def small_value(self):
            return b"ok"

        async def small_value_with_arg(self, x):
            return b"ok"

    @ray.remote(num_cpus=0)
    class Client:
        def __init__(self, servers):
            self.servers = servers if isinstance(servers, list) else [servers]

        def small_value_batch(self, n):
            results = []
            for s in self.servers:
                results.extend([s.small_value.remote() for _ in range(n)])
            ray.get(results)

        def small_value_batch_arg(self, n):
            x = ray.put(0)
            results = []
            for s in self.servers:
                results.extend([s.small_value_arg.remote(x) for _ in range(n)])
            ray.get(results)

    n_cpu = max(1, (os.cpu_count() or 2) // 2)
    a = Actor.remote()
    ray.get(a.small_value.remote())
    case("1:1 actor calls sync", lambda: ray.get(a.small_value.remote()))
    case("1:1 actor calls async", lambda: ray.get([a.small_value.remote() for _ in range(1000)]),
         1000)
    c = Actor.options(max_concurrency=16).remote()
    ray.get(c.small_value.remote())
    case("1:1 actor calls concurrent",
         lambda: ray.get([c.small_value.remote() for _ in range(1000)]), 1000)
    n = 2000
    servers = [Actor.remote() for _ in range(n_cpu)]
    client = Client.remote(servers)
    ray.get(client.small_value_batch.remote(1))
    case("1:n actor calls async", lambda: ray.get(client.small_value_batch.remote(n)),
         n * len(servers))

    @ray.remote
    def work(actors):
        ray.get([actors[i % len(actors)].small_value.remote() for i in range(n)])

    m = 4
    case("n:n actor calls async", lambda: ray.get([work.remote(servers) for _ in range(m)]),
         m * n)
    clients = [Client.remote(s) for s in servers]
    ray.get([cl.small_value_batch_arg.remote(1) for cl in clients])
    case("n:n actor calls with arg async",
         lambda: ray.get([cl.small_value_batch_arg.remote(1000) for cl in clients]),
         1000 * len(clients))
    aa = AsyncActor.remote()
    ray.get(aa.small_value.remote())
    case("1:1 async-actor calls sync", lambda: ray.get(aa.small_value.remote()))
    case("1:1 async-actor calls async",
         lambda: ray.get([aa.small_value.remote() for _ in range(1000)]), 1000)
    case("1:1 async-actor calls with args async",
         lambda: ray.get([aa.small_value_with_arg.remote(i) for i in range(1000)]), 1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["shoal", "ray", "both"], default="both")
    p.add_argument("--cases", help="comma-separated subset of case names (substring match)")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=1.5)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args()
    cases = CASES
    if ns.cases:
        wanted = [c.strip() for c in ns.cases.split(",")]
        cases = [c for c in CASES if any(w in c for w in wanted)]
    if ns.child:
        out = run_backend(ns.backend, cases, ns.warmup, ns.duration, ns.trials)
        print(json.dumps(out))
        return
    backends = ["shoal", "ray"] if ns.backend == "both" else [ns.backend]
    if "ray" in backends:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("ray is not importable; running Shoal only", file=sys.stderr)
            backends.remove("ray")
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "cpus": os.cpu_count(), "results": {}}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for backend in backends:
        argv = [sys.executable, os.path.abspath(__file__), "--child", "--backend", backend,
                "--warmup", str(ns.warmup), "--duration", str(ns.duration),
                "--trials", str(ns.trials), "--cases", ",".join(cases)]
        res = subprocess.run(argv, stdout=subprocess.PIPE, env=env, check=True, text=True)
        report["results"][backend] = json.loads(res.stdout.strip().splitlines()[-1])
    if len(backends) == 2:
        s, r = report["results"]["shoal"], report["results"]["ray"]
        report["ratio_shoal_over_ray"] = {c: round(s[c]["rate"] / r[c]["rate"], 2)
                                          for c in cases if c in s and c in r and r[c]["rate"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
