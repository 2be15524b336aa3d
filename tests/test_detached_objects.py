"""A detached actor's objects outlive the driver that created the actor (issue 10).

The actor owns what it puts and what its own tasks return, so those objects
live as long as the actor does, not as long as its creator's driver: a
later driver reads them through the actor, as in Ray.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np


def _driver(ray, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    sock = ray.api._core.raylet_socket
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), sock],
                          capture_output=True, text=True, timeout=timeout)


def test_a_detached_actors_objects_outlive_its_creators_driver(ray):
    res = _driver(ray, """
        import sys
        import numpy as np
        import libclient as ray
        ray.init(address=sys.argv[1], namespace="detached-objects")

        @ray.remote
        def square(n):
            return np.arange(n, dtype=np.int64) ** 2

        @ray.remote
        class Holder:
            def make(self):
                # Owned by this actor: a put (in the store) and a task's return.
                self.refs = [ray.put(np.full(300_000, 7, dtype=np.int64)),
                             square.remote(200_000)]
                ray.wait(self.refs, num_returns=2, timeout=60)
                return True
            def refs_(self):
                return self.refs

        h = Holder.options(name="holder", lifetime="detached").remote()
        assert ray.get(h.make.remote(), timeout=60)
        print("MADE", flush=True)
        ray.shutdown()
    """)
    assert res.returncode == 0 and "MADE" in res.stdout, res.stderr[-3000:]
    holder = ray.get_actor("holder", namespace="detached-objects")
    try:
        put_ref, task_ref = ray.get(holder.refs_.remote(), timeout=30)
        put_value, task_value = ray.get([put_ref, task_ref], timeout=30)
        assert put_value.shape == (300_000,) and int(put_value.sum()) == 7 * 300_000
        assert np.array_equal(task_value, np.arange(200_000, dtype=np.int64) ** 2)
    finally:
        ray.kill(holder)
