"""Shared fixtures: a real embedded cluster (gcsd, stored, raylet as processes)."""

import os
import sys

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Child processes (daemons, workers, driver scripts) import from the checkout.
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")


@pytest.fixture(scope="module")
def ray():
    """An embedded two-CPU cluster shared by a test module; torn down after it."""
    import libclient

    info = libclient.init(num_cpus=2, object_store_memory=1 << 30)
    logs = None
    try:
        yield libclient
        logs = _read_logs(info["session_dir"])
    finally:
        libclient.shutdown()
    if logs is not None:
        from test_ops_support import check_log_text

        for text in logs.values():  # every daemon line follows docs/logging.md
            check_log_text(text)
    assert not os.path.exists(info["session_dir"]), "session dir left behind"


def _read_logs(session_dir):
    folder = os.path.join(session_dir, "logs")
    return {name: open(os.path.join(folder, name)).read() for name in os.listdir(folder)}


def children_of_me():
    return psutil.Process().children(recursive=True)


@pytest.fixture(autouse=True, scope="session")
def no_leaked_processes():
    yield
    leftover = [p for p in children_of_me() if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    for p in leftover:
        p.kill()
    assert not leftover, f"tests leaked processes: {[p.cmdline() for p in leftover]}"
