"""gcsd's pure core, storage and replication seam, driven directly: no sockets, no sleeps.

Time is advanced by passing larger ``now`` values, as raft's tests tick a node.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from daemons.gcsd.core import ALIVE, DEAD, ControlStore, Outcome
from daemons.gcsd.replication import SingleReplica
from daemons.gcsd.tables import Delete, LmdbTableStore, Put, StorageError
from libclient.protocol import encode_body

WALL = 1_700_000_000.0
NODE = b"\x01" * 8


@pytest.fixture
def store(tmp_path):
    s = LmdbTableStore(str(tmp_path / "gcs"), map_size=1 << 26)
    yield s
    s.close()


def make_core(store: Any, now: float = 0.0, timeout: float = 10.0) -> ControlStore:
    return ControlStore(SingleReplica(store), node_timeout_s=timeout,
                        pubsub_address="tcp://127.0.0.1:1", version="test", now=now)


def req(core: ControlStore, t: str, now: float = 0.0, rid: int | None = 1,
        **fields: Any) -> Outcome:
    msg: dict[str, Any] = {"t": t, **fields}
    if rid is not None:
        msg["r"] = rid
    return core.step(msg, now, WALL + now)


def ok(out: Outcome) -> dict[str, Any]:
    assert out.reply is not None and out.reply["ok"], out.reply
    return out.reply


# ---------------------------------------------------------------- storage
def test_lmdb_store_put_get_scan_delete(store):
    store.write_batch([Put("kv", b"a\x00x", b"1"), Put("kv", b"a\x00y", {"n": [1, 2]}),
                       Put("kv", b"b\x00z", None)])
    assert store.get("kv", b"a\x00y") == {"n": [1, 2]}
    assert store.get("kv", b"missing") is None
    assert [k for k, _ in store.scan("kv", b"a\x00")] == [b"a\x00x", b"a\x00y"]
    assert len(store.scan("kv", b"", limit=2)) == 2
    assert store.scan("kv", b"zzz") == []
    assert store.delete("kv", b"a\x00x") is True
    assert store.delete("kv", b"a\x00x") is False


def test_lmdb_batch_with_unknown_table_writes_nothing(store):
    with pytest.raises(KeyError):
        store.write_batch([Put("kv", b"k", 1), Put("nope", b"k", 2)])
    assert store.get("kv", b"k") is None


def test_lmdb_data_survives_reopen(tmp_path):
    path = str(tmp_path / "gcs")
    s = LmdbTableStore(path, map_size=1 << 26)
    s.write_batch([Put("jobs", b"j1", {"state": "RUNNING"}), Delete("jobs", b"absent")])
    s.close()
    s.close()  # idempotent
    s2 = LmdbTableStore(path, map_size=1 << 26)
    try:
        assert s2.get("jobs", b"j1") == {"state": "RUNNING"}
    finally:
        s2.close()


def test_lmdb_unusable_path_is_a_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError):
        LmdbTableStore(str(blocker / "gcs"))


def test_single_replica_numbers_commits_and_persists_the_counter(tmp_path):
    path = str(tmp_path / "gcs")
    s = LmdbTableStore(path, map_size=1 << 26)
    rep = SingleReplica(s)
    done = rep.commit([Put("kv", b"a", 1), Put("kv", b"b", 2)])
    assert [c.seq for c in done] == [1, 2] and rep.last_seq == 2
    assert rep.commit([]) == []
    s.close()
    s = LmdbTableStore(path, map_size=1 << 26)
    assert SingleReplica(s).last_seq == 2
    s.close()


# ---------------------------------------------------------------- kv
def test_kv_put_get_exists_keys_del(store):
    core = make_core(store)
    assert ok(req(core, "kv_put", ns="n", key=b"a", value=b"1"))["added"] is True
    assert ok(req(core, "kv_put", ns="n", key=b"a", value=b"2"))["added"] is False
    assert ok(req(core, "kv_get", ns="n", key=b"a"))["value"] == b"2"
    assert ok(req(core, "kv_put", ns="n", key=b"a", value=b"3", overwrite=False))["added"] is False
    assert ok(req(core, "kv_get", ns="n", key=b"a"))["value"] == b"2"
    req(core, "kv_put", ns="n", key=b"ab", value=b"x")
    req(core, "kv_put", ns="other", key=b"a", value=b"y")
    assert ok(req(core, "kv_keys", ns="n", prefix=b"a"))["keys"] == [b"a", b"ab"]
    assert ok(req(core, "kv_exists", ns="other", key=b"a"))["exists"] is True
    assert ok(req(core, "kv_del", ns="n", key=b"a"))["deleted"] is True
    assert ok(req(core, "kv_del", ns="n", key=b"a"))["deleted"] is False
    assert ok(req(core, "kv_get", ns="n", key=b"a"))["value"] is None


def test_kv_namespace_with_nul_is_refused(store):
    core = make_core(store)
    out = req(core, "kv_put", ns="a\x00b", key=b"k", value=b"v")
    assert out.reply["ok"] is False and "NUL" in out.reply["error"]


# ---------------------------------------------------------------- tables
def test_table_ops_publish_each_committed_write(store):
    core = make_core(store)
    out = req(core, "put", table="functions", key=b"f1", value={"name": "f"})
    ok(out)
    assert [p.body() for p in out.publications] == [
        {"table": "functions", "op": "put", "key": b"f1", "value": {"name": "f"}, "seq": 1}]
    assert ok(req(core, "get", table="functions", key=b"f1"))["value"] == {"name": "f"}
    req(core, "put", table="functions", key=b"f2", value=2)
    assert ok(req(core, "scan", table="functions", prefix=b"f"))["items"] == [
        [b"f1", {"name": "f"}], [b"f2", 2]]
    out = req(core, "delete", table="functions", key=b"f1")
    assert ok(out)["deleted"] is True
    assert [(p.op, p.seq) for p in out.publications] == [("delete", 3)]
    out = req(core, "delete", table="functions", key=b"f1")
    assert ok(out)["deleted"] is False and out.publications == []


def test_put_batch_commits_once_and_one_way_has_no_reply(store):
    core = make_core(store)
    items = [[b"t%d" % i, {"state": "FINISHED"}] for i in range(100)]
    out = req(core, "put_batch", rid=None, table="tasks", items=items)
    assert out.reply is None and out.notices == []
    assert [p.seq for p in out.publications] == list(range(1, 101))
    assert len(ok(req(core, "scan", table="tasks"))["items"]) == 100


def test_bad_put_batch_changes_nothing(store):
    core = make_core(store)
    out = req(core, "put_batch", table="tasks", items=[[b"ok", 1], ["str-key", 2]])
    assert out.reply["ok"] is False and out.publications == []
    assert store.get("tasks", b"ok") is None


def test_next_job_id_counts_from_one_and_survives_restart(tmp_path):
    path = str(tmp_path / "gcs")
    s = LmdbTableStore(path, map_size=1 << 26)
    core = make_core(s)
    assert [ok(req(core, "next_job_id"))["job_id"] for _ in range(3)] == [1, 2, 3]
    s.close()
    s = LmdbTableStore(path, map_size=1 << 26)
    assert ok(req(make_core(s), "next_job_id"))["job_id"] == 4
    s.close()


def test_internal_and_unknown_tables_are_refused(store):
    core = make_core(store)
    for table in ("meta", "nope"):
        out = req(core, "put", table=table, key=b"k", value=1)
        assert out.reply["ok"] is False and "unknown table" in out.reply["error"]


def test_info_and_ping(store):
    core = make_core(store)
    assert ok(req(core, "ping")) == {"r": 1, "ok": True}
    info = ok(req(core, "info"))
    assert info["pubsub"] == "tcp://127.0.0.1:1" and info["version"] == "test"


# ---------------------------------------------------------------- malformed input
@pytest.mark.parametrize("frame, rid", [
    (b"\xc1\xc1garbage", None),                       # not msgpack
    (msgpack.packb([1, 2, 3]), None),                 # not a map
    (msgpack.packb({"r": 7}), 7),                     # no method, but an id to answer
    (encode_body({"t": "frobnicate", "r": 8}), 8),   # unknown method
    (encode_body({"t": "kv_get", "r": 9, "ns": 5, "key": b"k"}), 9),  # wrong type
    (encode_body({"t": "get", "r": 10, "table": "kv"}), 10),          # missing field
    (encode_body({"t": "get", "r": 11, "table": "kv", "key": b""}), 11),  # empty key
    (encode_body({"t": "get", "r": 12, "table": "kv", "key": b"x" * 600}), 12),
    (encode_body({"t": "ping", "r": "one"}), None),   # unusable id
    (encode_body({"t": "heartbeat", "r": 13, "node_id": NODE, "available": {"CPU": "x"}}), 13),
])
def test_malformed_frames_get_an_error_and_change_nothing(store, frame, rid):
    core = make_core(store)
    req(core, "kv_put", ns="n", key=b"a", value=b"1")
    seq = core.shard.last_seq
    out = core.receive(frame, 0.0, WALL)
    if rid is None:
        assert out.reply is None
    else:
        assert out.reply["r"] == rid and out.reply["ok"] is False and out.reply["error"]
    assert out.publications == []
    assert [(n.level, n.event) for n in out.notices] == [("warning", "bad_request")]
    assert core.shard.last_seq == seq
    assert ok(req(core, "kv_get", ns="n", key=b"a"))["value"] == b"1"


class _FailingStore:
    """A TableStore whose writes fail, as when the disk or the LMDB map is full."""

    def __init__(self, inner: LmdbTableStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write_batch(self, ops: Any) -> None:
        raise StorageError("MDB_MAP_FULL")


def test_storage_failure_is_an_error_reply_and_changes_nothing(store):
    core = make_core(_FailingStore(store))
    out = req(core, "put", table="kv", key=b"k", value=1)
    assert out.reply["ok"] is False and "MAP_FULL" in out.reply["error"]
    assert out.publications == [] and core.shard.last_seq == 0
    assert [(n.level, n.event) for n in out.notices] == [("error", "storage_error")]


# ---------------------------------------------------------------- nodes
def _register(core: ControlStore, now: float = 0.0) -> Outcome:
    return req(core, "register_node", now, node_id=NODE,
               info={"node_id": NODE, "resources": {"CPU": 2.0}, "hostname": "h"})


def _node(core: ControlStore) -> dict[str, Any]:
    (node,) = ok(req(core, "get_nodes"))["nodes"]
    return node


def test_register_then_heartbeats_keep_a_node_alive(store):
    core = make_core(store, timeout=10)
    out = _register(core)
    assert [p.table for p in out.publications] == ["nodes"]
    assert [n.event for n in out.notices] == ["node_registered"]
    node = _node(core)
    assert node["state"] == ALIVE and node["node_id"] == NODE
    assert node["available"] == {"CPU": 2.0} and node["registered_at"] == WALL
    for t in (5.0, 12.0, 19.0):
        ok(req(core, "heartbeat", t, node_id=NODE, available={"CPU": 1.0}))
        assert core.tick(t + 1, WALL).publications == []
    node = _node(core)
    assert node["state"] == ALIVE and node["available"] == {"CPU": 1.0}
    assert node["last_heartbeat"] == WALL + 19.0


def test_bare_heartbeats_keep_a_node_alive_without_publishing(store):
    core = make_core(store, timeout=10)
    _register(core)
    seq = core.shard.last_seq
    for t in (5.0, 12.0, 19.0, 26.0):
        out = req(core, "heartbeat", t, node_id=NODE)
        assert ok(out) and out.publications == []  # nothing for 1,000 raylets to read
        assert core.tick(t + 1, WALL).publications == []
    assert core.shard.last_seq == seq and _node(core)["state"] == ALIVE
    out = req(core, "heartbeat", 27.0, node_id=NODE, available={"CPU": 0.5}, version=7)
    assert [p.value["available"] for p in out.publications] == [{"CPU": 0.5}]
    assert _node(core)["version"] == 7
    assert core.tick(37.5, WALL).publications[0].value["state"] == DEAD


def test_silent_node_is_marked_dead_once_on_tick(store):
    core = make_core(store, timeout=10)
    _register(core)
    assert core.tick(10.0, WALL).publications == []  # not *more* than the timeout yet
    out = core.tick(10.5, WALL + 10.5)
    assert [(p.table, p.value["state"]) for p in out.publications] == [("nodes", DEAD)]
    assert [(n.level, n.event) for n in out.notices] == [("warning", "node_dead")]
    assert _node(core)["death_reason"] == "heartbeat timeout"
    assert core.tick(100.0, WALL).publications == []  # declared once
    out = req(core, "heartbeat", 101.0, node_id=NODE, available={})
    assert out.reply["ok"] is False and "DEAD" in out.reply["error"]
    ok(_register(core, 102.0))  # a fresh registration revives it
    assert _node(core)["state"] == ALIVE


def test_unregister_marks_dead_and_stops_the_timer(store):
    core = make_core(store, timeout=10)
    _register(core)
    out = req(core, "unregister_node", 1.0, node_id=NODE)
    assert ok(out) and out.publications[0].value["state"] == DEAD
    assert core.tick(50.0, WALL).publications == []
    out = req(core, "unregister_node", node_id=b"\x09" * 8)
    assert out.reply["ok"] is False


def test_heartbeat_from_unknown_node_is_refused(store):
    core = make_core(store)
    out = req(core, "heartbeat", rid=None, node_id=b"\x02" * 8, available={"CPU": 1})
    assert out.reply is None and out.publications == []
    assert out.notices[0].event == "bad_request"


def test_nodes_alive_before_a_restart_get_a_fresh_timeout(tmp_path):
    path = str(tmp_path / "gcs")
    s = LmdbTableStore(path, map_size=1 << 26)
    _register(make_core(s, now=0.0, timeout=10))
    s.close()
    s = LmdbTableStore(path, map_size=1 << 26)
    core = make_core(s, now=1000.0, timeout=10)
    assert core.tick(1005.0, WALL).publications == []
    assert [p.value["state"] for p in core.tick(1011.0, WALL).publications] == [DEAD]
    s.close()


def test_shard_log_is_trimmed_in_small_steps_and_keeps_its_window(tmp_path):
    from daemons.gcsd.chain import Entry
    from daemons.gcsd.shardstore import ShardStore
    from daemons.gcsd.tables import DEDUP, EncodedPut, encode_value

    def entry(seq: int) -> Entry:
        return Entry(seq, 1, (EncodedPut("kv", b"k%d" % seq, encode_value(seq)),), b"c", seq,
                     {}, (seq,))

    st = ShardStore(str(tmp_path / "s"), log_keep=100)
    for seq in range(1, 301):
        st.persist([entry(seq)])
    # Never more than one trim step (64) beyond the window, never inside it.
    assert 300 - 100 - 64 < st.log_first() <= 201
    assert [e.seq for e in st.entries(201, 300)] == list(range(201, 301))
    assert st.entries(201, 201)[0].ops == entry(201).ops
    dedup_seqs = [seq for _cid, _rid, seq, _res in st.dedup_items()]
    assert min(dedup_seqs) == st.log_first() and max(dedup_seqs) == 300
    st.tables.close()
    # Reopened, it finds where its log starts and goes on trimming from there.
    again = ShardStore(str(tmp_path / "s"), log_keep=100)
    assert again.applied == 300
    for seq in range(301, 501):
        again.persist([entry(seq)])
    assert 500 - 100 - 64 < again.log_first() <= 401
    assert again.tables.get(DEDUP, b"\x00" * 7 + b"\x01") is None  # seq 1 is long gone
    again.tables.close()
