"""``ray.remote_function``: Ray's import path for ``RemoteFunction``, what
``@remote`` makes of a function (defined in libclient/api.py)."""

from libclient.api import RemoteFunction

__all__ = ["RemoteFunction"]
