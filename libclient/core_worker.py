"""Compatibility shim: the core worker now lives in :mod:`libclient.core`."""

from libclient.core import CoreWorker, error_wire_from

__all__ = ["CoreWorker", "error_wire_from"]
