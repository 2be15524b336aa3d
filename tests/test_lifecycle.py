"""Embedded-cluster lifecycle: clean shutdown, a killed driver, bad input, a full store, GPUs.

Each test runs its driver as a separate process, so it owns its own cluster,
and checks the processes, sockets and /dev/shm it leaves behind.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

_SHM = "/dev/shm"


def _shm() -> set:
    return set(os.listdir(_SHM)) if os.path.isdir(_SHM) else set()


def _run_driver(code: str, tmp_path, env=None, timeout=120) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(code))
    full_env = dict(os.environ, SHOAL_TMPDIR=str(tmp_path / "rt"), **(env or {}))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def _wait_gone(pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return alive


def _tree(pid):
    try:
        proc = psutil.Process(pid)
        return [proc.pid] + [c.pid for c in proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


DRIVER = """
import json, os, sys
import psutil
import libclient as ray

info = ray.init(num_cpus=2, object_store_memory=64 << 20)

@ray.remote
def f(x):
    return x + 1

assert ray.get(f.remote(1)) == 2
ref = ray.put(b"x" * (1 << 20))
assert len(ray.get(ref)) == 1 << 20
me = psutil.Process()
pids = [c.pid for c in me.children(recursive=True)]
print(json.dumps({"pids": pids, "session": info["session_dir"]}), flush=True)
{tail}
"""


def test_shutdown_leaves_nothing_behind(tmp_path):
    before = _shm()
    res = _run_driver(DRIVER.replace("{tail}", "ray.shutdown()"), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["pids"]) >= 5  # launcher, gcsd, stored, raylet, workers
    assert _wait_gone(out["pids"]) == []
    assert not os.path.exists(out["session"])
    assert _shm() - before == set()


def test_interpreter_exit_without_shutdown_cleans_up(tmp_path):
    before = _shm()
    res = _run_driver(DRIVER.replace("{tail}", ""), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert _wait_gone(out["pids"]) == []
    assert not os.path.exists(out["session"])
    assert _shm() - before == set()


def test_killed_driver_takes_the_cluster_down(tmp_path):
    before = _shm()
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER.replace("{tail}", "import time; time.sleep(600)")))
    env = dict(os.environ, SHOAL_TMPDIR=str(tmp_path / "rt"))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        out = json.loads(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _wait_gone(out["pids"]) == []
        deadline = time.monotonic() + 10
        while os.path.exists(out["session"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(out["session"])
        assert _shm() - before == set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_malformed_bytes_do_not_take_the_raylet_down(ray):
    from libclient.protocol import Connection, pack

    sock_path = ray.api._core.raylet_socket
    cases = [b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff" + b"x" * 100,
             pack({"no_type": 1}), pack({"t": "bogus", "r": 1}),
             pack({"t": "lease", "r": 1, "res": "not a map"}),
             pack({"t": "lease", "r": 2, "res": {"CPU": -5}}),
             pack({"t": "hello", "r": 3, "kind": "worker", "worker_id": b"nope"})]
    for payload in cases:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        s.sendall(payload)
        s.settimeout(5)
        try:
            s.recv(4096)  # an error reply, or the connection closes
        except (ConnectionResetError, TimeoutError):
            pass
        s.close()
    # A client that vanishes mid-frame.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(b"\x00\x01\x00\x00partial")
    s.close()
    conn = Connection.connect_unix(sock_path)
    assert conn.call({"t": "ping"})["ok"]
    conn.close()

    @ray.remote
    def still_works():
        return "yes"

    assert ray.get(still_works.remote(), timeout=30) == "yes"


def test_store_full_raises_clearly(tmp_path):
    res = _run_driver("""
        import numpy as np
        import libclient as ray
        from libclient.exceptions import ObjectStoreFullError
        ray.init(num_cpus=1, object_store_memory=48 << 20)
        held = [ray.put(np.ones(16 << 20, dtype=np.uint8)) for _ in range(2)]
        # Values being read are pinned: stored can neither evict nor spill them.
        views = [ray.get(r) for r in held]
        try:
            ray.put(np.ones(20 << 20, dtype=np.uint8))
        except ObjectStoreFullError as e:
            print("FULL", e)
        else:
            print("NOT FULL")
        del held, views
        # Once nobody holds them, the old objects are evicted to make room.
        ref = ray.put(np.ones(20 << 20, dtype=np.uint8))
        print("OK", int(ray.get(ref).sum()))
        ray.shutdown()
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FULL" in res.stdout and "NOT FULL" not in res.stdout
    assert f"OK {20 << 20}" in res.stdout


FAKE_PYNVML = '''
"""A stand-in for NVIDIA's pynvml: this machine has no GPU."""
class NVMLError(Exception):
    pass
class _Mem:
    total = 16 * 1024 ** 3
def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 2
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetName(h): return "Fake GPU %d" % h
def nvmlDeviceGetUUID(h): return "GPU-fake-%d" % h
def nvmlDeviceGetMemoryInfo(h): return _Mem()
'''


def test_gpus_detected_and_assigned(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    res = _run_driver("""
        import os
        import libclient as ray
        ray.init(num_cpus=2)
        print("GPU", ray.cluster_resources().get("GPU"))
        print("NAMES", [g["name"] for g in ray.nodes()[0]["GPUs"]])

        @ray.remote(num_gpus=1)
        def gpu_task():
            return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

        ids, env = ray.get(gpu_task.remote())
        print("TASK", ids, env)
        ray.shutdown()
    """, tmp_path, env={"PYTHONPATH": f"{fake}{os.pathsep}{os.environ['PYTHONPATH']}"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GPU 2" in res.stdout
    assert "Fake GPU 0" in res.stdout
    assert "TASK [0] 0" in res.stdout or "TASK [1] 1" in res.stdout


def test_no_gpu_driver_reports_zero(ray):
    assert "GPU" not in ray.cluster_resources()


@pytest.mark.parametrize("flag", ["--num-cpus=-1", "--resources={bad json"])
def test_raylet_bad_config_exits_nonzero(tmp_path, flag):
    res = subprocess.run([sys.executable, "-m", "daemons.raylet", "--socket",
                          str(tmp_path / "r.sock"), "--store-socket", "x", "--gcs-address",
                          "tcp://127.0.0.1:1", flag], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "error:" in res.stderr



MANY_FDS_DRIVER = """
import os, resource
import libclient as ray

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < 4096:
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096 if hard == resource.RLIM_INFINITY
                                                else min(4096, hard), hard))
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
probe = os.open("/dev/null", os.O_RDONLY)
assert probe >= 1100, probe  # every descriptor init() opens from here on is past 1024
os.close(probe)

ray.init(num_cpus=2, object_store_memory=64 << 20)

@ray.remote
def f(x):
    return x + 1

@ray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n

for i in range(20):  # synchronous gets: the waiting thread polls the worker's socket
    assert ray.get(f.remote(i)) == i + 1
assert ray.get([f.remote(i) for i in range(50)]) == list(range(1, 51))
c = Counter.remote()
assert ray.get(c.inc.remote()) == 1
assert ray.get([c.inc.remote() for _ in range(20)])[-1] == 21
assert len(ray.get(ray.put(b"x" * (1 << 20)))) == 1 << 20
ray.shutdown()
for fd in held:
    os.close(fd)
print("ok", flush=True)
"""


def test_driver_with_more_than_1024_open_files(tmp_path):
    # select() cannot take a descriptor >= 1024 ("filedescriptor out of range
    # in select()"); every wait in libclient must cope with such a process.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    res = _run_driver(MANY_FDS_DRIVER, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "ok"
