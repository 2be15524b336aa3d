"""Lease scheduling policy for one node: which queued lease requests to grant.

Assumptions
  * A lease is a worker plus the resources of one scheduling class; the
    submitter pushes any number of its tasks through it (Ray 2's design), so
    the raylet decides per lease, not per task.
  * The policy sees only this node's totals and availability. It never does
    I/O, never reads a clock, and never picks the worker: the shell pairs each
    grant with an idle worker.

Algorithm (``schedule``)
  1. Walk the queue in arrival order.
  2. Grant each request whose demand fits what is still available, and
     subtract it.
  3. A request that does not fit stays queued, but later, smaller requests
     may still pass it, so one big demand cannot stall the node. (Ray
     accepts the same starvation risk for big demands; see notes.)

A demand that can never fit the node's totals is rejected when submitted
(``Infeasible``), so a driver gets an error instead of waiting forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemons.raylet.resources import ResourceSet


@dataclass(frozen=True)
class LeaseRequest:
    request_id: int
    client_id: int
    demand: ResourceSet


@dataclass(frozen=True)
class Queued:
    request: LeaseRequest


@dataclass(frozen=True)
class Infeasible:
    request: LeaseRequest
    reason: str


@dataclass
class LeaseScheduler:
    """Queue and grant lease requests against this node's resources. Not thread-safe."""

    total: ResourceSet
    available: ResourceSet = field(init=False)
    _queue: list[LeaseRequest] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.available = self.total

    def submit(self, request: LeaseRequest) -> Queued | Infeasible:
        if not request.demand.fits_in(self.total):
            return Infeasible(request, f"demand {request.demand.to_dict()} exceeds node total "
                                       f"{self.total.to_dict()}")
        self._queue.append(request)
        return Queued(request)

    def cancel(self, client_id: int, request_id: int | None = None) -> list[LeaseRequest]:
        """Drop queued requests of a client (all of them if request_id is None)."""
        gone = [r for r in self._queue if r.client_id == client_id
                and (request_id is None or r.request_id == request_id)]
        if gone:
            self._queue = [r for r in self._queue if r not in gone]
        return gone

    def schedule(self) -> list[LeaseRequest]:
        """Grant every queued request that fits, in arrival order."""
        granted = []
        keep = []
        avail = self.available
        for req in self._queue:
            if req.demand.fits_in(avail):
                avail = avail - req.demand
                granted.append(req)
            else:
                keep.append(req)
        self._queue = keep
        self.available = avail
        return granted

    def acquire(self, demand: ResourceSet) -> None:
        """Take resources back for a worker that stopped blocking (may overcommit)."""
        self.available = self.available - demand

    def release(self, demand: ResourceSet) -> None:
        self.available = self.available + demand

    @property
    def queued(self) -> int:
        return len(self._queue)
