"""Workers' stdout and stderr reach the driver with Ray's prefix (real processes).

Each test runs a driver script in a subprocess and reads what that driver
printed. The multi-node case runs the printing task and actor on a second
cluster_utils node, so the lines travel worker → its raylet → (TCP) the
driver's raylet → the driver.
"""

import os
import subprocess
import sys
import textwrap

from libclient.worker_output import OutputSplitter, marker, prefix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------- pure parts
def test_splitter_tracks_contexts_and_partial_lines():
    s = OutputSplitter()
    out = s.feed((marker(3, "f") + "a\nb").encode())
    assert out == [(3, "f", "a")]
    # A new context ends the partial line; the marker may arrive in pieces.
    m = marker(4, "Actor").encode()
    assert s.feed(m[:3]) == [(3, "f", "b")]
    assert s.feed(m[3:] + b"c\n\xff\n") == [(4, "Actor", "c"), (4, "Actor", "\ufffd")]
    assert s.feed(b"no newline yet") == [] and s.feed(b"!\n") == [(4, "Actor",
                                                                   "no newline yet!")]
    assert prefix("f", 12, "1.2.3.4") == "(f pid=12, ip=1.2.3.4)"


# ------------------------------------------------------------- real clusters
def test_stdout_and_stderr_of_tasks_and_actors_on_another_node():
    proc = _run("""
        import os, sys, time
        import libclient as ray
        from libclient.cluster_utils import Cluster

        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            c.add_node(num_cpus=1, resources={"other": 2})
            c.wait_for_nodes()
            c.connect()

            @ray.remote(resources={"other": 1})
            def shout(i):
                print("out-line", i)
                print("err-line", i, file=sys.stderr)
                return os.getpid()

            @ray.remote(resources={"other": 1})
            class Printer:
                def say(self):
                    print("from-actor")
                    sys.stderr.write("actor-err\\n")
                    return os.getpid()

            pid = ray.get(shout.remote(7))
            p = Printer.remote()
            apid = ray.get(p.say.remote())
            time.sleep(1.5)  # the lines travel in batches
            print("PIDS", pid, apid, flush=True)
        finally:
            c.shutdown()
    """)
    out, err = proc.stdout, proc.stderr
    pids = [line for line in out.splitlines() if line.startswith("PIDS")][0].split()
    pid, apid = int(pids[1]), int(pids[2])
    assert f"(shout pid={pid}, ip=127.0.0.1) out-line 7" in out.splitlines()
    assert f"(shout pid={pid}, ip=127.0.0.1) err-line 7" in err.splitlines()
    assert f"(Printer pid={apid}, ip=127.0.0.1) from-actor" in out.splitlines()
    assert f"(Printer pid={apid}, ip=127.0.0.1) actor-err" in err.splitlines()
    assert "out-line" not in err and "err-line" not in out  # each on its own stream


def test_log_to_driver_false_silences_workers():
    proc = _run("""
        import sys, time
        import libclient as ray

        ray.init(num_cpus=1, log_to_driver=False)

        @ray.remote
        def shout():
            print("should-not-appear")
            print("nor-this", file=sys.stderr)
            return 1

        assert ray.get(shout.remote()) == 1
        time.sleep(1.0)
        print("DONE", flush=True)
        ray.shutdown()
    """)
    assert "DONE" in proc.stdout
    assert "should-not-appear" not in proc.stdout + proc.stderr
    assert "nor-this" not in proc.stdout + proc.stderr


def test_a_worker_that_prints_a_lot_never_blocks():
    proc = _run("""
        import time
        import libclient as ray

        ray.init(num_cpus=1)

        @ray.remote
        def flood(n):
            for i in range(n):
                print("flood", i, "x" * 100)
            print("flood-end")
            return n

        t = time.monotonic()
        assert ray.get(flood.remote(200_000), timeout=60) == 200_000
        took = time.monotonic() - t
        time.sleep(2.0)
        print("TOOK", took, flush=True)
        ray.shutdown()
    """, timeout=180)
    lines = proc.stdout.splitlines()
    assert any(line.endswith(") flood-end") for line in lines)
    got = sum(1 for line in lines if ") flood " in line)
    dropped = "lines of worker output were dropped" in proc.stderr
    assert got == 200_000 or dropped, got  # all of it, or the driver is told what was lost
