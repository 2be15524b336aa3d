"""Errors through nested tasks and actors, against real daemons: the caller's
RayTaskError is an instance of the innermost exception's class at any depth
and shows every level's traceback; ``exceptions`` has Ray's core names."""

import inspect
import sys

import cloudpickle
import pytest

from libclient import exceptions as exc_mod

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class NeedsArgs(Exception):
    """An exception whose __init__ takes required arguments."""

    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class Unsubclassable(Exception):
    def __init_subclass__(cls, **kwargs):
        raise TypeError("no subclasses of this one")


def test_three_levels_of_nesting_keep_the_innermost_class(ray):
    @ray.remote(max_retries=0)
    def innermost():
        raise ValueError("deep down")

    @ray.remote(max_retries=0)
    def middle():
        return ray.get(innermost.remote())

    @ray.remote(max_retries=0)
    def outer():
        return ray.get(middle.remote())

    with pytest.raises(ValueError, match="deep down") as info:
        ray.get(outer.remote())
    err = info.value
    assert isinstance(err, ray.exceptions.RayTaskError)
    text = str(err)
    for name in ("innermost", "middle", "outer"):  # the whole remote chain
        assert name in text
    assert text.count("Traceback (most recent call last)") >= 3
    assert "ValueError: deep down" in text
    assert isinstance(err.cause, ValueError) and err.cause.args == ("deep down",)


def test_except_clause_around_a_nested_failure(ray):
    @ray.remote(max_retries=0)
    def inner():
        raise NeedsArgs(7, "detail")

    @ray.remote(max_retries=0)
    def outer():
        return ray.get(inner.remote())

    try:
        ray.get(outer.remote())
    except NeedsArgs as e:  # what a Ray program writes
        assert e.code == 7 and e.detail == "detail"
    else:
        pytest.fail("NeedsArgs was not raised")


def test_nesting_through_an_actor(ray):
    @ray.remote(max_retries=0)
    def lookup(d, k):
        return d[k]

    @ray.remote
    class Front:
        def ask(self, key):
            return ray.get(lookup.remote({}, key))

    with pytest.raises(KeyError) as info:
        ray.get(Front.remote().ask.remote("absent"))
    assert "lookup" in str(info.value) and "ask" in str(info.value)


def test_a_class_that_refuses_subclassing_falls_back_to_ray_task_error(ray):
    @ray.remote(max_retries=0)
    def inner():
        raise Unsubclassable("odd")

    @ray.remote(max_retries=0)
    def outer():
        return ray.get(inner.remote())

    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(outer.remote())
    assert not isinstance(info.value, Unsubclassable)
    assert isinstance(info.value.cause, Unsubclassable)
    assert "Unsubclassable" in str(info.value) and "odd" in str(info.value)


def test_caught_and_reraised_as_another_class(ray):
    @ray.remote(max_retries=0)
    def inner():
        raise ValueError("first")

    @ray.remote(max_retries=0)
    def outer():
        try:
            ray.get(inner.remote())
        except ValueError as e:
            raise RuntimeError("second") from e

    with pytest.raises(RuntimeError, match="second") as info:
        ray.get(outer.remote())
    assert not isinstance(info.value, ValueError)
    assert "first" in str(info.value)  # the chain is in the traceback text


def test_exceptions_module_has_rays_core_names_and_bases():
    ray_exceptions = pytest.importorskip("ray.exceptions")
    # Compiled graphs (accelerated DAGs) and their channels are not part of Shoal.
    not_applicable = {"RayCgraphCapacityExceeded", "RayChannelError",
                      "RayChannelTimeoutError", "RayDirectTransportError"}
    for name, cls in vars(ray_exceptions).items():
        if not (inspect.isclass(cls) and issubclass(cls, BaseException)
                and cls.__module__.startswith("ray")) or name in not_applicable:
            continue
        ours = getattr(exc_mod, name, None)
        assert ours is not None, f"libclient.exceptions lacks {name}"
        for base in cls.__bases__:
            ours_base = getattr(exc_mod, base.__name__, None) or _builtin(base.__name__)
            assert ours_base is not None and issubclass(ours, ours_base), (name, base)
    assert issubclass(exc_mod.ActorDiedError, exc_mod.RayActorError)
    assert issubclass(exc_mod.ActorAlreadyExistsError, ValueError)


def _builtin(name):
    import builtins

    return getattr(builtins, name, None)
