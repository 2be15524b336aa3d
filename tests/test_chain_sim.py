"""Deterministic simulation of sharded chain replication: no sockets, no clocks, no threads.

Three members, two shards, chains of three, a pure :class:`ChainMaster`, and
clients that write and read through the head and tail they believe in. A
seeded random network delays, reorders and drops messages (so messages from
older epochs arrive late); members crash (losing all in-memory state, keeping
their "disk") and restart as new incarnations. After every run the faults
stop, the cluster heals, and we check the paper's promises:

* every acknowledged write is on every replica (§2: the tail answers only
  for what the whole chain has applied);
* committed histories agree: same seq, same entry, on every replica;
* reads never go backwards, for any client;
* no update is applied twice (each client request id occurs once per history);
* at most one head per shard per epoch.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemons.gcsd.chain import (
    Ack,
    CatchUp,
    ChainReplica,
    Config,
    Entry,
    Forward,
    Incremental,
    Resend,
    Send,
    ServeSync,
    SyncRequest,
    plan_catchup,
)
from daemons.gcsd.master import ChainMaster, Heartbeat, ShardReport
from daemons.gcsd.tables import Delete, Put

MEMBERS, SHARDS, R = 3, 2, 3
MASTER = -1


@dataclass
class Disk:
    """What survives a crash: the tables, the log, and the position."""

    kv: dict[bytes, Any] = field(default_factory=dict)
    log: dict[int, Entry] = field(default_factory=dict)
    applied: int = 0
    last_epoch: int = 0
    marks: dict[str, int] = field(default_factory=dict)

    def write(self, e: Entry) -> None:
        assert e.seq == self.applied + 1, "persisted out of order"
        for op in e.ops:
            if isinstance(op, Put):
                self.kv[op.key] = op.value
            elif isinstance(op, Delete):
                self.kv.pop(op.key, None)
        self.log[e.seq] = e
        self.applied, self.last_epoch = e.seq, e.epoch
        for op, mark in zip(e.ops, e.marks, strict=True):
            if mark:
                self.marks[op.table] = max(self.marks.get(op.table, 0), mark)


@dataclass(frozen=True)
class SnapshotMsg:
    shard: int
    epoch: int
    src: int
    disk: Disk


@dataclass(frozen=True)
class Write:
    shard: int
    epoch: int
    cid: bytes
    rid: int
    key: bytes
    value: int


@dataclass(frozen=True)
class Reply:
    cid: bytes
    rid: int
    ok: bool


class Member:
    def __init__(self, mid: int, sim: Sim) -> None:
        self.mid = mid
        self.sim = sim
        self.disks = [Disk() for _ in range(SHARDS)]
        self.up = False
        self.incarnation = 0
        self.start()

    def start(self) -> None:
        self.up = True
        self.incarnation += 1
        self.reps = []
        for s, d in enumerate(self.disks):
            dedup = [(e.cid, e.rid, e.seq, e.result) for e in d.log.values() if e.cid]
            self.reps.append(ChainReplica(s, self.mid, applied=d.applied, last_epoch=d.last_epoch,
                                          dedup=dedup, marks=d.marks, resend_ticks=8,
                                          sync_ticks=8, join_lag=4))
        self.waiters: list[dict[int, tuple[bytes, int]]] = [{} for _ in range(SHARDS)]

    def crash(self) -> None:
        self.up = False
        self.reps = []

    def on_message(self, src: int, msg: Any) -> None:
        if isinstance(msg, list):  # configs from the master
            for s, epoch, chain in msg:
                self.reps[s].step(Config(s, epoch, tuple(chain)))
                self.pump(s)
        elif isinstance(msg, Write):
            self.on_write(src, msg)
        elif isinstance(msg, SnapshotMsg):
            rep = self.reps[msg.shard]
            if rep.role == "IDLE" and rep.epoch == msg.epoch and rep.tail == msg.src:
                self.disks[msg.shard] = copy.deepcopy(msg.disk)
                d = self.disks[msg.shard]
                rep.restored(d.applied, d.last_epoch,
                             [(e.cid, e.rid, e.seq, e.result) for e in d.log.values() if e.cid],
                             d.marks)
                self.pump(msg.shard)
        else:
            self.reps[msg.shard].step(msg)
            self.pump(msg.shard)

    def on_write(self, client: int, w: Write) -> None:
        rep = self.reps[w.shard]
        if not rep.is_head or rep.epoch != w.epoch:
            self.sim.send(self.mid, client, Reply(w.cid, w.rid, False))
            return
        dup = rep.duplicate(w.cid, w.rid)
        if dup is not None:
            if dup.committed:
                self.sim.send(self.mid, client, Reply(w.cid, w.rid, True))
            else:
                self.waiters[w.shard][dup.seq] = (w.cid, w.rid)
            return
        res = rep.propose([Put("kv", w.key, w.value)], w.cid, w.rid, {"ok": 1})
        self.waiters[w.shard][res.seq] = (w.cid, w.rid)
        self.pump(w.shard)

    def pump(self, s: int) -> None:
        """The shell: carry out Ready in contract order."""
        rep, disk = self.reps[s], self.disks[s]
        while rep.has_ready():
            rd = rep.ready()
            for e in rd.persist:
                disk.write(e)
            for m in rd.messages:
                if isinstance(m, Send):
                    self.sim.send(self.mid, m.dest, m.msg)
                elif isinstance(m, Resend):
                    entries = tuple(disk.log[q] for q in range(m.first, m.last + 1))
                    self.sim.send(self.mid, m.dest, Forward(s, m.epoch, self.mid, entries,
                                                            m.committed))
                elif isinstance(m, ServeSync):
                    self.serve_sync(s, m)
            for e in rd.committed:
                if self.waiters[s].pop(e.seq, None) is not None:
                    self.sim.send(self.mid, self.sim.client_id(e.cid), Reply(e.cid, e.rid, True))
            for e in rd.publish:
                self.sim.published[s].append((self.mid, e.seq))
            if rd.role is not None:
                if rd.role[1] in ("HEAD", "SOLE"):
                    self.sim.heads.setdefault((s, rep.epoch), set()).add(self.mid)
                if rep.role not in ("HEAD", "SOLE"):
                    for cid, rid in self.waiters[s].values():
                        self.sim.send(self.mid, self.sim.client_id(cid), Reply(cid, rid, False))
                    self.waiters[s].clear()
            rep.advance(rd)

    def serve_sync(self, s: int, m: ServeSync) -> None:
        disk = self.disks[s]
        first = min(disk.log) if disk.log else disk.applied + 1
        plan = plan_catchup(m.applied, m.last_epoch, tail_applied=disk.applied, log_first=first,
                            epoch_at=lambda q: disk.log[q].epoch if q in disk.log else None,
                            max_entries=5)
        if isinstance(plan, Incremental):
            entries = tuple(disk.log[q] for q in range(plan.first, plan.last + 1))
            self.sim.send(self.mid, m.dest, CatchUp(s, m.epoch, self.mid, entries, disk.applied))
        else:
            self.sim.send(self.mid, m.dest, SnapshotMsg(s, m.epoch, self.mid, copy.deepcopy(disk)))

    def tick(self) -> None:
        for s, rep in enumerate(self.reps):
            rep.tick()
            self.pump(s)

    def heartbeat(self) -> None:
        reports = {s: ShardReport(r.epoch, r.applied, r.ready_epoch,
                                      caught_up=r.caught_up) for s, r in enumerate(self.reps)}
        self.sim.send(self.mid, MASTER, Heartbeat(self.mid, self.incarnation, reports))


class Client:
    def __init__(self, idx: int, cid_: bytes) -> None:
        self.idx = idx
        self.cid = cid_
        self.rid = 0
        self.pending: Write | None = None
        self.sent_at = 0
        self.value = 0
        self.last_read: dict[bytes, int] = {}

    def acked(self, sim: Sim) -> None:
        assert self.pending is not None
        sim.acked.append((self.pending.shard, self.pending.key, self.pending.value,
                          self.cid, self.rid))
        self.pending = None


class Sim:
    def __init__(self, seed: int, drop: float = 0.02) -> None:
        self.rng = random.Random(seed)
        self.drop = drop
        self.now = 0
        self.net: list[tuple[int, int, int, int, Any]] = []  # (at, order, src, dest, msg)
        self.order = 0
        # Rebalancing on, and eager: removing live heads is a reconfiguration
        # the invariants below must survive too.
        self.master = ChainMaster(MEMBERS, SHARDS, R, dead_ticks=12, rebalance_ticks=40,
                                  suspect_ticks=4)
        self.suspicions: list[tuple[int, int, int]] = []  # (at, member, reported by)
        self.master.advance(self.master.ready())
        self.members = [Member(m, self) for m in range(MEMBERS)]
        self.clients = [Client(i, b"client-%d" % i) for i in range(4)]
        self.acked: list[tuple[int, bytes, int, bytes, int]] = []
        self.published: list[list[tuple[int, int]]] = [[] for _ in range(SHARDS)]
        self.heads: dict[tuple[int, int], set[int]] = {}
        self.faults = True
        self.writing = True
        for m in self.members:  # bootstrap: the first configs
            m.on_message(MASTER, self.master.configs())

    def client_id(self, cid: bytes) -> int:
        return 100 + int(cid.split(b"-")[1])

    def client_of(self, cid: bytes) -> Client:
        return self.clients[int(cid.split(b"-")[1])]

    def send(self, src: int, dest: int, msg: Any) -> None:
        if self.faults and self.rng.random() < self.drop:
            return
        delay = self.rng.randint(1, 6) if self.faults else 1
        self.order += 1
        self.net.append((self.now + delay, self.order, src, dest, msg))

    def deliver(self) -> None:
        due = [m for m in self.net if m[0] <= self.now]
        self.net = [m for m in self.net if m[0] > self.now]
        self.rng.shuffle(due)  # reordering, even on one link
        for _at, _o, src, dest, msg in due:
            if dest == MASTER:
                self.master.step(msg)
                self.master.advance(self.master.ready())
                self.send(MASTER, msg.member, self.master.configs())
            elif dest >= 100:
                self.on_client_reply(self.clients[dest - 100], msg)
            elif self.members[dest].up:
                self.members[dest].on_message(src, msg)

    def on_client_reply(self, c: Client, msg: Reply) -> None:
        if c.pending is None or msg.rid != c.pending.rid:
            return  # a late answer to something already settled
        if msg.ok:
            c.acked(self)
        else:
            self.write(c, retry=True)

    def write(self, c: Client, retry: bool = False) -> None:
        if not retry:
            c.rid += 1
            c.value += 1
            key = b"k-%d-%d" % (c.idx, self.rng.randrange(3))
            shard = self.rng.randrange(SHARDS)
            c.pending = Write(shard, 0, c.cid, c.rid, key, c.value)
        w = c.pending
        epoch, chain = self.master.chain(w.shard)
        c.pending = Write(w.shard, epoch, w.cid, w.rid, w.key, w.value)
        c.sent_at = self.now
        self.send(100 + c.idx, chain[0], c.pending)

    def read(self, c: Client) -> None:
        """Read a key at the tail the client believes in; it must never go backwards."""
        shard = self.rng.randrange(SHARDS)
        epoch, chain = self.master.chain(shard)
        m = self.members[chain[-1]]
        if not m.up:
            return
        rep = m.reps[shard]
        if not rep.readable or rep.epoch != epoch:
            return  # refused; the real client retries elsewhere
        applied = m.disks[shard].applied
        prev = c.last_read.get(b"seq%d" % shard, 0)
        assert applied >= prev, f"read went backwards on shard {shard}: {applied} < {prev}"
        c.last_read[b"seq%d" % shard] = applied
        for key, value in m.disks[shard].kv.items():
            k = b"%d/%s" % (shard, key)
            assert value >= c.last_read.get(k, 0), f"value of {key!r} went backwards"
            c.last_read[k] = value

    def step(self) -> None:
        self.now += 1
        self.deliver()
        due = [x for x in self.suspicions if x[0] <= self.now]
        self.suspicions = [x for x in self.suspicions if x[0] > self.now]
        for _at, member, by in due:
            self.master.suspect(member, by=by)
        self.master.tick()
        self.master.advance(self.master.ready())
        for m in self.members:
            if m.up:
                m.tick()
                if self.now % 3 == m.mid % 3:
                    m.heartbeat()
        for c in self.clients:
            if c.pending is None:
                if self.writing and self.rng.random() < 0.5:
                    self.write(c)
            elif self.now - c.sent_at > 25:
                self.write(c, retry=True)  # timed out: retry with the same request id
            if self.rng.random() < 0.3:
                self.read(c)
        if self.faults:
            self.maybe_fault()

    def maybe_fault(self) -> None:
        r = self.rng.random()
        up = [m for m in self.members if m.up]
        if r < 0.01 and len(up) > 1:
            victim = self.rng.choice(up)
            victim.crash()
            # Its neighbours see its connections close and tell the master
            # (the report may come late, or not at all).
            if self.rng.random() < 0.8:
                by = self.rng.choice([m for m in up if m is not victim])
                self.suspicions.append((self.now + self.rng.randint(0, 8), victim.mid, by.mid))
        elif r < 0.012 and len(up) > 1:
            # A false suspicion: a connection blip between two live members.
            a, b = self.rng.sample(up, 2)
            self.suspicions.append((self.now + self.rng.randint(0, 8), a.mid, b.mid))
        elif r < 0.03:
            for m in self.members:
                if not m.up and self.rng.random() < 0.5:
                    m.start()
                    break

    def heal(self) -> None:
        self.faults = False
        for m in self.members:
            if not m.up:
                m.start()
        for _ in range(100):
            self.step()  # writes go on for a while after the last fault
        self.writing = False
        for _ in range(600):
            self.step()
            if self.settled():
                break

    def settled(self) -> bool:
        for s in range(SHARDS):
            _epoch, chain = self.master.chain(s)
            if len(chain) < R:
                return False
            applied = {self.members[m].reps[s].applied for m in chain}
            if len(applied) != 1:
                return False
        return all(c.pending is None for c in self.clients)


def run(seed: int, steps: int = 1500) -> Sim:
    sim = Sim(seed)
    for _ in range(steps):
        sim.step()
    sim.heal()
    check(sim)
    return sim


def check(sim: Sim) -> None:
    assert sim.settled(), "the cluster did not heal"
    for s in range(SHARDS):
        histories = []
        for m in sim.members:
            disk = m.disks[s]
            hist = {q: (e.epoch, e.cid, e.rid) for q, e in disk.log.items()}
            histories.append((disk, hist))
            ids = [(e.cid, e.rid) for e in disk.log.values() if e.cid]
            assert len(ids) == len(set(ids)), f"member {m.mid} applied an update twice"
        ref_disk, ref = histories[0]
        for disk, hist in histories[1:]:
            assert hist == ref, f"shard {s}: histories differ"
            assert disk.kv == ref_disk.kv
    for shard, key, value, _cid, _rid in sim.acked:
        for m in sim.members:
            got = m.disks[shard].kv.get(key)
            assert got is not None and got >= value, (
                f"acknowledged write {key!r}={value} missing on member {m.mid}")
    for (s, epoch), heads in sim.heads.items():
        assert len(heads) == 1, f"shard {s} epoch {epoch} had heads {heads}"


@pytest.mark.parametrize("seed", range(40))
def test_simulation_keeps_every_acknowledged_write(seed):
    sim = run(seed)
    assert len(sim.acked) > 20, "too few writes got through to mean anything"


def test_simulation_without_faults_commits_everything_in_order():
    sim = Sim(1234, drop=0.0)
    sim.faults = False
    for _ in range(300):
        sim.step()
    sim.heal()
    check(sim)
    seqs = [q for _m, q in sim.published[0]]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))


def test_simulation_is_deterministic():
    a, b = run(7, steps=400), run(7, steps=400)
    assert a.acked == b.acked and a.published == b.published


def test_messages_from_an_old_epoch_are_ignored():
    sim = Sim(3)
    sim.faults = False
    for _ in range(50):
        sim.step()
    member = sim.members[1]
    rep = member.reps[0]
    before = (rep.applied, rep.committed, rep.role)
    stale = Forward(0, rep.epoch - 1 if rep.epoch > 1 else 0, rep.pred or 0,
                    (Entry(rep.applied + 1, 0, (Put("kv", b"x", 1),)),), 0)
    rep.step(stale)
    rd = rep.ready()
    assert not rd.persist and (rep.applied, rep.committed, rep.role) == before
    assert any(n.event == "chain_stale_epoch" for n in rd.notices)
    rep.advance(rd)
    rep.step(Ack(0, rep.epoch + 5, 2, 0, 0))
    rep.step(SyncRequest(0, rep.epoch + 5, 2, 0, 0))
    rep.step(CatchUp(0, rep.epoch + 5, 2, (), 0))
    assert not rep.ready().persist and (rep.applied, rep.committed, rep.role) == before
