"""A worker process that hosts one actor: its instance and its callers.

After the raylet sends ``actor_init``, the worker builds the instance and
serves method calls from any number of callers, each on its own connection
straight from the caller (handles passed to tasks and to other actors
connect too). Calls from one caller arrive in order on its stream.

Concurrency, as in Ray:
  * default: one call at a time, in arrival order, on the main thread;
  * ``max_concurrency > 1`` on a class without async methods: a thread pool;
  * a class with ``async def`` methods: an asyncio loop in a second thread,
    at most ``max_concurrency`` calls at once (default 1000).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from libclient import peer_guard, security, serialization, spin
from libclient.call_check import malformed_call
from libclient.peer_policy import LogOncePerPeer
from libclient.protocol import FrameDecoder, ProtocolError, pack

_DEFAULT_ASYNC_CONCURRENCY = 1000
_SHAKING_MAX = 64  # TCP peers in their TLS handshake at once; the oldest goes first


class _Caller:
    __slots__ = ("sock", "decoder", "lock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(peer_guard.limits().max_frame)
        self.lock = threading.Lock()

    def reply(self, msg: dict) -> None:
        with self.lock:
            try:
                self.sock.sendall(pack(msg))
            except OSError:
                pass  # the caller went away; its calls are its own loss


class _Handshake:
    """A TCP peer whose TLS handshake runs in the serve loop's selector, so a
    peer that stalls in it (no keys needed to connect) holds no caller up."""

    __slots__ = ("sock", "peer", "deadline", "timeout")

    def __init__(self, sock: socket.socket, peer: str, deadline: float,
                 timeout: float | None) -> None:
        self.sock = sock
        self.peer = peer  # host, for the log
        self.deadline = deadline
        self.timeout = timeout  # the socket's own, given back once it is a caller


class ActorHost:
    """The actor instance plus the loop that serves its callers."""

    def __init__(self, runner: Any, instance: Any, spec: dict, init_reply: dict) -> None:
        self.runner = runner
        self.instance = instance
        self.init_reply = init_reply
        self.actor_id: bytes = spec.get("actor_id", b"")
        self.is_async = bool(spec.get("is_async"))
        concurrency = spec.get("max_concurrency")
        if concurrency is None:
            concurrency = _DEFAULT_ASYNC_CONCURRENCY if self.is_async else 1
        self.max_concurrency = max(1, int(concurrency))
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._methods: dict[str, Any] = {}
        # Concurrency groups (Ray's): name -> size; each has its own thread pool
        # (threaded actor) or semaphore (async actor). Calls name theirs in the
        # message (``cg``, from .options) or by the method's @method default.
        groups = (spec.get("meta") or {}).get("concurrency_groups") or {}
        self._group_sizes: dict[str, int] = {str(k): max(1, int(v)) for k, v in groups.items()
                                             if isinstance(v, int) and not isinstance(v, bool)}
        self._groups: dict[str, Any] | None = None
        self._tls_log = LogOncePerPeer()  # failed TLS handshakes, per host

    @classmethod
    def create(cls, runner: Any, msg: dict) -> ActorHost:
        """Run the class's ``__init__``; the reply says whether it worked."""
        spec = dict(msg.get("spec") or {})
        spec["actor_id"] = msg.get("actor_id", b"")
        core = runner.core
        core.job_id = spec.get("job", 0)
        core.current_actor_id = spec["actor_id"]
        core.current_pg = spec.get("pg")  # placement group of this actor, if any
        gpus = msg.get("gpus")
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
            core.current_gpus = list(gpus)
        init_msg = {"tid": b"\0" * 16, "name": spec.get("class_name", "?") + ".__init__",
                    "nret": 1, "args": spec.get("args"), "deps": spec.get("deps")}
        try:
            klass = core.fetch_function(spec["cls"])
        except Exception as exc:
            return cls(runner, None, spec, _failed(exc, init_msg["name"]))
        holder: list[Any] = []

        def construct(*args: Any, **kwargs: Any) -> None:
            holder.append(klass(*args, **kwargs))

        reply = runner.execute(init_msg, construct)
        if reply["err"]:
            kind, err = serialization.deserialize_wire(reply["rets"][0][1])
            return cls(runner, None, spec,
                       {"t": "actor_failed", "error": str(err), "wire": reply["rets"][0][1]})
        ready = {"t": "actor_ready"}
        if reply.get("brw"):  # refs __init__ kept: the raylet passes them to the creator
            ready["brw"] = reply["brw"]
        return cls(runner, holder[0], spec, ready)

    # ------------------------------------------------------------- serving
    def serve(self, listen: socket.socket, *more: socket.socket) -> None:
        """Accept callers (on the Unix socket, and ``more``: the TCP port other
        nodes call on) and run their calls until the process is killed.

        A TCP peer's TLS handshake runs in this loop's selector, non-blocking,
        within :data:`security.HANDSHAKE_TIMEOUT_S`: a blocking one let any
        peer that connected and sent nothing stall every caller for 5 s."""
        self.runner.conn = None  # cancellation by SIGINT is for tasks only
        if self.is_async:
            self._start_loop()
        elif self.max_concurrency > 1 or self._group_sizes:
            self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="actor")
            if self._group_sizes:
                self._groups = {name: ThreadPoolExecutor(n, thread_name_prefix=f"actor-{name}")
                                for name, n in self._group_sizes.items()}
        sel = selectors.DefaultSelector()
        for lsock in (listen, *more):
            sel.register(lsock, selectors.EVENT_READ, None)
        # Local callers must be our uid (or the allowed group): SO_PEERCRED.
        gate, cap = peer_guard.LocalGate(self.runner.log, "actor"), peer_guard.limits()
        shaking: dict[socket.socket, _Handshake] = {}  # TCP peers not yet callers
        # A plain sync actor runs calls in this thread, so it may spin for the
        # next one; async and threaded actors must leave the GIL to their workers.
        wait = spin.wait_selector if not self.is_async and self._pool is None else _block
        while True:
            timeout = None  # wake up in time for the first handshake deadline
            if shaking:
                timeout = max(0.0, min(h.deadline for h in shaking.values()) - time.monotonic())
            for key, _ in wait(sel, timeout=timeout):
                if key.data is None:
                    try:
                        sock, addr = key.fileobj.accept()  # type: ignore[union-attr]
                    except OSError:
                        continue
                    if gate.admit(sock) is None:
                        continue
                    if not cap.admit(len(sel.get_map()) - 1 - len(more) - len(shaking)):
                        sock.close()  # at the cap: the callers we serve come first
                        continue
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
                    if sock.family != socket.AF_UNIX:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        self._start_handshake(sock, addr, sel, shaking)
                        continue
                    sel.register(sock, selectors.EVENT_READ, _Caller(sock))
                elif isinstance(key.data, _Handshake):
                    if key.data.sock in shaking:  # not closed earlier in this batch
                        self._handshake(key.data, sel, shaking)
                else:
                    self._read(key.data, sel)
            if shaking:
                now = time.monotonic()
                for h in [h for h in shaking.values() if h.deadline <= now]:
                    self._end_handshake(h, sel, shaking, "no TLS handshake within "
                                        f"{security.HANDSHAKE_TIMEOUT_S:g} s")

    def _read(self, caller: _Caller, sel: selectors.BaseSelector) -> None:
        """Take what ``caller`` sent and dispatch its calls; close it when it
        is gone or sent something malformed."""
        try:
            data = caller.sock.recv(1 << 20)
        except OSError:
            data = b""
        if data:
            caller.decoder.feed(data)
            try:
                msgs = caller.decoder.drain()
            except ProtocolError as exc:
                self.runner.log.warning("bad_message", peer="actor caller",
                                        actor_id=self.actor_id.hex(), error=str(exc))
                data, msgs = b"", []
            for msg in msgs:
                if msg["t"] == "call":
                    if (why := malformed_call(msg)) is not None:  # call_check
                        self.runner.log.warning("bad_message", peer="actor caller",
                                                actor_id=self.actor_id.hex(), error=why)
                        data = b""  # close this caller; the actor serves on
                        break
                    self._dispatch(caller, msg)
        if not data:
            sel.unregister(caller.sock)
            caller.sock.close()

    # ------------------------------------------------------- TLS handshakes
    def _start_handshake(self, sock: socket.socket, addr: Any, sel: selectors.BaseSelector,
                         shaking: dict[socket.socket, _Handshake]) -> None:
        """Wrap an accepted TCP socket; its handshake runs as its bytes come."""
        timeout = sock.gettimeout()
        sock.setblocking(False)
        tls = security.server_wrap(sock)
        if tls is sock:  # no keys in force: a caller at once
            sock.settimeout(timeout)
            sel.register(sock, selectors.EVENT_READ, _Caller(sock))
            return
        if len(shaking) >= _SHAKING_MAX:
            oldest = min(shaking.values(), key=lambda h: h.deadline)
            self._end_handshake(oldest, sel, shaking, "too many TLS handshakes at once")
        peer = addr[0] if isinstance(addr, tuple) else "?"
        h = _Handshake(tls, peer, time.monotonic() + security.HANDSHAKE_TIMEOUT_S, timeout)
        shaking[tls] = h
        sel.register(tls, selectors.EVENT_READ, h)
        self._handshake(h, sel, shaking)  # the ClientHello may be here already

    def _handshake(self, h: _Handshake, sel: selectors.BaseSelector,
                   shaking: dict[socket.socket, _Handshake]) -> None:
        try:
            events = security.handshake_step(h.sock)
        except (OSError, ValueError) as exc:
            self._end_handshake(h, sel, shaking, f"TLS handshake from {h.peer} failed: {exc}")
            return
        if events:
            sel.modify(h.sock, events, h)
            return
        del shaking[h.sock]  # done: a caller now, in the blocking mode it was accepted in
        h.sock.settimeout(h.timeout)
        caller = _Caller(h.sock)
        sel.modify(h.sock, selectors.EVENT_READ, caller)
        if h.sock.pending():  # type: ignore[attr-defined]  # calls came with the handshake
            self._read(caller, sel)

    def _end_handshake(self, h: _Handshake, sel: selectors.BaseSelector,
                       shaking: dict[socket.socket, _Handshake], why: str) -> None:
        """Close a peer that did not finish its handshake (logged once per host,
        then at the 10th, 100th, ... time)."""
        del shaking[h.sock]
        sel.unregister(h.sock)
        h.sock.close()
        if self._tls_log.should_log(h.peer, "tls"):
            self.runner.log.warning("auth_failed", peer=h.peer, error=why,
                                    attempts=self._tls_log.count(h.peer, "tls"))

    def _method(self, name: str) -> Any:
        fn = self._methods.get(name)
        if fn is None:
            fn = getattr(self.instance, name)
            self._methods[name] = fn
        return fn

    def _dispatch(self, caller: _Caller, msg: dict) -> None:
        try:
            fn = self._method(msg.get("method", ""))
        except AttributeError as exc:
            caller.reply(_failed_call(msg, exc))
            return
        if "gen" in msg:  # a generator method: its items go to this caller as they come
            msg["_sink"] = caller.reply
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._run_async(caller, msg, fn), self._loop)
        elif self._pool is not None:
            pool = self._pool if self._groups is None else self._group(msg, fn, self._pool)
            pool.submit(lambda: caller.reply(self.runner.execute(msg, fn, track=False)))
        else:
            caller.reply(self.runner.execute(msg, fn))

    def _group(self, msg: dict, fn: Any, default: Any) -> Any:
        """The pool or semaphore of the call's concurrency group (the default
        group's if it names none, or one this actor does not have)."""
        assert self._groups is not None
        name = msg.get("cg") or getattr(fn, "__shoal_concurrency_group__", None)
        return self._groups.get(name, default) if name else default

    # ---------------------------------------------------------------- async
    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._sem = asyncio.Semaphore(self.max_concurrency)
            if self._group_sizes:
                self._groups = {name: asyncio.Semaphore(n)
                                for name, n in self._group_sizes.items()}
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, name="actor-asyncio", daemon=True).start()
        ready.wait()
        self._loop = loop

    async def _run_async(self, caller: _Caller, msg: dict, fn: Any) -> None:
        assert self._sem is not None
        sem = self._sem if self._groups is None else self._group(msg, fn, self._sem)
        async with sem:
            if inspect.iscoroutinefunction(fn) or "gen" in msg:
                reply = await self.runner.execute_async(msg, fn)
            else:
                reply = self.runner.execute(msg, fn, track=False)
        # Replies block in sendall only if the caller stops reading.
        caller.reply(reply)


def _failed(exc: BaseException, name: str) -> dict:
    from libclient.core import error_wire_from

    try:
        raise exc
    except BaseException as e:
        wire = error_wire_from(e, name)
    return {"t": "actor_failed", "error": f"{type(exc).__name__}: {exc}", "wire": wire}


def _failed_call(msg: dict, exc: BaseException) -> dict:
    from libclient.core import error_wire_from

    try:
        raise exc
    except BaseException as e:
        wire = error_wire_from(e, msg.get("name", "?"))
    return {"t": "done", "tid": msg["tid"], "err": 1, "dur": 0.0,
            "rets": [["v", wire]] * msg.get("nret", 1)}


def _block(sel: selectors.BaseSelector, timeout: float | None = None) -> list[Any]:
    return sel.select(timeout)
