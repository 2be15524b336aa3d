"""The stored-to-stored bulk link (libclient/bulk_link.py): key agreement, records, both modes.

Units drive the pure codec and key agreements in memory and the socket
shell over real sockets; the cluster tests run real daemons with
``encrypt_bulk = false`` (authenticated, GMAC-checked, unencrypted).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest

import libclient as ray
from libclient import bulk_link, security
from libclient.cluster_utils import Cluster
from libclient.gcs_client import GcsClient
from libclient.protocol import FrameDecoder, pack

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    return security.keygen(str(tmp_path_factory.mktemp("bulk") / "keys"))


def _keys(directory: str, encrypt: bool) -> security.ClusterKeys:
    return security.load(directory, encrypt_bulk=encrypt)


# ------------------------------------------------------------------ pure units
def _codecs(encrypt: bool) -> tuple[bulk_link.RecordCodec, bulk_link.RecordCodec]:
    k1, k2 = os.urandom(32), os.urandom(32)
    return (bulk_link.RecordCodec(k1, k2, encrypt=encrypt),
            bulk_link.RecordCodec(k2, k1, encrypt=encrypt))


def _seal(codec: bulk_link.RecordCodec, data: bytes) -> bytes:
    out = memoryview(bytearray(len(data) + 64))
    sealed = codec.seal_into(memoryview(data), out)
    if codec.encrypt:
        return bytes(sealed)
    return bytes(sealed[:4]) + data + bytes(sealed[4:])  # what the socket sends


def _open(codec: bulk_link.RecordCodec, record: bytes) -> bytes:
    n = codec.record_length(record[:4])
    dest = memoryview(bytearray(n))
    codec.open_into(memoryview(record[4:]), dest)
    return bytes(dest)


@pytest.mark.parametrize("encrypt", [True, False])
def test_records_round_trip_and_hide_the_payload_only_when_encrypting(encrypt):
    a, b = _codecs(encrypt)
    payload = b"secret object bytes " * 100
    records = [_seal(a, payload), _seal(a, b"second")]
    assert (payload in records[0]) is not encrypt
    assert _open(b, records[0]) == payload
    assert _open(b, records[1]) == b"second"


@pytest.mark.parametrize("encrypt", [True, False])
def test_a_tampered_replayed_or_reordered_record_fails_its_tag(encrypt):
    a, b = _codecs(encrypt)
    first = _seal(a, b"x" * 1000)
    for i in (4, 500, len(first) - 1):  # payload start, middle, tag
        bad = bytearray(first)
        bad[i] ^= 0x01
        with pytest.raises(bulk_link.RecordError):
            _open(b, bytes(bad))
    # b's counter is still at record 0: the untouched record opens...
    assert _open(b, first) == b"x" * 1000
    with pytest.raises(bulk_link.RecordError):  # ...and a replay of it does not
        _open(b, first)
    a2, b2 = _codecs(encrypt)
    _seal(a2, b"0")
    r1 = _seal(a2, b"1")
    with pytest.raises(bulk_link.RecordError):  # out of order
        _open(b2, r1)


def test_a_record_length_past_the_limit_is_refused_before_reading_it():
    with pytest.raises(bulk_link.RecordError):
        bulk_link.RecordCodec.record_length((bulk_link.MAX_RECORD + 1).to_bytes(4, "little"))
    with pytest.raises(bulk_link.RecordError):
        bulk_link.RecordCodec.record_length((0xFFFFFFFF).to_bytes(4, "little"))
    with pytest.raises(bulk_link.RecordError):
        bulk_link.RecordCodec.record_length(b"\0\0\0\0")


def _agree(client, server) -> None:
    """Run two key agreements against each other in memory, record by record."""
    to_server, to_client = client.start(), b""
    for _ in range(50):
        for agreement, inbox_name in ((server, "to_server"), (client, "to_client")):
            inbox = to_server if inbox_name == "to_server" else to_client
            while inbox and not agreement.failed:
                n = agreement.need(inbox)
                if len(inbox) < n:
                    break
                out = agreement.feed(inbox[:n])
                inbox = inbox[n:]
                if agreement is server:
                    to_client += out
                else:
                    to_server += out
            if inbox_name == "to_server":
                to_server = inbox
            else:
                to_client = inbox
        if (client.done and server.done) or client.failed or server.failed:
            return


def test_tls_key_agreement_gives_both_ends_the_same_fresh_keys(keys_dir, tmp_path):
    keys = _keys(keys_dir, True)
    c = bulk_link.TlsKeyAgreement(keys.client_context(), server=False)
    s = bulk_link.TlsKeyAgreement(keys.server_context(), server=True)
    _agree(c, s)
    assert c.done and s.done and not c.failed and not s.failed
    c_out, c_in = c.keys()
    s_out, s_in = s.keys()
    assert (c_out, c_in) == (s_in, s_out) and c_out != c_in
    c2 = bulk_link.TlsKeyAgreement(keys.client_context(), server=False)
    s2 = bulk_link.TlsKeyAgreement(keys.server_context(), server=True)
    _agree(c2, s2)
    assert c2.keys() != c.keys()  # fresh per connection
    # A certificate from another CA is refused by the server.
    other = _keys(security.keygen(str(tmp_path / "other")), True)
    c3 = bulk_link.TlsKeyAgreement(other.client_context(), server=False)
    s3 = bulk_link.TlsKeyAgreement(keys.server_context(), server=True)
    _agree(c3, s3)
    assert not (c3.done and s3.done)
    assert s3.failed or c3.failed


def test_hmac_key_agreement_needs_the_cluster_secret(keys_dir):
    keys = _keys(keys_dir, False)
    c = bulk_link.HmacKeyAgreement(keys.secret, server=False)
    s = bulk_link.HmacKeyAgreement(keys.secret, server=True)
    _agree(c, s)
    assert c.done and s.done
    assert c.keys() == tuple(reversed(s.keys()))
    c = bulk_link.HmacKeyAgreement(os.urandom(32), server=False)
    s = bulk_link.HmacKeyAgreement(keys.secret, server=True)
    _agree(c, s)
    # The client checks the server's proof first: neither end gets keys.
    assert c.failed == "server does not know the cluster secret"
    assert not c.done and not s.done


# ------------------------------------------------------------------ sockets
class _Relay:
    """A TCP relay that records what passes and may flip one byte of client->server
    traffic at a given offset (an on-path attacker)."""

    def __init__(self, target: tuple[str, int], flip_at: int | None = None) -> None:
        self.listen = socket.create_server(("127.0.0.1", 0))
        self.address = self.listen.getsockname()
        self.target = target
        self.flip_at = flip_at
        self.seen = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                if record:
                    start = len(self.seen)
                    self.seen += data
                    if self.flip_at is not None and start <= self.flip_at < len(self.seen):
                        data = bytearray(data)
                        data[self.flip_at - start] ^= 0x40
                        data = bytes(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run(self) -> None:
        a, _ = self.listen.accept()
        b = socket.create_connection(self.target)
        t = threading.Thread(target=self._pipe, args=(b, a, False), daemon=True)
        t.start()
        self._pipe(a, b, True)
        t.join(5)
        a.close()
        b.close()

    def close(self) -> None:
        self.listen.close()
        self.thread.join(5)


def _server(keys: security.ClusterKeys, total: int, box: dict) -> tuple[socket.socket,
                                                                        threading.Thread]:
    """Accept one bulk client, read ``total`` bytes (or an error), answer b"ok"."""
    listen = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        raw, _ = listen.accept()
        raw.setblocking(False)  # as stored serves: the handshake runs in the reads
        sock = security.server_wrap(raw, keys, bulk=True)
        got = bytearray()
        buf = memoryview(bytearray(3 << 20))
        deadline = time.monotonic() + 20
        try:
            while len(got) < total and time.monotonic() < deadline:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    time.sleep(0.0005)
                    continue
                if not n:
                    break
                got += buf[:n]
            box["data"] = bytes(got)
            raw.setblocking(True)
            sock.sendall(b"ok")
        except OSError as exc:
            box["error"] = exc
        finally:
            sock.close()

    t = threading.Thread(target=run)
    t.start()
    return listen, t


@pytest.mark.parametrize("encrypt", [True, False])
def test_a_bulk_link_moves_large_data_exactly_and_hides_it_when_encrypting(keys_dir, encrypt):
    keys = _keys(keys_dir, encrypt)
    data = os.urandom(9 << 20) + b"MARKER-IN-THE-CLEAR" * 1000
    box: dict = {}
    listen, t = _server(keys, len(data), box)
    relay = _Relay(listen.getsockname())
    with security.connect(relay.address, 5.0, keys, bulk=True) as sock:
        sock.sendmsg([b"head", memoryview(data)[:100]])  # a frame then a payload, as stored
        sock.sendall(memoryview(data)[100:])
        sock.settimeout(20)
        assert sock.recv(10) == b"ok"
    t.join(20)
    relay.close()
    listen.close()
    assert box.get("data") == b"head" + data[:100] + data[100:]
    assert (b"MARKER-IN-THE-CLEAR" in relay.seen) is not encrypt


@pytest.mark.parametrize("encrypt", [True, False])
def test_bulk_bytes_altered_on_the_wire_are_detected(keys_dir, encrypt):
    keys = _keys(keys_dir, encrypt)
    data = b"\x00" * (3 << 20)
    box: dict = {}
    listen, t = _server(keys, len(data), box)
    # Past the handshake (a few KiB at most), inside the first record's payload.
    relay = _Relay(listen.getsockname(), flip_at=64 * 1024)
    with security.connect(relay.address, 5.0, keys, bulk=True) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
    t.join(20)
    relay.close()
    listen.close()
    assert isinstance(box.get("error"), bulk_link.RecordError), box
    assert "failed its tag" in str(box["error"])


@pytest.mark.parametrize("encrypt", [True, False])
def test_a_bulk_peer_without_the_keys_is_refused(keys_dir, tmp_path, encrypt):
    keys = _keys(keys_dir, encrypt)
    other = _keys(security.keygen(str(tmp_path / "other")), encrypt)
    box: dict = {}
    listen, t = _server(keys, 10, box)
    with pytest.raises(security.AuthError):
        security.connect(listen.getsockname(), 5.0, other, bulk=True)
    t.join(20)
    assert isinstance(box.get("error"), security.AuthError)
    listen.close()
    box = {}
    listen, t = _server(keys, 10, box)  # no keys at all: plain bytes
    with socket.create_connection(listen.getsockname(), timeout=5) as plain:
        plain.sendall(pack({"t": "stat", "r": 1, "oid": b"x" * 20}) * 10)
        try:
            assert plain.recv(100) == b""
        except ConnectionError:
            pass
    t.join(20)
    assert isinstance(box.get("error"), security.AuthError)
    listen.close()


# ------------------------------------------------------------------ real daemons
@pytest.fixture(scope="module")
def plain_bulk_cluster():
    """Two nodes with keys and ``encrypt_bulk = false`` (through the environment)."""
    saved = os.environ.get(security.ENCRYPT_BULK_ENV)
    os.environ[security.ENCRYPT_BULK_ENV] = "0"
    security.reset()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        c.add_node(num_cpus=1)
        c.connect()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop(security.ENCRYPT_BULK_ENV, None)
        else:
            os.environ[security.ENCRYPT_BULK_ENV] = saved
        security.reset()


@ray.remote(num_cpus=1)
def _checksum(a):
    return int(np.asarray(a, dtype=np.uint64).sum()), len(a)


@ray.remote(num_cpus=1)
def _make(n):
    return np.arange(n, dtype=np.uint32)


def _store_address(c: Cluster) -> tuple[str, int]:
    with GcsClient(c.head_node.address, timeout=10) as gcs:
        node = next(n for n in gcs.get_nodes()
                    if n.get("state") == "ALIVE" and n["resources"].get("CPU", 0) > 0)
    host, _, port = node["store_address"].rpartition(":")
    return host, int(port)


def _stat(sock: socket.socket) -> dict | None:
    sock.sendall(pack({"t": "stat", "r": 1, "oid": b"\x01" * 20}))
    dec = FrameDecoder()
    sock.settimeout(10)
    while True:
        try:
            data = sock.recv(4096)
        except (OSError, ssl.SSLError):
            return None
        if not data:
            return None
        dec.feed(data)
        msg = dec.next()
        if msg is not None:
            return msg


def test_objects_cross_nodes_with_authenticated_unencrypted_bulk(plain_bulk_cluster):
    assert security.current().encrypt_bulk is False
    a = np.arange(5_000_000, dtype=np.uint32)  # 20 MB on the head, read on the worker node
    ref = ray.put(a)
    assert ray.get(_checksum.remote(ref), timeout=60) == (int(a.sum(dtype=np.uint64)), len(a))
    b = ray.get(_make.remote(3_000_000), timeout=60)  # made there, pulled here
    assert np.array_equal(b, np.arange(3_000_000, dtype=np.uint32))


def test_the_unencrypted_bulk_port_still_refuses_strangers(plain_bulk_cluster, tmp_path):
    address = _store_address(plain_bulk_cluster)
    keys = security.current()
    with security.connect(address, 5.0, keys, bulk=True) as member:  # the cluster's secret
        reply = _stat(member)
        assert reply is not None and reply["t"] == "error" and reply["error"] == "not_found"
    with socket.create_connection(address, timeout=5) as plain:  # no keys
        assert _stat(plain) is None
    wrong = _keys(security.keygen(str(tmp_path / "wrong")), False)
    with pytest.raises(security.AuthError):
        security.connect(address, 5.0, wrong, bulk=True)
    # A TLS client (the encrypting mode's handshake) is not taken for a member either.
    with pytest.raises(OSError):
        with security.connect(address, 5.0, _keys(keys.directory, True), bulk=True) as tls:
            if _stat(tls) is None:
                raise ConnectionError("refused")
    # A member's request altered on the wire closes that connection; the store serves on.
    raw = socket.create_connection(address, timeout=5)
    sealed = security.client_wrap(raw, keys, bulk=True)
    frame = pack({"t": "stat", "r": 1, "oid": b"\x02" * 20})
    codec = sealed._codec
    record = _seal(codec, frame)
    tampered = bytearray(record)
    tampered[10] ^= 0x01
    raw.sendall(bytes(tampered))
    raw.settimeout(10)
    try:
        assert raw.recv(4096) == b""
    except ConnectionError:
        pass
    raw.close()
    with security.connect(address, 5.0, keys, bulk=True) as member:
        reply = _stat(member)
        assert reply is not None and reply["error"] == "not_found"
