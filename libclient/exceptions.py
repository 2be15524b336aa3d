"""Exceptions with Ray's names, so the except clauses of Ray programs keep working."""

from __future__ import annotations

from typing import Any


class RayError(Exception):
    """Base of every Shoal error raised to user code."""


class RayTaskError(RayError):
    """A task raised; re-raised at ``get``.

    ``as_instanceof_cause`` returns an object that is both a RayTaskError and
    an instance of the task's own exception class, so ``except ValueError``
    around ``get`` catches a ValueError raised remotely.
    """

    def __init__(self, function_name: str = "", traceback_str: str = "",
                 cause: BaseException | None = None, pid: int = 0) -> None:
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.pid = pid
        Exception.__init__(self, function_name, traceback_str, cause, pid)

    def __str__(self) -> str:
        name = type(self.cause).__name__ if self.cause is not None else "Exception"
        return (f"{name} raised in task {self.function_name} (pid={self.pid}):\n"
                f"{self.traceback_str.rstrip()}")

    def __reduce__(self) -> Any:
        return (RayTaskError, (self.function_name, self.traceback_str, self.cause, self.pid))

    def as_instanceof_cause(self) -> RayTaskError:
        cause = self.cause
        while isinstance(cause, RayTaskError):  # nested: the innermost user error
            cause = cause.cause
        if cause is None or isinstance(self, type(cause)):
            return self
        cause_cls = type(cause)
        try:
            cls = _dual_class(cause_cls)
            err = cls.__new__(cls)
        except Exception:  # final or C classes that refuse subclassing, odd __new__
            return self
        RayTaskError.__init__(err, self.function_name, self.traceback_str, cause, self.pid)
        err.args = getattr(cause, "args", err.args)  # str() is ours; args stay the cause's
        # Copy the cause's attributes so handlers that read them still work.
        try:
            err.__dict__.update({k: v for k, v in vars(cause).items()
                                 if k not in ("cause", "traceback_str", "function_name", "pid")})
        except TypeError:
            pass
        return err


_dual_cache: dict[type, type] = {}


def _dual_class(cause_cls: type) -> type:
    cls = _dual_cache.get(cause_cls)
    if cls is None:
        cls = type(f"RayTaskError({cause_cls.__name__})", (RayTaskError, cause_cls),
                   {"__init__": RayTaskError.__init__, "__str__": RayTaskError.__str__,
                    "__reduce__": RayTaskError.__reduce__, "__module__": __name__})
        _dual_cache[cause_cls] = cls
    return cls


class GetTimeoutError(RayError, TimeoutError):
    """``get`` or ``wait`` ran past its timeout."""


class WorkerCrashedError(RayError):
    """The worker died while running the task and the retries ran out."""


class TaskCancelledError(RayError):
    """The task was cancelled before it finished."""


class ObjectLostError(RayError):
    """The object's value is gone: evicted, or its owner died."""


class OwnerDiedError(ObjectLostError):
    """The process that owned the object exited before the object was stored."""


class ObjectReconstructionFailedError(ObjectLostError):
    """The object was lost and cannot be rebuilt (a ``put``, or no retries were allowed)."""


class ObjectReconstructionFailedMaxAttemptsExceededError(ObjectLostError):
    """The object was lost and its task already used up ``max_retries`` rebuilding it."""


class ObjectReconstructionFailedLineageEvictedError(ObjectLostError):
    """The object was lost and the spec of the task that made it was dropped
    to keep lineage memory bounded."""


class ObjectStoreFullError(RayError):
    """The node's object store has no room, even after evicting unused objects."""


class RayActorError(RayError):
    """The actor cannot run the call: the base of ActorDiedError and
    ActorUnavailableError (Ray's hierarchy)."""


class ActorDiedError(RayActorError):
    """The actor is dead (or died while running this call) and will not answer.

    ``cause`` says why; ``init_error`` holds the exception its ``__init__``
    raised, if that is how it died.
    """

    def __init__(self, actor_id: str = "", cause: str = "", init_error: Any = None) -> None:
        self.actor_id = actor_id
        self.cause = cause
        self.init_error = init_error
        super().__init__(actor_id, cause, init_error)

    def __str__(self) -> str:
        text = f"actor {self.actor_id[:16]} is dead: {self.cause}"
        if self.init_error is not None:
            text += f"\n__init__ raised: {self.init_error}"
        return text


class ActorUnavailableError(RayActorError):
    """The actor cannot be reached right now (restarting)."""


class RaySystemError(RayError):
    """Shoal itself failed: a daemon is unreachable or answered nonsense."""


class RuntimeEnvSetupError(RayError):
    """The task's or actor's runtime environment could not be set up."""


# ------------------------------------------------ the rest of Ray's hierarchy
# Same names and bases as ray.exceptions (Ray 2.x), so except clauses and
# isinstance checks written for Ray keep their meaning.


class ActorAlreadyExistsError(ValueError, RayError):
    """An actor with this name already exists in the namespace."""


class ActorHandleNotFoundError(ValueError, RayError):
    """No actor handle could be found for this id or name."""


class ActorUnschedulableError(RayError):
    """The actor can never be placed (e.g. hard affinity to a dead node)."""


class TaskUnschedulableError(RayError):
    """The task can never be placed (e.g. hard affinity to a dead node)."""


class ActorPlacementGroupRemoved(RayError):
    """The placement group the actor was placed in was removed."""


class TaskPlacementGroupRemoved(RayError):
    """The placement group the task was placed in was removed."""


class AsyncioActorExit(RayError):
    """Raised inside an async actor by ``exit_actor()`` to end it."""


class NodeDiedError(RayError):
    """The node the work ran on died."""


class LocalRayletDiedError(RayError):
    """This process's own raylet died."""


class ObjectFetchTimedOutError(ObjectLostError):
    """Fetching the object from another node took too long."""


class ObjectFreedError(ObjectLostError):
    """The object was freed explicitly and can no longer be read."""


class ReferenceCountingAssertionError(ObjectLostError, AssertionError):
    """The object was freed while a reference to it was still in use (a bug)."""


class ObjectRefStreamEndOfStreamError(RayError):
    """A streaming generator has no more items (what ``next`` means by StopIteration)."""


class StreamingGeneratorReplayInconsistentError(RaySystemError):
    """A retried streaming generator yielded a different number of items."""


class OutOfDiskError(RayError):
    """The node's disk is full (spilling could not make room)."""


class OutOfMemoryError(RayError):
    """The node ran out of memory and the worker was killed."""


class PendingCallsLimitExceeded(RayError):
    """Too many calls are queued for one actor (``max_pending_calls``)."""


class PlasmaObjectNotAvailable(RayError):
    """The object is not available in the object store."""


class UserCodeException(RayError):
    """Raised in user code; the class Ray uses to tag such errors."""


class UnserializableException(RayError):
    """A task raised an exception that could not be pickled back to its caller;
    ``str`` of it carries the original's type, message and traceback."""

    def __init__(self, original_stack_trace: str = "") -> None:
        self.original_stack_trace = original_stack_trace
        super().__init__(original_stack_trace)

    def __str__(self) -> str:
        return ("a task raised an exception that could not be serialized; its "
                f"traceback:\n{self.original_stack_trace}")


class CrossLanguageError(RayError):
    """A task in another language failed (kept for Ray's name; Shoal is Python only)."""


class RpcError(RayError):
    """A call to a daemon failed."""

    def __init__(self, message: str = "", rpc_code: int | None = None) -> None:
        self.rpc_code = rpc_code
        super().__init__(message)


class AuthenticationError(RayError):
    """A peer could not prove it belongs to the cluster."""


class OufOfBandObjectRefSerializationException(RayError):
    """An ObjectRef was pickled outside Ray's serializer (Ray's own spelling)."""
