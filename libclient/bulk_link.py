"""The stored-to-stored bulk link: authenticate, agree on fresh keys, then large AES-GCM records.

Theory of operation
-------------------
Object transfers are the one link whose bytes per second matter. TLS 1.3
through Python's ``ssl`` moves ~0.8 GB/s here: every 16 KiB record is one
``SSL_read``/``SSL_write`` call, and the system OpenSSL (3.0) runs AES-GCM
at ~3.5 GB/s. The ``cryptography`` package's OpenSSL runs AES-GCM with
VAES/AVX-512 at ~10 GB/s. Kernel TLS would avoid both, but this kernel
offers no ``tls`` ULP. So the bulk link keeps TLS for what it is good at,
authentication and key agreement, and does its own records:

1. **Authenticate and agree on keys.** With ``encrypt_bulk`` (the default)
   a TLS 1.3 handshake with mutual certificates (the cluster CA, as every
   other raw TCP link) runs over memory BIOs; inside it each side sends 32
   fresh random bytes. Both directions' AES-256-GCM keys are derived from
   the two randoms (HMAC-SHA256), so they are known only to the two ends
   (and forward secret, as the TLS session is). With ``encrypt_bulk =
   false`` the cluster-secret challenge-response
   (:class:`libclient.security.HmacHandshake`) authenticates instead, and
   the keys are derived from the secret and both nonces.
2. **Records.** ``u32 length`` (little-endian, plaintext bytes, at most
   :data:`MAX_RECORD`), then the AES-GCM ciphertext and its 16-byte tag
   (``encrypt_bulk = false``: the plaintext and a GMAC tag over it). Each
   direction has its own key and a counter as nonce, so a replayed,
   reordered, dropped, altered or truncated record fails the tag; GCM's
   length block authenticates the length. A bad tag closes the link.

Handshake bytes are read exactly (whole TLS records, exact HMAC messages),
so nothing that follows the handshake is ever taken for part of it.

:class:`RecordCodec`, :class:`TlsKeyAgreement` and :class:`HmacKeyAgreement`
are pure (bytes in, bytes out); :class:`SealedSocket` drives them over a
socket, blocking or not, with the socket methods the store's loop uses
(``recv``/``recv_into``/``send``/``sendmsg``/``sendall``). Its "would block"
is ``BlockingIOError``; a failed handshake or tag is an ``OSError``
(:class:`~libclient.security.AuthError` / :class:`RecordError`), which the
loops already turn into a closed connection and a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import struct
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from libclient.security import AuthError, HmacHandshake, peer_of

# Big records amortise the per-record cost (Python calls, syscalls) that
# makes TLS's 16 KiB records slow. Measured over loopback (1 GiB, 2 cores):
# 256 KiB records 1.7-2.4 GB/s, 1 MiB 2.6-3.2, 4 MiB 2.9-3.1. 4 MiB is also
# the transfer chunk (daemons/stored/transfer.py), so a chunk is one record.
# Buffers grow to the largest record a link has seen (request links stay small).
MAX_RECORD = 4 * 1024 * 1024
TAG = 16
HEAD = struct.Struct("<I")
_NONCE = struct.Struct("<4xQ")
RANDOM = 32
_TLS_HEAD = 5
_TLS_MAX_BODY = 16384 + 2048  # TLSCiphertext limit (RFC 8446 5.2)


class RecordError(ConnectionError):
    """A bulk record failed its tag or its length: the link cannot be trusted."""


def derive_keys(material: bytes, *, server: bool) -> tuple[bytes, bytes]:
    """(key we send with, key we receive with) from the agreed secret material."""
    c2s = hmac.new(material, b"shoal bulk client->server", hashlib.sha256).digest()
    s2c = hmac.new(material, b"shoal bulk server->client", hashlib.sha256).digest()
    return (s2c, c2s) if server else (c2s, s2c)


class RecordCodec:
    """Seals and opens records of one link direction pair. Pure.

    ``encrypt``: AES-GCM over the payload; otherwise the payload travels as
    it is and the tag is a GMAC over it (authenticated, not secret).
    """

    def __init__(self, key_out: bytes, key_in: bytes, *, encrypt: bool = True) -> None:
        self.encrypt = encrypt
        self._out = AESGCM(key_out)
        self._in = AESGCM(key_in)
        self._seq_out = 0
        self._seq_in = 0

    def seal_into(self, data: memoryview, out: memoryview) -> memoryview:
        """Seal ``data`` (at most MAX_RECORD bytes) as header + ciphertext + tag in ``out``
        (encrypting) or as header + tag in ``out[:4+16]`` with ``data`` in between
        (not encrypting: the caller sends header, data, tag); returns what was written."""
        n = len(data)
        if not 0 < n <= MAX_RECORD:
            raise ValueError(f"a record holds 1..{MAX_RECORD} bytes, not {n}")
        nonce = _NONCE.pack(self._seq_out)
        self._seq_out += 1
        HEAD.pack_into(out, 0, n)
        if self.encrypt:
            self._out.encrypt_into(nonce, data, None, out[HEAD.size:HEAD.size + n + TAG])
            return out[:HEAD.size + n + TAG]
        out[HEAD.size:HEAD.size + TAG] = self._out.encrypt(nonce, b"", data)
        return out[:HEAD.size + TAG]

    @staticmethod
    def record_length(head: memoryview | bytes) -> int:
        """Payload bytes of the record whose header is ``head``.

        Raises:
            RecordError: a length outside 1..MAX_RECORD (before anything is read).
        """
        (n,) = HEAD.unpack(head)
        if not 0 < n <= MAX_RECORD:
            raise RecordError(f"bulk record of {n} bytes outside 1..{MAX_RECORD}")
        return n

    def open_into(self, body: memoryview, dest: memoryview) -> None:
        """Check and decrypt ``body`` (payload + tag) into ``dest`` (exactly the payload).

        Raises:
            RecordError: the tag does not match (altered, replayed, reordered, wrong key).
        """
        nonce = _NONCE.pack(self._seq_in)
        try:
            if self.encrypt:
                self._in.decrypt_into(nonce, body, None, dest)
            else:
                n = len(body) - TAG
                want = self._in.encrypt(nonce, b"", body[:n])
                if not hmac.compare_digest(want, body[n:]):
                    raise InvalidTag()
                dest[:] = body[:n]
        except InvalidTag:
            raise RecordError(f"bulk record {self._seq_in} failed its tag "
                              "(altered, replayed or wrong key)") from None
        self._seq_in += 1


class KeyAgreement(Protocol):
    """A handshake that ends with both directions' keys. Pure."""

    done: bool
    failed: str

    def start(self) -> bytes: ...
    def need(self, have: bytes) -> int: ...
    def feed(self, data: bytes) -> bytes: ...
    def keys(self) -> tuple[bytes, bytes]: ...


class TlsKeyAgreement:
    """TLS 1.3 (mutual certificates) over memory BIOs, then 32 random bytes each way inside it.

    The shell feeds whole TLS records (:meth:`need` says how many bytes make
    the next one), so it never reads past the handshake.
    """

    def __init__(self, ctx: ssl.SSLContext, *, server: bool,
                 random: bytes | None = None) -> None:
        self.server = server
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server)
        self._random = random if random is not None else os.urandom(RANDOM)
        self._peer_random = b""
        self._handshaken = False
        self._sent_random = False
        self.done = False
        self.failed = ""

    def start(self) -> bytes:
        """The client's ClientHello (the server sends nothing first)."""
        return b"" if self.server else self._step()

    def need(self, have: bytes) -> int:
        """Bytes the next TLS record needs in all, given the ``have`` read so far."""
        if len(have) < _TLS_HEAD:
            return _TLS_HEAD
        if not 20 <= have[0] <= 23 or have[1] != 3:  # content type, major version
            self.failed = "not a TLS record"
            return len(have)
        body = int.from_bytes(have[3:5], "big")
        if body > _TLS_MAX_BODY:
            self.failed = f"TLS record of {body} bytes"
            return len(have)
        return _TLS_HEAD + body

    def feed(self, data: bytes) -> bytes:
        """Take one whole TLS record; return the bytes to send."""
        self._in.write(data)
        return self._step()

    def _step(self) -> bytes:
        try:
            if not self._handshaken:
                self._tls.do_handshake()
                self._handshaken = True
            if not self.server and not self._sent_random:
                self._tls.write(self._random)
                self._sent_random = True
            while len(self._peer_random) < RANDOM:
                self._peer_random += self._tls.read(RANDOM - len(self._peer_random))
            if self.server and not self._sent_random:
                self._tls.write(self._random)
                self._sent_random = True
            self.done = True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLError as exc:
            self.failed = f"TLS: {exc.reason or exc}"
        return self._out.read()

    def keys(self) -> tuple[bytes, bytes]:
        cr, sr = ((self._peer_random, self._random) if self.server
                  else (self._random, self._peer_random))
        return derive_keys(cr + sr, server=self.server)


class HmacKeyAgreement:
    """The cluster-secret challenge-response (``encrypt_bulk = false``), read exactly."""

    def __init__(self, secret: bytes, *, server: bool, nonce: bytes | None = None) -> None:
        self._hs = HmacHandshake(secret, server=server, nonce=nonce)
        self.server = server
        self._secret = secret
        self._step = 0

    @property
    def done(self) -> bool:
        return self._hs.done

    @property
    def failed(self) -> str:
        return self._hs.failed

    def start(self) -> bytes:
        return self._hs.start()

    def need(self, have: bytes) -> int:
        if not self.server:
            return 32 + 32  # server nonce + its MAC
        return 8 + 32 if self._step == 0 else 32  # magic + client nonce, then its MAC

    def feed(self, data: bytes) -> bytes:
        self._step += 1
        out, rest = self._hs.feed(data)
        if rest and not self._hs.failed:
            self._hs.failed = "bytes after the handshake"
        return out

    def keys(self) -> tuple[bytes, bytes]:
        hs = self._hs
        cn, sn = (hs.peer_nonce, hs.nonce) if self.server else (hs.nonce, hs.peer_nonce)
        material = hmac.new(self._secret, b"shoal bulk keys" + cn + sn, hashlib.sha256).digest()
        return derive_keys(material, server=self.server)


_HEAD_STATE, _BODY_STATE = 0, 1


class SealedSocket:
    """A socket that runs a :class:`KeyAgreement`, then carries :class:`RecordCodec` records.

    Non-blocking like the socket beneath (or blocking, with its timeout).
    ``send`` follows OpenSSL's contract: a record partly written is finished
    by the next ``send``, which must be given the same leading bytes, and
    reports them then. ``pending`` is plaintext already opened but not yet
    read (a loop that stops reading early must read it: the selector will
    not report it).
    """

    def __init__(self, sock: socket.socket, agreement: KeyAgreement, *,
                 encrypt: bool) -> None:
        self._sock = sock
        self._agree: KeyAgreement | None = agreement
        self._encrypt = encrypt
        self._codec: RecordCodec | None = None
        self._hs_buf = b""
        self._out: list[memoryview] = []
        self._out_plain = 0  # plaintext bytes the record in _out stands for
        # Bytes the kernel took, records in part included: a server tells a
        # slow reader (this grows) from a stopped one, though send() counts a
        # 4 MiB record only once all of it has left.
        self.wire_sent = 0
        hello = agreement.start()
        if hello:
            self._out.append(memoryview(hello))
        self._seal_buf = memoryview(bytearray(0))  # grows to the largest record sent
        self._head = memoryview(bytearray(HEAD.size))
        self._body = memoryview(bytearray(0))  # grows to the largest record seen
        self._state = _HEAD_STATE
        self._pos = 0
        self._need = HEAD.size
        self._left = memoryview(b"")  # opened plaintext not yet read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SealedSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pending(self) -> int:
        return len(self._left)

    @property
    def established(self) -> bool:
        return self._codec is not None

    # ------------------------------------------------------------ handshake
    def _progress(self) -> None:
        """Advance the key agreement as far as the socket allows now.

        Raises:
            BlockingIOError: not done yet.
            AuthError: it failed (any socket error meanwhile counts as failing).
        """
        try:
            self._agree_now()
        except (BlockingIOError, InterruptedError, AuthError):
            raise
        except OSError as exc:
            raise AuthError(f"bulk link handshake with {peer_of(self._sock)} failed: "
                            f"{exc}") from None

    def _agree_now(self) -> None:
        agree = self._agree
        assert agree is not None
        self._flush()
        while not agree.done:
            need = agree.need(self._hs_buf)
            if agree.failed:
                raise AuthError(f"bulk link with {peer_of(self._sock)}: {agree.failed}")
            if len(self._hs_buf) < need:
                data = self._sock.recv(need - len(self._hs_buf))  # BlockingIOError: not yet
                if not data:
                    raise AuthError(f"{peer_of(self._sock)} closed during the handshake")
                self._hs_buf += data
                continue
            record, self._hs_buf = self._hs_buf, b""
            out = agree.feed(record)
            if agree.failed:
                raise AuthError(f"bulk link with {peer_of(self._sock)}: {agree.failed}")
            if out:
                self._out.append(memoryview(out))
            self._flush()
        self._codec = RecordCodec(*agree.keys(), encrypt=self._encrypt)
        self._agree = None
        self._flush()

    def handshake_blocking(self, timeout: float) -> None:
        """Run the whole handshake now, at most ``timeout`` s.

        Raises:
            AuthError: it failed or timed out (the socket is closed).
        """
        saved = self._sock.gettimeout()
        self._sock.settimeout(timeout)
        try:
            self._progress()
        except OSError as exc:
            self._sock.close()
            if isinstance(exc, AuthError):
                raise
            raise AuthError(f"handshake with {peer_of(self._sock)} failed: {exc}") from None
        finally:
            if self._sock.fileno() >= 0:
                self._sock.settimeout(saved)

    def _flush(self) -> None:
        out = self._out
        while out:
            n = self._sock.sendmsg(out)  # BlockingIOError passes up
            self.wire_sent += n
            while n:
                if n < len(out[0]):
                    out[0] = out[0][n:]
                    break
                n -= len(out[0])
                out.pop(0)

    # ------------------------------------------------------------ receiving
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if flags:
            raise ValueError("recv flags are not supported on a bulk link")
        if self._codec is None:
            self._progress()
        view = memoryview(buffer).cast("B")
        if nbytes:
            view = view[:nbytes]
        if not len(view):
            return 0
        if self._left:
            n = min(len(view), len(self._left))
            view[:n] = self._left[:n]
            self._left = self._left[n:]
            return n
        sock = self._sock
        if self._state == _HEAD_STATE:
            while self._pos < HEAD.size:
                got = sock.recv_into(self._head[self._pos:])  # BlockingIOError passes up
                if not got:
                    if self._pos:
                        raise RecordError(f"{peer_of(sock)} cut a record header short")
                    return 0
                self._pos += got
            self._need = RecordCodec.record_length(self._head) + TAG
            self._state, self._pos = _BODY_STATE, 0
            if len(self._body) < self._need:
                self._body = memoryview(bytearray(self._need))
        body = self._body
        while self._pos < self._need:
            got = sock.recv_into(body[self._pos:self._need])
            if not got:
                raise RecordError(f"{peer_of(sock)} cut a record short")
            self._pos += got
        n = self._need - TAG
        self._state, self._pos = _HEAD_STATE, 0
        codec = self._codec
        assert codec is not None
        if len(view) >= n:
            codec.open_into(body[:self._need], view[:n])
            return n
        plain = memoryview(bytearray(n))
        codec.open_into(body[:self._need], plain)
        k = len(view)
        view[:] = plain[:k]
        self._left = plain[k:]
        return k

    def recv(self, n: int, flags: int = 0) -> bytes:
        buf = bytearray(n)
        k = self.recv_into(buf, 0, flags)
        return bytes(buf[:k])

    # ------------------------------------------------------------ sending
    def send(self, data: Any, flags: int = 0) -> int:
        if flags:
            raise ValueError("send flags are not supported on a bulk link")
        if self._codec is None:
            self._progress()
        if self._out:  # the record the last call began
            self._flush()
            n, self._out_plain = self._out_plain, 0
            return n
        view = memoryview(data).cast("B")
        if not len(view):
            return 0
        view = view[:MAX_RECORD]
        if len(self._seal_buf) < HEAD.size + len(view) + TAG:
            self._seal_buf = memoryview(bytearray(HEAD.size + len(view) + TAG))
        codec = self._codec
        assert codec is not None
        sealed = codec.seal_into(view, self._seal_buf)
        if codec.encrypt:
            self._out = [sealed]
        else:
            self._out = [sealed[:HEAD.size], view, sealed[HEAD.size:]]
        self._out_plain = len(view)
        self._flush()  # BlockingIOError: the rest goes with the next send
        self._out_plain = 0
        return len(view)

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            view = view[self.send(view):]
        while self._out:
            self.send(b"")

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        """Send ``buffers`` in turn, a record at a time; bytes sent, or BlockingIOError."""
        if args and args[0]:
            raise OSError("descriptors cannot travel over a bulk link")
        total = 0
        for buf in buffers:
            view = memoryview(buf).cast("B")
            while len(view):
                try:
                    n = self.send(view)
                except BlockingIOError:
                    if total:
                        return total
                    raise
                total += n
                view = view[n:]
        return total


def server_socket(sock: socket.socket, keys: Any) -> SealedSocket:
    """Wrap an accepted socket; the handshake runs inside its first reads."""
    agreement: KeyAgreement = (TlsKeyAgreement(keys.server_context(), server=True)
                               if keys.encrypt_bulk
                               else HmacKeyAgreement(keys.secret, server=True))
    return SealedSocket(sock, agreement, encrypt=keys.encrypt_bulk)


def client_socket(sock: socket.socket, keys: Any) -> SealedSocket:
    """Wrap a connected socket as the client (the handshake begins with its first use)."""
    agreement: KeyAgreement = (TlsKeyAgreement(keys.client_context(), server=False)
                               if keys.encrypt_bulk
                               else HmacKeyAgreement(keys.secret, server=False))
    return SealedSocket(sock, agreement, encrypt=keys.encrypt_bulk)
