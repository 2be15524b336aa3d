"""Cluster key material and the authenticated, encrypted links between hosts.

Theory of operation
-------------------
Every TCP link between Shoal processes proves it belongs to the cluster
before a message on it is acted on. One key directory per cluster
(:func:`keygen`, ``shoal keygen DIR``) holds:

=================  ==========================================================
``ca.crt``         the cluster CA certificate(s): the trust anchor of TLS
``ca.key``         the CA's private key; only :func:`keygen` needs it
``node.crt/.key``  the certificate every process presents (signed by the CA)
``curve.public``   the cluster's ZeroMQ CURVE keypair (z85): gcsd's server key
``curve.secret``   and every client's key
``curve.trusted``  optional: more CURVE public keys gcsd accepts (rotation)
``cluster.secret`` 32 random bytes (hex) for the HMAC handshake of bulk links
                   that authenticate but do not encrypt (``[security] encrypt_bulk``)
=================  ==========================================================

Which mechanism where (measured, docs/benchmarks.md): ZeroMQ links (gcsd
requests, pub-sub, chain and master) use CURVE, checked by a ZAP handler
(:func:`start_zap`) that admits only the cluster's public keys. Raw TCP
links (raylet, worker and actor ports, stored transfer) use TLS 1.3 with
mutual certificate authentication against the cluster CA (AES-GCM).

:class:`TlsSocket` is an :class:`ssl.SSLSocket` whose "would block" is a
:class:`BlockingIOError`, like a plain non-blocking socket's, and whose
``sendmsg`` sends the buffers in turn; so the daemons' selector loops serve
it unchanged. A server wraps an accepted socket without a handshake; the
handshake happens inside its first reads, so one silent or hostile peer
never blocks a daemon's loop. Clients handshake at connect (blocking, with a
deadline). A peer that fails the handshake raises :class:`ssl.SSLError`
(an ``OSError``) from ``recv``, which every loop already turns into a
closed connection and a log line with the peer address.

:class:`HmacHandshake` is the pure state machine of the cluster-secret
handshake (challenge-response with nonces both ways, so a replayed handshake
fails). The stored-to-stored bulk link (``bulk=True``) authenticates with
TLS (or, with ``encrypt_bulk = false``, this handshake), then carries large
AES-GCM records of its own: :mod:`libclient.bulk_link`.

Private key files must not be readable by group or others (as ssh demands):
:func:`load` refuses them, naming the file.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import hmac
import os
import select
import selectors
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

KEYS_ENV = "SHOAL_SECURITY_KEYS_DIR"
ENCRYPT_BULK_ENV = "SHOAL_SECURITY_ENCRYPT_BULK"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
NODE_CERT, NODE_KEY = "node.crt", "node.key"
CURVE_PUBLIC, CURVE_SECRET, CURVE_TRUSTED = "curve.public", "curve.secret", "curve.trusted"
CLUSTER_SECRET = "cluster.secret"
PRIVATE_FILES = (NODE_KEY, CURVE_SECRET, CLUSTER_SECRET, CA_KEY)
HANDSHAKE_TIMEOUT_S = 5.0


class SecurityError(Exception):
    """Key material is missing, malformed or too open; daemons refuse to start."""


class AuthError(ConnectionError):
    """A peer failed authentication."""


# ------------------------------------------------------------------ keygen
def keygen(directory: str, *, days: int = 3650, name: str = "shoal-cluster",
           ca_dir: str | None = None) -> str:
    """Make everything a cluster needs in ``directory`` (created 0700, files 0600).

    With ``ca_dir``, reuse that directory's CA (``ca.crt``, ``ca.key``) to
    issue a new node certificate (rotation of the node key under one CA).
    Returns the directory. Existing files are replaced.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    if ca_dir is not None:
        with open(os.path.join(ca_dir, CA_KEY), "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
        with open(os.path.join(ca_dir, CA_CERT), "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
    node_key = ec.generate_private_key(ec.SECP256R1())
    node_cert = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                 .issuer_name(ca_cert.subject).public_key(node_key.public_key())
                 .serial_number(x509.random_serial_number())
                 .not_valid_before(start).not_valid_after(end)
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                       ExtendedKeyUsageOID.CLIENT_AUTH]),
                                critical=False)
                 .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()

    import zmq

    curve_public, curve_secret = zmq.curve_keypair()
    files = {
        CA_CERT: ca_cert.public_bytes(pem),
        CA_KEY: ca_key.private_bytes(pem, pkcs8, plain),
        NODE_CERT: node_cert.public_bytes(pem),
        NODE_KEY: node_key.private_bytes(pem, pkcs8, plain),
        CURVE_PUBLIC: curve_public + b"\n",
        CURVE_SECRET: curve_secret + b"\n",
        CLUSTER_SECRET: os.urandom(32).hex().encode() + b"\n",
    }
    if ca_dir is not None and os.path.abspath(ca_dir) != os.path.abspath(directory):
        del files[CA_KEY]  # a node's directory needs no CA key
    for fname, data in files.items():
        _write_private(os.path.join(directory, fname), data)
    return directory


def _write_private(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ------------------------------------------------------------------ loading
def check_private(path: str) -> None:
    """Refuse a private key file that group or others may read or write (as ssh does).

    Raises:
        SecurityError: naming the file and its mode.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SecurityError(f"cannot read key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise SecurityError(f"key file {path} is accessible by group or others "
                            f"(mode {mode & 0o777:o}); run: chmod 600 {path}")


@dataclass
class ClusterKeys:
    """One cluster's loaded key material, and the TLS contexts made from it."""

    directory: str
    curve_public: bytes
    curve_secret: bytes
    curve_trusted: frozenset[bytes]
    secret: bytes
    encrypt_bulk: bool = True
    _server: ssl.SSLContext | None = field(default=None, repr=False)
    _client: ssl.SSLContext | None = field(default=None, repr=False)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3 server side: our certificate, and the client's required (mutual)."""
        if self._server is None:
            self._server = self._context(ssl.PROTOCOL_TLS_SERVER)
        return self._server

    def client_context(self) -> ssl.SSLContext:
        if self._client is None:
            self._client = self._context(ssl.PROTOCOL_TLS_CLIENT)
        return self._client

    def _context(self, protocol: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # Peers are named by address, not host name; what proves membership
        # is a certificate that the cluster CA signed.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=self.path(CA_CERT))
            ctx.load_cert_chain(self.path(NODE_CERT), self.path(NODE_KEY))
        except (OSError, ssl.SSLError) as exc:
            raise SecurityError(f"bad TLS key material in {self.directory}: {exc}") from None
        ctx.sslsocket_class = TlsSocket
        return ctx


def load(directory: str, *, encrypt_bulk: bool = True) -> ClusterKeys:
    """Read and check a key directory (see the module docstring).

    Raises:
        SecurityError: a file is missing, malformed or readable by others.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise SecurityError(f"key directory {directory} does not exist "
                            f"(make one with: shoal keygen {directory})")
    for fname in PRIVATE_FILES:
        path = os.path.join(directory, fname)
        if fname == CA_KEY and not os.path.exists(path):
            continue  # nodes need not hold the CA key
        check_private(path)
    for fname in (CA_CERT, NODE_CERT, CURVE_PUBLIC):
        if not os.path.isfile(os.path.join(directory, fname)):
            raise SecurityError(f"key directory {directory} lacks {fname}")

    def read(fname: str) -> bytes:
        with open(os.path.join(directory, fname), "rb") as f:
            return f.read().strip()

    public, secret_key = read(CURVE_PUBLIC), read(CURVE_SECRET)
    if len(public) != 40 or len(secret_key) != 40:
        raise SecurityError(f"{directory}: CURVE keys must be 40 z85 characters")
    trusted = {public}
    if os.path.exists(os.path.join(directory, CURVE_TRUSTED)):
        trusted |= {line.strip() for line in read(CURVE_TRUSTED).splitlines() if line.strip()}
    try:
        secret = bytes.fromhex(read(CLUSTER_SECRET).decode())
    except ValueError:
        raise SecurityError(f"{directory}/{CLUSTER_SECRET} is not hex") from None
    if len(secret) < 16:
        raise SecurityError(f"{directory}/{CLUSTER_SECRET} is shorter than 16 bytes")
    keys = ClusterKeys(directory, public, secret_key, frozenset(trusted), secret, encrypt_bulk)
    keys.server_context()
    keys.client_context()
    return keys


_current: ClusterKeys | None = None
_current_loaded = False
_lock = threading.Lock()


def current() -> ClusterKeys | None:
    """This process's cluster keys: from ``$SHOAL_SECURITY_KEYS_DIR`` (set by the
    raylet for its workers, by the embedded cluster, or by the user), or from
    the host config's ``[security] keys_dir``; None if neither names one."""
    global _current, _current_loaded
    with _lock:
        if not _current_loaded:
            directory = os.environ.get(KEYS_ENV, "")
            encrypt = os.environ.get(ENCRYPT_BULK_ENV, "1").lower() not in ("0", "false", "no")
            if not directory:
                directory, encrypt = _from_host_config(encrypt)
            _current = load(directory, encrypt_bulk=encrypt) if directory else None
            _current_loaded = True
        return _current


def _from_host_config(encrypt: bool) -> tuple[str, bool]:
    from libclient import hostconfig

    path = hostconfig.config_path(None, os.environ)
    if path is None:
        return "", encrypt
    try:
        conf = hostconfig.resolve(path, os.environ)
    except hostconfig.ConfigError:
        return "", encrypt
    sec = conf["security"]
    return sec["keys_dir"], sec["encrypt_bulk"]


def use(keys: ClusterKeys | None) -> None:
    """Set this process's keys (the daemons, from their config; tests)."""
    global _current, _current_loaded
    with _lock:
        _current, _current_loaded = keys, True


def reset() -> None:
    """Forget the keys, so the next :func:`current` reads the environment again."""
    global _current, _current_loaded
    with _lock:
        _current, _current_loaded = None, False


# ------------------------------------------------------------- TLS sockets
_WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class TlsSocket(ssl.SSLSocket):
    """An SSLSocket that reports "would block" as BlockingIOError, like a plain socket.

    Our loops already handle BlockingIOError; SSLWantReadError is an
    OSError that they would take for a failure.
    """

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if flags:
            return self._recv_flags(buflen, flags)
        try:
            data = super().recv(buflen)
        except _WOULD_BLOCK:
            raise BlockingIOError(errno.EAGAIN, "TLS record incomplete") from None
        except ssl.SSLError as exc:
            raise self._failed(exc) from None
        if 0 < len(data) < buflen:
            skip = getattr(self, "_drain_skip", 0)
            if skip:
                self._drain_skip = skip - 1
                return data
            return self._drain(data, buflen)
        return data

    def _drain(self, first: bytes, buflen: int) -> bytes:
        """``first`` plus every further record that is already here, up to ``buflen``.

        One ``SSL_read`` returns one TLS record. A peer that sends many small
        frames (calls, replies) sends many records, and handing them to the
        caller's loop one at a time cost ~2x the CPU per remote call of a
        plain socket, whose one ``recv`` returns all of them. A drain that
        finds nothing costs a syscall, so misses back off (:meth:`_drain_missed`)
        and a hit resets that. Never blocks:
        a blocking socket is checked with ``poll`` first and read
        non-blocking; a partly arrived record stays in OpenSSL for next time.
        """
        nonblocking = self.gettimeout() == 0.0
        if not nonblocking and not self.pending() and not _readable_now(self):
            self._drain_missed()
            return first
        parts, have = [first], len(first)
        if not nonblocking:
            saved = self.gettimeout()
            self.settimeout(0.0)
        try:
            while have < buflen:
                try:
                    more = super().recv(buflen - have)
                except (ssl.SSLError, OSError):
                    break  # would block, or a failure the next recv reports
                if not more:
                    break
                parts.append(more)
                have += len(more)
        finally:
            if not nonblocking:
                self.settimeout(saved)
        if len(parts) == 1:
            self._drain_missed()
            return first
        self._drain_misses = 0
        return b"".join(parts)

    def _drain_missed(self) -> None:
        """A drain found nothing more: one call at a time (synchronous calls)
        pays a syscall per read for it, so back off (1, 2, 4 ... 32 reads)."""
        misses = getattr(self, "_drain_misses", 0) + 1
        self._drain_misses = misses
        self._drain_skip = min(1 << (misses - 1), 32)

    def _failed(self, exc: ssl.SSLError) -> OSError:
        """A failed handshake names the peer (the daemons log it as refused)."""
        if self.version() is None:
            return AuthError(f"TLS handshake from {peer_of(self)} failed: "
                             f"{exc.reason or exc}")
        return exc

    def _recv_flags(self, buflen: int, flags: int) -> bytes:
        """MSG_DONTWAIT on a blocking socket; MSG_PEEK never sees anything (peeking
        would mean decrypting, and a signal handler must not re-enter OpenSSL)."""
        if flags & socket.MSG_PEEK:
            raise BlockingIOError(errno.EAGAIN, "cannot peek into a TLS stream")
        if flags & ~socket.MSG_DONTWAIT:
            raise ValueError(f"recv flags {flags:#x} are not supported over TLS")
        if self.gettimeout() == 0.0:
            return self.recv(buflen)
        if not self.pending() and not _readable_now(self):
            raise BlockingIOError(errno.EAGAIN, "nothing to read")
        saved = self.gettimeout()
        self.settimeout(0.0)
        try:
            return self.recv(buflen)
        finally:
            self.settimeout(saved)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, nbytes or 0, flags)
        except _WOULD_BLOCK:
            raise BlockingIOError(errno.EAGAIN, "TLS record incomplete") from None
        except ssl.SSLError as exc:
            raise self._failed(exc) from None

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except _WOULD_BLOCK:
            raise BlockingIOError(errno.EAGAIN, "TLS send would block") from None

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0,
                address: Any = None) -> int:
        """Send ``buffers`` in turn (TLS has no scatter-gather write)."""
        if ancdata:
            raise OSError(errno.EINVAL, "descriptors cannot travel over TLS")
        total = 0
        for buf in buffers:
            try:
                n = self.send(buf)
            except BlockingIOError:
                if total:
                    return total
                raise
            total += n
            if n < len(buf):
                break
        return total


def _readable_now(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def accept_tls(sock: socket.socket, keys: ClusterKeys | None = None,
               timeout: float = HANDSHAKE_TIMEOUT_S) -> socket.socket:
    """Wrap an accepted blocking socket and handshake now, at most ``timeout`` s
    (for processes that serve one peer at a time: workers and actors).

    Raises:
        AuthError: the peer failed the handshake (the socket is closed).
    """
    keys = keys if keys is not None else current()
    if keys is None or sock.family == socket.AF_UNIX:
        return sock
    peer = peer_of(sock)
    saved = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        tls = keys.server_context().wrap_socket(sock, server_side=True)
    except (OSError, ValueError) as exc:
        sock.close()
        raise AuthError(f"TLS handshake from {peer} failed: {exc}") from None
    tls.settimeout(saved)
    return tls


def peer_of(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_wrap(sock: socket.socket, keys: ClusterKeys | None = None, *,
                bulk: bool = False) -> socket.socket:
    """Wrap an accepted TCP socket for serving (no handshake yet: the first
    reads make it). With no keys in force, the socket as it is."""
    keys = keys if keys is not None else current()
    if keys is None:
        return sock
    if bulk:  # authenticate, agree on keys, then big AES-GCM records (bulk_link)
        from libclient import bulk_link
        return bulk_link.server_socket(sock, keys)  # type: ignore[return-value]
    return keys.server_context().wrap_socket(sock, server_side=True,
                                             do_handshake_on_connect=False)


def handshake_step(sock: socket.socket) -> int:
    """Advance the handshake of a non-blocking :func:`server_wrap` socket (for
    servers that run many peers' handshakes in one selector, so a stalled
    peer holds nobody up). The selector events to wait for next, or 0 once it
    is done.

    Raises:
        OSError, ValueError: the handshake failed (the caller closes the socket).
    """
    try:
        sock.do_handshake()  # type: ignore[attr-defined]
    except ssl.SSLWantReadError:
        return selectors.EVENT_READ
    except ssl.SSLWantWriteError:
        return selectors.EVENT_READ | selectors.EVENT_WRITE
    return 0


def client_wrap(sock: socket.socket, keys: ClusterKeys | None = None, *, bulk: bool = False,
                handshake: bool = True, timeout: float = HANDSHAKE_TIMEOUT_S) -> socket.socket:
    """Wrap a connected (or connecting, with ``handshake=False``) TCP socket as a client.

    With ``handshake`` the TLS handshake runs now, blocking at most
    ``timeout`` s; the socket's own blocking mode is restored after.

    Raises:
        OSError: the handshake failed or timed out (the socket is closed).
    """
    keys = keys if keys is not None else current()
    if keys is None:
        return sock
    if bulk:
        from libclient import bulk_link
        sealed = bulk_link.client_socket(sock, keys)
        if handshake:
            sealed.handshake_blocking(timeout)
        return sealed  # type: ignore[return-value]
    if not handshake:
        return keys.client_context().wrap_socket(sock, do_handshake_on_connect=False)
    saved = sock.gettimeout()
    sock.settimeout(timeout)
    peer, ctx = peer_of(sock), keys.client_context()
    ticket = _sessions.get(peer)
    try:
        tls = ctx.wrap_socket(sock, session=ticket[1] if ticket and ticket[0] is ctx else None)
    except (OSError, ValueError) as exc:
        sock.close()
        _sessions.pop(peer, None)
        raise AuthError(f"TLS handshake with {peer} failed: {exc}") from None
    tls.settimeout(saved)
    return tls


# TLS 1.3 session tickets, by peer address: a new lease on a worker we had
# before resumes its session instead of a full handshake (~2.6 ms instead of
# ~5.2 here: no certificate signatures; the fresh ECDHE stays, so forward
# secrecy does too). A ticket only a restarted peer cannot read just costs
# the full handshake. Bounded: the oldest peers are forgotten first.
_SESSIONS_MAX = 512
_sessions: dict[str, tuple[ssl.SSLContext, ssl.SSLSession]] = {}


def remember_session(sock: Any) -> None:
    """Keep ``sock``'s session ticket for the next connection to the same peer
    (call before closing; tickets arrive after the handshake, with the data)."""
    session, ctx = getattr(sock, "session", None), getattr(sock, "context", None)
    if session is None or ctx is None or not session.has_ticket:
        return
    peer = peer_of(sock)
    if peer == "?":
        return
    _sessions.pop(peer, None)
    _sessions[peer] = (ctx, session)
    while len(_sessions) > _SESSIONS_MAX:
        _sessions.pop(next(iter(_sessions)), None)


def connect(address: tuple[str, int], timeout: float, keys: ClusterKeys | None = None, *,
            bulk: bool = False) -> socket.socket:
    """``socket.create_connection`` plus the cluster's handshake (if keys are in force)."""
    sock = socket.create_connection(address, timeout=timeout)
    return client_wrap(sock, keys, bulk=bulk, timeout=timeout)


# ------------------------------------------------------- HMAC, authenticate only
HMAC_MAGIC = b"SHOALAU1"
NONCE = 32
MAC = 32


class HmacHandshake:
    """Mutual challenge-response on a cluster secret. Pure: bytes in, bytes out.

    client → server: MAGIC, client nonce
    server → client: server nonce, HMAC(secret, "S" | cn | sn)
    client → server: HMAC(secret, "C" | sn | cn)

    Each side proves it knows the secret over the other's fresh nonce, so a
    recorded handshake replays to nothing. After it, bytes pass in clear:
    this guards who may connect, not the bytes on the wire.
    """

    def __init__(self, secret: bytes, *, server: bool, nonce: bytes | None = None) -> None:
        self.secret = secret
        self.server = server
        self.nonce = nonce if nonce is not None else os.urandom(NONCE)
        self.peer_nonce = b""
        self.buf = bytearray()
        self.done = False
        self.failed = ""
        self._step = 0

    def start(self) -> bytes:
        """The client's first bytes (the server sends nothing first)."""
        return b"" if self.server else HMAC_MAGIC + self.nonce

    def _mac(self, tag: bytes, a: bytes, b: bytes) -> bytes:
        return hmac.new(self.secret, tag + a + b, hashlib.sha256).digest()

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Take received bytes; return (bytes to send, application bytes that followed)."""
        if self.failed:
            return b"", b""
        self.buf += data
        if self.server:
            if self._step == 0:
                need = len(HMAC_MAGIC) + NONCE
                if len(self.buf) < need:
                    if not HMAC_MAGIC.startswith(bytes(self.buf[:len(HMAC_MAGIC)])):
                        self.failed = "not a Shoal handshake"
                    return b"", b""
                if bytes(self.buf[:len(HMAC_MAGIC)]) != HMAC_MAGIC:
                    self.failed = "not a Shoal handshake"
                    return b"", b""
                self.peer_nonce = bytes(self.buf[len(HMAC_MAGIC):need])
                del self.buf[:need]
                self._step = 1
                out = self.nonce + self._mac(b"S", self.peer_nonce, self.nonce)
                more, rest = self.feed(b"")
                return out + more, rest
            if len(self.buf) < MAC:
                return b"", b""
            if not hmac.compare_digest(bytes(self.buf[:MAC]),
                                       self._mac(b"C", self.nonce, self.peer_nonce)):
                self.failed = "wrong cluster secret"
                return b"", b""
            return b"", self._finish(MAC)
        if len(self.buf) < NONCE + MAC:
            return b"", b""
        self.peer_nonce = bytes(self.buf[:NONCE])
        if not hmac.compare_digest(bytes(self.buf[NONCE:NONCE + MAC]),
                                   self._mac(b"S", self.nonce, self.peer_nonce)):
            self.failed = "server does not know the cluster secret"
            return b"", b""
        rest = self._finish(NONCE + MAC)
        return self._mac(b"C", self.peer_nonce, self.nonce), rest

    def _finish(self, used: int) -> bytes:
        rest = bytes(self.buf[used:])
        self.buf = bytearray()
        self.done = True
        return rest


# ------------------------------------------------------------------ ZeroMQ
def curve_server(sock: Any, keys: ClusterKeys | None = None) -> None:
    """Make a ZeroMQ socket a CURVE server with the cluster key (before bind)."""
    keys = keys if keys is not None else current()
    if keys is None:
        return
    sock.curve_secretkey = keys.curve_secret
    sock.curve_publickey = keys.curve_public
    sock.curve_server = True


def curve_client(sock: Any, keys: ClusterKeys | None = None) -> None:
    """Make a ZeroMQ socket a CURVE client of the cluster (before connect)."""
    keys = keys if keys is not None else current()
    if keys is None:
        return
    sock.curve_secretkey = keys.curve_secret
    sock.curve_publickey = keys.curve_public
    sock.curve_serverkey = keys.curve_public


class ZapHandler:
    """ZeroMQ's ZAP handler for one context: admits CURVE clients whose public key
    the cluster trusts, refuses and logs the rest (with the peer's address).

    Without a ZAP handler a CURVE server admits any client key, so every
    process with a CURVE server socket runs one.
    """

    def __init__(self, ctx: Any, keys: ClusterKeys, log: Any) -> None:
        import zmq

        self._zmq = zmq
        self.keys = keys
        self.log = log
        self.refused = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind("inproc://zeromq.zap.01")
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="shoal-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_r in ready:
                break
            if self._sock not in ready:
                continue
            try:
                msg = self._sock.recv_multipart()
            except zmq.ZMQError:
                break
            self._sock.send_multipart(self._answer(msg))
        self._sock.close(0)

    def _answer(self, msg: list[bytes]) -> list[bytes]:
        import zmq.utils.z85 as z85

        if len(msg) < 6:
            return [b"1.0", msg[1] if len(msg) > 1 else b"", b"400", b"bad request", b"", b""]
        version, rid, _domain, address, _identity, mechanism = msg[:6]
        ok = (mechanism == b"CURVE" and len(msg) == 7 and len(msg[6]) == 32
              and z85.encode(msg[6]) in self.keys.curve_trusted)
        if ok:
            return [version, rid, b"200", b"OK", b"cluster", b""]
        self.refused += 1
        self.log.warning("auth_failed", peer=address.decode(errors="replace"),
                         link="zmq", mechanism=mechanism.decode(errors="replace"),
                         reason="CURVE key not trusted")
        return [version, rid, b"400", b"key not trusted", b"", b""]

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(2.0)
        os.close(self._stop_r)
        os.close(self._stop_w)


def start_zap(ctx: Any, log: Any, keys: ClusterKeys | None = None) -> ZapHandler | None:
    """Run a :class:`ZapHandler` on ``ctx`` if the cluster has keys."""
    keys = keys if keys is not None else current()
    return ZapHandler(ctx, keys, log) if keys is not None else None
