"""Discrete-time simulation of cluster-wide lease scheduling with stale views.

    python benchmarks/scheduler_sim.py [--nodes 1000] [--tasks 100000] [--seed 1] [--json out.json]

What is modelled (1 tick = 1 ms, no sockets, no clocks, no threads):

* ``nodes`` raylets, each a real :class:`LeaseScheduler` (the code under
  test). Every ``gpu_node_fraction``-th node also has GPUs.
* ``submitters`` drivers, each on its own node, hold all tasks from t=0.
  Like libclient, a driver groups tasks by demand (scheduling class), keeps
  at most ``nodes`` lease requests pending per class and never more than it
  has queued tasks, asks its own raylet, follows a spillback with
  ``grant_or_reject=True``, and pushes queued tasks of the class through each
  lease it holds, returning the lease when the class queue is empty.
* Messages between hosts take ``hop_ms``; a driver and its own raylet talk
  for free (AF_UNIX, ~15 us).
* View sync as RaySyncer does it: every ``sync_period_ms`` each raylet sends
  its snapshot to gcsd if its version changed; gcsd forwards each one to the
  raylets that schedule (the submitters' nodes), never back to its sender.
  Views are therefore 1-2 hops plus up to one period stale. Other raylets
  only ever receive spilled (grant_or_reject) requests and need no view.

Figures: makespan against the ideal (total resource-seconds over capacity,
per resource, and never less than the longest task), messages per task by
kind, and the longest spillback chain (must be 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from daemons.raylet.cluster_view import ClusterView  # noqa: E402
from daemons.raylet.resources import ResourceSet  # noqa: E402
from daemons.raylet.scheduler import (  # noqa: E402
    Grant,
    LeaseRequest,
    LeaseScheduler,
    Rejected,
    Spill,
)

# (weight, demand) of task shapes: mostly 1 CPU, some fractional, some wide, a few GPU.
SHAPES: list[tuple[float, dict[str, float]]] = [
    (0.58, {"CPU": 1}),
    (0.10, {"CPU": 0.5}),
    (0.20, {"CPU": 2}),
    (0.10, {"CPU": 4}),
    (0.02, {"CPU": 1, "GPU": 1}),
]
# (weight, low ms, high ms) of task durations: short, medium and long tasks.
DURATIONS: list[tuple[float, int, int]] = [
    (0.40, 5, 20),
    (0.40, 100, 600),
    (0.20, 1000, 2000),
]


@dataclass
class SimConfig:
    nodes: int = 1000
    tasks: int = 100_000
    submitters: int = 4
    cpus_per_node: int = 8
    gpu_node_fraction: float = 0.1
    gpus_per_gpu_node: int = 2
    sync_period_ms: int = 100
    hop_ms: int = 1
    optimism_timeout_s: float = 3.0
    duration_scale: float = 1.0
    seed: int = 1


@dataclass
class _Class:
    demand: ResourceSet
    queue: deque[int] = field(default_factory=deque)   # task durations (ms)
    pending: dict[int, None] = field(default_factory=dict)   # lease request ids


@dataclass
class _Request:
    driver: int
    shape: int
    home: int
    at: int              # the raylet the request was last sent to
    hops: int = 0
    cancelled: bool = False


class Sim:
    """One run. ``run()`` returns the summary dict."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.t = 0
        self._events: list[tuple[int, int, str, tuple]] = []
        self._seq = 0
        self.ids = [b"n%05d" % i for i in range(cfg.nodes)]
        self.index = {nid: i for i, nid in enumerate(self.ids)}
        gpu_every = round(1 / cfg.gpu_node_fraction) if cfg.gpu_node_fraction else 0
        self.totals = []
        for i in range(cfg.nodes):
            res = {"CPU": cfg.cpus_per_node}
            if gpu_every and i % gpu_every == gpu_every - 1:
                res["GPU"] = cfg.gpus_per_gpu_node
            self.totals.append(ResourceSet.of(res))
        # Submitters sit on spread-out CPU-only nodes.
        step = max(1, cfg.nodes // max(1, cfg.submitters))
        self.homes = [min(cfg.nodes - 1, k * step) for k in range(cfg.submitters)]
        homes = set(self.homes)
        self.scheds: list[LeaseScheduler] = []
        for i, nid in enumerate(self.ids):
            view = ClusterView(optimism_timeout=cfg.optimism_timeout_s)
            if i in homes:  # a scheduling raylet starts knowing the cluster as registered
                for j, other in enumerate(self.ids):
                    if j != i:
                        view.update(other, self.totals[j], self.totals[j], 1)
            self.scheds.append(LeaseScheduler(
                self.totals[i], node_id=nid, view=view, queue_infeasible=True,
                rng=random.Random(cfg.seed * 1_000_003 + i)))
        self.sent_version = [s.version for s in self.scheds]
        self.requests: dict[int, _Request] = {}
        self._next_rid = 0
        self.dirty: set[int] = set()
        self.msgs = dict.fromkeys(
            ("lease_requests", "spillbacks", "lease_grants", "lease_rejects", "lease_returns",
             "lease_cancels",
             "task_pushes", "task_replies", "view_snapshots_sent", "view_deliveries"), 0)
        self.max_hops = 0
        self.done = 0
        self.makespan = 0
        self.leases = 0
        self.empty_leases = 0
        self.decide_calls = 0
        self.last_dispatch = 0
        self.cpu_ms: list[tuple[int, int, float]] = []  # (start, end, cpus) per task
        self._make_tasks()

    # ---- workload -----------------------------------------------------------
    def _make_tasks(self) -> None:
        cfg, rng = self.cfg, self.rng
        self.demands = [ResourceSet.of(d) for _, d in SHAPES]
        self.drivers: list[list[_Class]] = [[_Class(d) for d in self.demands]
                                             for _ in self.homes]
        work: dict[str, float] = {}
        longest = 0
        sw = [w for w, _ in SHAPES]
        dw = [w for w, _, _ in DURATIONS]
        self.tasks: list[tuple[int, int]] = []   # (shape, duration) in submission order
        for n in range(cfg.tasks):
            shape = rng.choices(range(len(SHAPES)), sw)[0]
            _, lo, hi = DURATIONS[rng.choices(range(len(DURATIONS)), dw)[0]]
            dur = max(1, round(rng.randint(lo, hi) * cfg.duration_scale))
            self.drivers[n % len(self.homes)][shape].queue.append(dur)
            self.tasks.append((shape, dur))
            longest = max(longest, dur)
            for name, amount in SHAPES[shape][1].items():
                work[name] = work.get(name, 0.0) + amount * dur
        capacity: dict[str, float] = {}
        for tot in self.totals:
            for name, amount in tot.to_dict().items():
                capacity[name] = capacity.get(name, 0.0) + amount
        bounds = {name: w / capacity[name] for name, w in work.items()}
        self.ideal = max(max(bounds.values()), longest)
        self.bounds = bounds

    # ---- events -------------------------------------------------------------
    def _at(self, t: int, kind: str, *args: Any) -> None:
        heapq.heappush(self._events, (t, self._seq, kind, args))
        self._seq += 1

    def _net(self, a: int, b: int) -> int:
        return 0 if a == b else self.cfg.hop_ms

    def run(self) -> dict[str, Any]:
        wall = time.perf_counter()
        for d in range(len(self.homes)):
            self._refill(d)
        self._at(0, "sync")
        while self.done < self.cfg.tasks:
            if not self._events:
                raise RuntimeError("simulation stalled with tasks left")
            self.t = self._events[0][0]
            while self._events and self._events[0][0] == self.t:
                while self._events and self._events[0][0] == self.t:
                    _, _, kind, args = heapq.heappop(self._events)
                    getattr(self, "_on_" + kind)(*args)
                for i in sorted(self.dirty):
                    self._decide(i)
                self.dirty.clear()
        return self._summary(time.perf_counter() - wall)

    def _refill(self, d: int) -> None:
        """Driver d asks its raylet for more leases while it has unserved tasks."""
        home = self.homes[d]
        for shape, cls in enumerate(self.drivers[d]):
            while len(cls.pending) < min(self.cfg.nodes, len(cls.queue)):
                rid = self._next_rid
                self._next_rid += 1
                self.requests[rid] = _Request(d, shape, home, home)
                cls.pending[rid] = None
                self._send_request(home, LeaseRequest(rid, d, cls.demand))

    def _send_request(self, node: int, req: LeaseRequest) -> None:
        self.msgs["lease_requests"] += 1
        info = self.requests[req.request_id]
        info.at = node
        self._at(self.t + self._net(info.home, node), "lease_request", node, req)

    def _cancel_pending(self, d: int, cls: _Class) -> None:
        """The class queue ran dry: cancel its outstanding requests, as libclient does."""
        for rid in cls.pending:
            info = self.requests[rid]
            info.cancelled = True
            self.msgs["lease_cancels"] += 1
            self._at(self.t + self._net(info.home, info.at), "cancel", info.at, d, rid)
        cls.pending.clear()

    def _on_cancel(self, node: int, d: int, rid: int) -> None:
        self.scheds[node].cancel(d, rid)  # gone already if it was granted or spilled

    def _on_lease_request(self, node: int, req: LeaseRequest) -> None:
        self.scheds[node].submit(req)
        self.dirty.add(node)

    def _decide(self, i: int) -> None:
        self.decide_calls += 1
        for d in self.scheds[i].decide(self.t / 1000):
            req = d.request
            info = self.requests[req.request_id]
            if isinstance(d, Grant):
                self.msgs["lease_grants"] += 1
                self._at(self.t + self._net(i, info.home), "granted", req, i)
            elif isinstance(d, Spill):
                if req.grant_or_reject:
                    raise AssertionError("a spilled request was spilled again")
                self.msgs["spillbacks"] += 1
                self._at(self.t + self._net(i, info.home), "spilled", req, self.index[d.node_id])
            elif isinstance(d, Rejected):
                self.msgs["lease_rejects"] += 1
                self._at(self.t + self._net(i, info.home), "rejected", req)
            else:
                raise AssertionError(f"unexpected decision {d}")

    def _on_spilled(self, req: LeaseRequest, target: int) -> None:
        info = self.requests[req.request_id]
        if info.cancelled:
            del self.requests[req.request_id]
            return
        info.hops += 1
        self.max_hops = max(self.max_hops, info.hops)
        self._send_request(target, dataclasses.replace(req, grant_or_reject=True))

    def _on_rejected(self, req: LeaseRequest) -> None:
        info = self.requests[req.request_id]
        if info.cancelled:
            del self.requests[req.request_id]
            return
        self._send_request(info.home, dataclasses.replace(req, grant_or_reject=False))

    def _on_granted(self, req: LeaseRequest, node: int) -> None:
        info = self.requests.pop(req.request_id)
        cls = self.drivers[info.driver][info.shape]
        cls.pending.pop(req.request_id, None)
        self.leases += 1
        if not cls.queue:
            self.empty_leases += 1
        self._run_next(info.driver, info.shape, node)
        self._refill(info.driver)

    def _run_next(self, d: int, shape: int, node: int) -> None:
        cls = self.drivers[d][shape]
        net = self._net(self.homes[d], node)
        if cls.queue:
            dur = cls.queue.popleft()
            self.msgs["task_pushes"] += 1
            self.last_dispatch = self.t
            self.cpu_ms.append((self.t + net, self.t + net + dur, cls.demand.get("CPU")))
            self._at(self.t + 2 * net + dur, "task_done", d, shape, node)
            if not cls.queue:
                self._cancel_pending(d, cls)
        else:
            self.msgs["lease_returns"] += 1
            self._at(self.t + net, "lease_returned", node, cls.demand)

    def _on_task_done(self, d: int, shape: int, node: int) -> None:
        self.msgs["task_replies"] += 1
        self.done += 1
        self.makespan = self.t
        self._run_next(d, shape, node)

    def _on_lease_returned(self, node: int, demand: ResourceSet) -> None:
        self.scheds[node].release(demand)
        self.dirty.add(node)

    # ---- view sync ----------------------------------------------------------
    def _on_sync(self) -> None:
        """Nodes whose phase is now send their snapshot to gcsd if it changed."""
        period = self.cfg.sync_period_ms
        batch = []
        for i in range(self.t % period, self.cfg.nodes, period):
            s = self.scheds[i]
            if s.version != self.sent_version[i]:
                self.sent_version[i] = s.version
                batch.append((i, s.total, s.available, s.version))
        if batch:
            self.msgs["view_snapshots_sent"] += len(batch)
            self._at(self.t + self.cfg.hop_ms, "gcs_forward", batch)
        if self.done < self.cfg.tasks:
            self._at(self.t + 1, "sync")

    def _on_gcs_forward(self, batch: list) -> None:
        for home in set(self.homes):
            mine = [b for b in batch if b[0] != home]
            if mine:
                self.msgs["view_deliveries"] += len(mine)
                self._at(self.t + self.cfg.hop_ms, "view_update", home, mine)

    def _on_view_update(self, node: int, batch: list) -> None:
        view = self.scheds[node].view
        for i, total, avail, version in batch:
            view.update(self.ids[i], total, avail, version)
        self.dirty.add(node)

    # ---- report -------------------------------------------------------------
    def _summary(self, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        m = self.msgs
        sched = m["lease_requests"] + m["spillbacks"] + m["lease_grants"] + \
            m["lease_rejects"] + m["lease_returns"] + m["lease_cancels"]
        view = m["view_snapshots_sent"] + m["view_deliveries"]
        return {
            "config": dataclasses.asdict(cfg),
            "makespan_s": self.makespan / 1000,
            "ideal_makespan_s": round(self.ideal / 1000, 3),
            "ideal_bound_by_resource_s": {k: round(v / 1000, 3) for k, v in self.bounds.items()},
            "makespan_over_ideal": round(self.makespan / self.ideal, 4),
            "efficiency": round(self.ideal / self.makespan, 4),
            "leases": self.leases,
            "leases_granted_after_queue_ran_dry": self.empty_leases,
            "last_dispatch_s": self.last_dispatch / 1000,
            "cpu_busy_until_last_dispatch": round(self._busy_until(self.last_dispatch), 4),
            "tasks_per_lease": round(cfg.tasks / self.leases, 2),
            "max_spillback_hops": self.max_hops,
            "messages": dict(m),
            "messages_per_task": {
                "scheduling": round(sched / cfg.tasks, 3),
                "lease_requests": round(m["lease_requests"] / cfg.tasks, 3),
                "spillbacks": round(m["spillbacks"] / cfg.tasks, 3),
                "view": round(view / cfg.tasks, 3),
                "task_push_and_reply": round((m["task_pushes"] + m["task_replies"])
                                             / cfg.tasks, 3),
            },
            # RaySyncer sends every snapshot to every other raylet; here only the
            # raylets that place work subscribe. What a full broadcast would cost:
            "view_deliveries_if_broadcast_to_all": m["view_snapshots_sent"] * (cfg.nodes - 1),
            "decide_calls": self.decide_calls,
            "wall_s": round(wall, 2),
        }


    def _busy_until(self, end: int) -> float:
        """Fraction of CPU capacity running tasks over [0, end): how well the
        policy kept nodes fed while there was still work to hand out."""
        if end <= 0:
            return 1.0
        used = sum((min(e, end) - s) * c for s, e, c in self.cpu_ms if s < end)
        cap = sum(t.get("CPU") for t in self.totals) * end
        return used / cap


def oracle_makespan(sim: Sim) -> int:
    """Makespan of a central greedy scheduler with a perfect, instant view and
    free messages, handing out the same tasks in the same order (per-class
    FIFO, first fit, CPU work kept off GPU nodes while others fit). It has the
    same unavoidable tail as the real run (long tasks that start late), so
    makespan / oracle isolates what stale views and messages cost."""
    totals = [t.to_dict() for t in sim.totals]
    free = [dict(t) for t in totals]
    queues: list[deque[tuple[int, int]]] = [deque() for _ in SHAPES]
    for seq, (shape, dur) in enumerate(sim.tasks):
        queues[shape].append((seq, dur))
    cpu_nodes = [i for i, t in enumerate(totals) if not t.get("GPU")]
    gpu_nodes = [i for i, t in enumerate(totals) if t.get("GPU")]
    # CPU-only nodes bucketed by free CPU (all amounts are multiples of 0.5).
    buckets: dict[float, dict[int, None]] = {}
    for i in cpu_nodes:
        buckets.setdefault(free[i]["CPU"], {})[i] = None

    def move(i: int, delta: dict[str, float]) -> None:
        if i in buckets.get(free[i]["CPU"], {}):
            del buckets[free[i]["CPU"]][i]
        for k, v in delta.items():
            free[i][k] += v
        if not totals[i].get("GPU"):
            buckets.setdefault(free[i]["CPU"], {})[i] = None

    def find(demand: dict[str, float]) -> int | None:
        cpu, gpu = demand.get("CPU", 0), demand.get("GPU", 0)
        if not gpu:
            for f in sorted(b for b in buckets if b >= cpu and buckets[b]):
                return next(iter(buckets[f]))
        return next((i for i in gpu_nodes
                     if free[i]["CPU"] >= cpu and free[i]["GPU"] >= gpu), None)

    running: list[tuple[int, int, int]] = []   # (end, node, shape)
    t = end = 0
    left = len(sim.tasks)
    while left:
        heads = sorted((q[0][0], s) for s, q in enumerate(queues) if q)
        for _, shape in heads:
            demand = SHAPES[shape][1]
            q = queues[shape]
            while q:
                i = find(demand)
                if i is None:
                    break
                _, dur = q.popleft()
                move(i, {k: -v for k, v in demand.items()})
                heapq.heappush(running, (t + dur, i, shape))
        t, i, shape = heapq.heappop(running)
        move(i, SHAPES[shape][1])
        left -= 1
        end = t
        while running and running[0][0] == t:
            _, i, shape = heapq.heappop(running)
            move(i, SHAPES[shape][1])
            left -= 1
    return end


def simulate(cfg: SimConfig) -> dict[str, Any]:
    """Run one seeded simulation and return its summary."""
    sim = Sim(cfg)
    summary = sim.run()
    oracle = oracle_makespan(sim)
    summary["oracle_makespan_s"] = oracle / 1000
    summary["makespan_over_oracle"] = round(sim.makespan / oracle, 4)
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SimConfig()
    for f in dataclasses.fields(SimConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    p.add_argument("--json", help="also write the summary to this file")
    args = vars(p.parse_args(argv))
    out = args.pop("json")
    summary = simulate(SimConfig(**args))
    text = json.dumps(summary, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
