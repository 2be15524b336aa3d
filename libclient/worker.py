"""A worker process: runs the tasks that a lease holder pushes to it.

Started by the raylet as ``python -m libclient.worker --raylet SOCK
--worker-id HEX --socket PATH``. It listens on its own socket, registers with
the raylet, then serves one lease holder connection at a time: read task
messages, run them in order, write each result back as soon as it exists.
Only a connection that opens with the current lease's token is served
(lease_gate.py); the raylet tells us each lease's token.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import inspect
import os
import signal
import socket
import sys
import time
from typing import Any

from libclient import api, lease_gate, logs, peer_guard, serialization, spin
from libclient.call_check import malformed_call
from libclient.core import CoreWorker, error_wire_from
from libclient.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    OwnerDiedError,
    RaySystemError,
    TaskCancelledError,
)
from libclient.object_ref import ObjectRef
from libclient.protocol import FrameDecoder, ProtocolError, pack

# How much of a holder's unread stream the SIGINT handler looks through for
# cancel messages (the socket's receive buffer is 4 MiB at most).
_PEEK_MAX = 8 * 1024 * 1024


# How long a worker waits to read an argument that is already on its node
# (pulled, or placed here by the owner's word) before calling it lost.
_ARG_READ_S = 10.0


class _LostArgument(ObjectLostError):
    """Every copy of an argument is gone (its node died, say)."""

    def __init__(self, oid: bytes, why: str) -> None:
        super().__init__(f"argument {oid.hex()} of this task was lost: {why}")
        self.oid = oid

    def __reduce__(self) -> tuple:
        # The owner unpickles what the task raised: it is an ObjectLostError.
        return (ObjectLostError, (str(self),))


class _Cancelled(BaseException):
    """Raised inside a running task by SIGINT when its holder cancelled it."""


class TaskRunner:
    """Runs task messages for one holder connection."""

    def __init__(self, core: CoreWorker) -> None:
        self.core = core
        self.conn: socket.socket | None = None
        self.decoder = FrameDecoder()
        self.backlog: collections.deque[dict] = collections.deque()
        self.cancelled: set[bytes] = set()
        self.running: bytes | None = None
        self.actor: Any = None  # an ActorHost once this worker hosts an actor
        # (task id, message, start, actor id) of the tracked run, for RUNNING events
        self.running_info: tuple | None = None
        core.running_probe = self._running_now
        self.output: Any = None  # the OutputCapture routing our stdout/stderr to drivers
        self.log: Any = logs.configure("worker", core.node_id.hex())
        signal.signal(signal.SIGINT, self._on_sigint)
        core.tell_submitter = self._tell_blocked

    def _output_context(self, msg: dict) -> None:
        """Whose output follows: Ray prefixes an actor's lines with its class name."""
        name = msg.get("name", "?")
        if self.core.current_actor_id is not None:
            name = name.partition(".")[0]
        self.output.set_context(msg.get("job", self.core.job_id), name)

    def _running_now(self) -> tuple | None:
        """What this worker runs now, if anything (read by the I/O thread)."""
        info = self.running_info
        return info if info is not None and self.running == info[0] else None

    def _tell_blocked(self, blocked: bool) -> None:
        """Our task waits in get (or stopped waiting): tell the lease holder, so it
        queues nothing behind a task that may be waiting for exactly that."""
        conn = self.conn
        if conn is not None and self.actor is None:
            try:
                conn.sendall(pack({"t": "blk", "on": blocked}))
            except OSError:
                pass  # the holder is gone; the serve loop notices

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        # The holder writes a cancel message before it signals, so the socket
        # tells whether the task running now is the one cancelled. The handler
        # only peeks: consuming bytes here would leave the main loop blocked
        # in recv on data it already has (a lost cancel, a hung get).
        self.cancelled.update(self._peek_cancels())
        if self.running is not None and self.running in self.cancelled:
            raise _Cancelled()

    def _peek_cancels(self) -> list[bytes]:
        """Task ids of cancel messages buffered or waiting on the socket, unread."""
        if self.conn is None:
            return []
        try:
            data = self.conn.recv(_PEEK_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, OSError):
            data = b""
        scratch = FrameDecoder()
        scratch.feed(bytes(self.decoder._buf))
        scratch.feed(data)
        try:
            msgs = scratch.drain()
        except ProtocolError:
            return []  # the main loop will meet the same bytes and close
        return [m.get("tid") for m in msgs if m.get("t") == "cancel"]

    def _read_nowait(self) -> None:
        if self.conn is None:
            return
        try:
            data = self.conn.recv(1 << 20, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, OSError):
            return
        if data:
            self.decoder.feed(data)
            self._take_messages()

    def _take_messages(self) -> None:
        for msg in self.decoder.drain():
            if msg["t"] == "cancel":
                self.cancelled.add(msg.get("tid"))
            else:
                self.backlog.append(msg)

    def serve(self, conn: socket.socket, decoder: FrameDecoder | None = None) -> None:
        """Run the holder's tasks until it closes; ``decoder`` holds what it
        sent behind its hello (lease_gate)."""
        self.conn = conn
        self.decoder = decoder or FrameDecoder(peer_guard.limits().max_frame)
        self.backlog.clear()
        self.cancelled.clear()
        try:
            self._take_messages()  # tasks that came with the hello
            while True:
                if not self.backlog:
                    data = spin.recv(conn, 1 << 20)
                    if not data:
                        return
                    self.decoder.feed(data)
                    self._take_messages()
                # Each reply goes out as soon as its task ends: a later task in
                # the backlog may block on this one's result, or run for long.
                while self.backlog:
                    msg = self.backlog.popleft()
                    if msg["t"] == "task":
                        if (why := malformed_call(msg)) is not None:  # call_check
                            raise ProtocolError(f"malformed task: {why}")
                        conn.sendall(pack(self.run(msg)))
                    elif msg["t"] == "actor_init":
                        from libclient.actor_host import ActorHost

                        self.actor = ActorHost.create(self, msg)
                        conn.sendall(pack(self.actor.init_reply))
                        if self.actor.instance is not None:
                            return
                    self._read_nowait()
        except ProtocolError as exc:
            self.log.warning("bad_message", peer="lease holder", error=str(exc))
        except (ConnectionError, OSError):
            pass
        finally:
            self.conn = None
            conn.close()

    def run(self, msg: dict) -> dict:
        """Run one task message; return its ``done`` reply."""
        core = self.core
        core.job_id = msg.get("job", 0)
        core.current_pg = msg.get("pg")  # placement group of this task, if any
        gpus = msg.get("gpus")
        if gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
            core.current_gpus = list(gpus)
        else:
            core.current_gpus = []
        try:
            fn = core.fetch_function(msg["fn"])
        except Exception as exc:
            return self._error(msg["tid"], msg.get("name", "?"), msg.get("nret", 1), exc,
                               time.perf_counter())
        return self.execute(msg, fn)

    def execute(self, msg: dict, fn: Any, track: bool = True) -> dict:
        """Run a task or actor method; the reply also lists the refs we still borrow
        and when the run began (``t0``, wall clock: a task event for the owner)."""
        t0 = time.time()
        if track:
            self.running_info = (msg["tid"], msg, t0, self.core.current_actor_id)
        if self.output is not None:
            self._output_context(msg)
        reply = self._execute(msg, fn, track)
        reply["t0"] = t0
        brw = self.core.borrow_report()
        if brw:
            reply["brw"] = brw
        self._note_pulls(msg, reply)
        return reply

    def _execute(self, msg: dict, fn: Any, track: bool) -> dict:
        """Resolve arguments, call ``fn``, and build the reply (task or actor method).

        ``track`` marks the call as the process's current task, for blocked-get
        notices and cancellation; concurrent actor calls run untracked.
        """
        tid = msg["tid"]
        name = msg.get("name", "?")
        nret = msg.get("nret", 1)
        start = time.perf_counter()
        core = self.core
        args = kwargs = None
        # `running` is set before `cancelled` is checked, and the SIGINT
        # handler adds to `cancelled` before it reads `running`: a cancel that
        # lands at any point, argument unpacking included, is seen by one side.
        try:
            try:
                if track:
                    core.current_task_id = tid
                    self.running = tid
                if tid in self.cancelled:
                    raise _Cancelled()
                try:
                    args, kwargs = self._args(msg)
                except Exception as exc:
                    return self._arg_error(tid, name, nret, exc, start)
                fetched = time.perf_counter() - start if "deps" in msg else 0.0
                result = fn(*args, **kwargs)
                if "gen" in msg or (nret != 1 and inspect.isgenerator(result)):
                    result = self._generate(msg, result)  # stream its items, or list them
            finally:
                if track:
                    self.running = None
                    core.current_task_id = None
                del args, kwargs
        except _Cancelled:
            return self._error(tid, name, nret, TaskCancelledError(f"task {name} was cancelled"), start)
        except Exception as exc:
            return self._raised(msg, exc, start)
        reply = self.finish(msg, result, start)
        if fetched:
            reply["af"] = fetched
        return reply

    async def execute_async(self, msg: dict, fn: Any) -> dict:
        """The same for an async actor's method: await it on the actor's loop."""
        t0 = time.time()
        if self.output is not None:
            self._output_context(msg)
        reply = await self._execute_async(msg, fn)
        reply["t0"] = t0
        brw = self.core.borrow_report()
        if brw:
            reply["brw"] = brw
        self._note_pulls(msg, reply)
        return reply

    def _note_pulls(self, msg: dict, reply: dict) -> None:
        """Arguments pulled here from another node: the owner frees our copy
        with its own when the object goes."""
        here = self.core.store_address
        pulled = [d[2] for d in msg.get("deps") or ()
                  if len(d) > 4 and d[1] == "s" and d[4] and d[4] != here]
        if pulled:
            reply["pld"] = pulled
            reply["at"] = here

    async def _execute_async(self, msg: dict, fn: Any) -> dict:
        start = time.perf_counter()
        try:
            args, kwargs = self._args(msg)
        except Exception as exc:
            return self._arg_error(msg["tid"], msg.get("name", "?"), msg.get("nret", 1), exc,
                                   start)
        try:
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            if "gen" in msg or (msg.get("nret", 1) != 1 and (
                    inspect.isgenerator(result) or inspect.isasyncgen(result))):
                result = await self._generate_async(msg, result)  # a generator method
        except Exception as exc:
            return self._raised(msg, exc, start)
        return self.finish(msg, result, start)

    # ---------------------------------------------------------- generators
    def _generate(self, msg: dict, result: Any) -> Any:
        """Run a generator task's body. ``gen`` 1 (streaming): send each item to
        the caller as it is yielded (a ``gi`` frame) and return the count;
        2 (``num_returns=N``): return the items as a list."""
        if msg.get("gen") != 1:
            return _counted(msg, list(result)) if inspect.isgenerator(result) else result
        if not hasattr(result, "__next__"):
            raise TypeError(f"{msg.get('name', '?')} was called as a streaming generator but "
                            f"returned {type(result).__name__}, not a generator")
        sink = msg.get("_sink") or self._to_holder
        count = 0
        for value in result:
            sink(self._item_frame(msg, count, value))
            count += 1
        return count

    async def _generate_async(self, msg: dict, result: Any) -> Any:
        """``_generate`` for an async actor: async generators are iterated on its loop."""
        if not inspect.isasyncgen(result):
            return self._generate(msg, result)
        if msg.get("gen") != 1:
            return _counted(msg, [value async for value in result])
        sink = msg.get("_sink") or self._to_holder
        count = 0
        async for value in result:
            sink(self._item_frame(msg, count, value))
            count += 1
        return count

    def _to_holder(self, frame: dict) -> None:
        conn = self.conn
        if conn is None:
            raise ConnectionError("the lease holder went away")
        conn.sendall(pack(frame))

    def _item_frame(self, msg: dict, index: int, value: Any) -> dict:
        """One yielded value as a ``gi`` frame: inline, or stored under the item's
        id (task id + index + 1) like a large return."""
        tid, core = msg["tid"], self.core
        ser = serialization.serialize(value)
        frame: dict = {"t": "gi", "tid": tid, "i": index}
        if ser.refs:
            core.escape(ser.refs)
            frame["nst"] = core.returned_refs(ser.refs, msg.get("ca"))
        if ser.inline:
            frame["ret"] = ["v", ser.to_wire()]
            return frame
        oid = tid + (index + 1).to_bytes(4, "little")
        try:
            buf = core.write_store(oid, ser)
            del buf  # the owner pins its own copy when it reads the frame
        except Exception as exc:
            if getattr(exc, "code", None) != "exists":  # stored by an earlier run: stands
                raise
        frame["ret"] = ["s", core.store_address, ser.store_size()]
        return frame

    def _raised(self, msg: dict, exc: Exception, start: float) -> dict:
        self._exit_if_store_lost(exc)
        status = 2 if self._retryable(msg, exc) else 1
        return {"t": "done", "tid": msg["tid"], "err": status, "dur": time.perf_counter() - start,
                "rets": [["v", error_wire_from(exc, msg.get("name", "?"))]] * msg.get("nret", 1)}

    def finish(self, msg: dict, result: Any, start: float) -> dict:
        tid, name, nret = msg["tid"], msg.get("name", "?"), msg.get("nret", 1)
        try:
            nested: list = []
            reply = {"t": "done", "tid": tid, "err": 0, "dur": time.perf_counter() - start,
                     "rets": self._returns(tid, result, nret, msg.get("ca"), nested)}
            if nested:
                reply["nst"] = nested
            return reply
        except Exception as exc:
            self._exit_if_store_lost(exc)
            wrapped = TypeError(f"could not serialize the return value of {name}: {exc}")
            return self._error(tid, name, nret, wrapped, start)

    def _exit_if_store_lost(self, exc: BaseException) -> None:
        """Our node's stored died: the node is gone (its raylet ends too), and
        the task did nothing wrong. Exit, so the lease holder sees a crashed
        worker and runs the task again elsewhere, within max_retries."""
        store_client = sys.modules.get("libclient.store_client")
        if store_client is None:
            return
        lost = store_client.StoreLostError
        while exc is not None:
            if isinstance(exc, lost):
                self.log.error("store_lost", error=str(exc), action="worker exits")
                os._exit(75)
            exc = exc.__cause__ or exc.__context__

    def _arg_error(self, tid: bytes, name: str, nret: int, exc: BaseException,
                   start: float) -> dict:
        """An argument could not be had. A lost one is named in the reply, so
        its owner can rebuild it and send the task again."""
        self._exit_if_store_lost(exc)
        reply = self._error(tid, name, nret, exc, start)
        if isinstance(exc, _LostArgument):
            reply["lost"] = exc.oid
        return reply

    def _error(self, tid: bytes, name: str, nret: int, exc: BaseException, start: float) -> dict:
        try:
            raise exc
        except BaseException as e:
            wire = error_wire_from(e, name) if not isinstance(e, TaskCancelledError) else \
                serialization.serialize(e, serialization.KIND_ERROR).to_wire()
        return {"t": "done", "tid": tid, "err": 1, "dur": time.perf_counter() - start,
                "rets": [["v", wire]] * nret}

    def _args(self, msg: dict) -> tuple[list, dict]:
        kind, (args, kwargs) = serialization.deserialize_wire(msg["args"])
        args = list(args)
        # Large arguments ("*") replace the whole args first; refs then fill slots.
        for dep in sorted(msg.get("deps") or (), key=lambda d: d[0] != "*"):
            slot, how = dep[0], dep[1]
            if how == "v":
                kind, value = serialization.deserialize_wire(dep[2])
            else:
                where = dep[4] if len(dep) > 4 else ""
                try:
                    if where:  # arguments arrive on this node before the task runs
                        self.core.fetch_to_node(dep[2], where)
                    # Once here (pulled, or the owner said it is on this node)
                    # the read is immediate; a copy that is not here is lost,
                    # and waiting for it would hang the task (chaos finding).
                    (value,) = self.core.get([ObjectRef(dep[2], dep[3], where, _count=False)],
                                             _ARG_READ_S if where else None)
                except GetTimeoutError as exc:
                    raise _LostArgument(dep[2], f"argument {dep[2].hex()} is not at {where}: "
                                                f"{exc}") from exc
                except ObjectLostError as exc:
                    # The ref above names where a copy was, not its owner, so
                    # an "owner died" verdict about it only means that copy's
                    # node is gone: the owner (who sent us this task) rebuilds.
                    if type(exc) not in (ObjectLostError, OwnerDiedError):
                        raise  # it cannot be rebuilt: say so
                    raise _LostArgument(dep[2], str(exc)) from exc
            if slot == "*":
                args, kwargs = list(value[0]), value[1]
            elif isinstance(slot, int):
                args[slot] = value
            else:
                kwargs[slot] = value
        return args, kwargs

    def _retryable(self, msg: dict, exc: Exception) -> bool:
        rex = msg.get("rex")
        if not rex:
            return False
        if rex is True:
            return True
        try:
            _kind, types = serialization.deserialize_wire(rex)
            return isinstance(exc, tuple(types))
        except Exception:
            return False

    def _returns(self, tid: bytes, result: Any, nret: int, caller: Any, nested: list) -> list:
        if nret == 1:
            values = [result]
        else:
            if not isinstance(result, (tuple, list)) or len(result) != nret:
                raise ValueError(f"task declared num_returns={nret} but returned "
                                 f"{type(result).__name__}")
            values = list(result)
        rets = []
        core = self.core
        for i, value in enumerate(values):
            ser = serialization.serialize(value)
            if ser.refs:
                core.escape(ser.refs)
                nested.append([i, core.returned_refs(ser.refs, caller)])
            if ser.inline:
                rets.append(["v", ser.to_wire()])
            else:
                oid = tid + i.to_bytes(4, "little")
                try:
                    buf = core.write_store(oid, ser)
                    del buf  # the owner pins its own copy when it reads the reply
                except Exception as exc:
                    # An earlier run of this task (killed before it replied, or
                    # rebuilt here) stored this return already: same id, same
                    # task, so that copy stands. Anything else is an error.
                    if getattr(exc, "code", None) != "exists":
                        raise
                # Where an owner elsewhere pulls from, and how big (for locality).
                rets.append(["s", core.store_address, ser.store_size()])
        return rets


def _counted(msg: dict, values: list) -> list:
    """A generator's items as a task's ``num_returns`` values: as many as declared."""
    nret = msg.get("nret", 1)
    if len(values) != nret:
        raise ValueError(f"task declared num_returns={nret} but its generator yielded "
                         f"{len(values)} values")
    return values


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="libclient.worker")
    p.add_argument("--raylet", required=True)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--tcp-fd", type=int, help="listening TCP socket for holders on other nodes")
    ns = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if os.environ.get("SHOAL_RUNTIME_ENV"):  # started in a runtime env: set it up first
        from libclient.runtime_env.worker_setup import prepare

        if not prepare(ns.raylet, bytes.fromhex(ns.worker_id)):
            sys.exit(0)  # the raylet was told why
    # A holder may cancel (SIGINT) as soon as the raylet has leased this
    # worker out, which is before the TaskRunner's handler exists; the cancel
    # message and the holder's repeated signal still reach the task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(ns.socket)
    except FileNotFoundError:
        pass
    listen.bind(ns.socket)
    peer_guard.secure_socket(ns.socket)  # 0600 (0660 with [security] allowed_group)
    listen.listen(8)
    try:
        core = CoreWorker(ns.raylet, kind="worker", worker_id=bytes.fromhex(ns.worker_id))
    except Exception as exc:
        logs.configure("worker").error("worker_start_failed", error=str(exc),
                                       exc_info=True)
        sys.exit(1)
    token = lease_gate.LeaseToken()
    core.watch_lease_token(token.set)  # the raylet's word, on the I/O thread
    api._attach_worker(core)
    from libclient.worker_output import OutputCapture

    capture = OutputCapture(core)  # stdout/stderr to the drivers (log_to_driver)
    log_stream = capture.install()
    runner = TaskRunner(core)
    runner.output = capture
    runner.log = logs.configure("worker", core.node_id.hex(), stream=log_stream)
    # Holders on this node connect to the Unix socket; holders and callers on
    # other nodes to the TCP port the raylet opened for us.
    tcp = [socket.socket(fileno=ns.tcp_fd)] if ns.tcp_fd is not None else []
    # Only the current lease's holder (its token, from the raylet) is served;
    # SO_PEERCRED on local peers and TLS on remote ones still come first.
    gate = lease_gate.HolderGate(token, runner.log)
    try:
        while runner.actor is None or runner.actor.instance is None:
            conn, decoder = gate.next_holder([listen, *tcp])
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            runner.serve(conn, decoder)
        runner.actor.serve(listen, *tcp)
    except KeyboardInterrupt:
        pass
    except RaySystemError as exc:
        runner.log.error("worker_stopped", error=str(exc))
    finally:
        try:
            os.unlink(ns.socket)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    main()
