"""Runtime environments against real daemons, on a two-node cluster_utils cluster.

The head has 2 CPUs; the second node 1 CPU and the resource ``far``, so a
task asking for ``far`` runs there. Nodes share nothing but gcsd's TCP
address: a working_dir or py_modules package reaches the second node only
through gcsd, and is unpacked into that node's own runtime directory.
"""

import os
import sys
import uuid

import cloudpickle
import pytest

from libclient.cluster_utils import Cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        c.add_node(num_cpus=1, resources={"far": 1})
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def ray(cluster):
    """A driver of its own for each test (so init(runtime_env=...) can differ)."""
    import libclient

    cluster.connect(namespace="renv")
    try:
        yield libclient
    finally:
        libclient.shutdown()
        cluster.connected = False


def _far_node(cluster):
    (node,) = cluster.worker_nodes
    return node


def _env_and_pid(name):
    return os.environ.get(name), os.getpid()


def test_env_vars_reach_tasks_and_actors(ray):
    @ray.remote
    def read(name):
        return _env_and_pid(name)

    value, _ = ray.get(read.options(runtime_env={"env_vars": {"SHOAL_T1": "task"}})
                       .remote("SHOAL_T1"), timeout=60)
    assert value == "task"

    @ray.remote(runtime_env={"env_vars": {"SHOAL_T1": "actor", "OTHER": "x"}})
    class Reader:
        def read(self, name):
            return os.environ.get(name)

    actor = Reader.remote()
    assert ray.get(actor.read.remote("SHOAL_T1"), timeout=60) == "actor"
    assert ray.get(actor.read.remote("OTHER"), timeout=60) == "x"
    # A plain task does not see either.
    assert ray.get(read.remote("SHOAL_T1"), timeout=60)[0] is None


def test_workers_of_different_envs_are_never_shared(ray):
    @ray.remote
    def read(name):
        return _env_and_pid(name)

    a = read.options(runtime_env={"env_vars": {"SHOAL_MIX": "a"}})
    b = read.options(runtime_env={"env_vars": {"SHOAL_MIX": "b"}})
    refs = []
    for _ in range(12):
        refs += [("a", a.remote("SHOAL_MIX")), ("b", b.remote("SHOAL_MIX")),
                 (None, read.remote("SHOAL_MIX"))]
    pids = {"a": set(), "b": set(), None: set()}
    for want, ref in refs:
        value, pid = ray.get(ref, timeout=60)
        assert value == want
        pids[want].add(pid)
    assert not (pids["a"] & pids["b"]) and not (pids["a"] & pids[None])
    assert not (pids["b"] & pids[None])


def test_job_env_is_merged_under_task_env_and_inherited_by_nested_tasks(cluster):
    import libclient as ray

    cluster.connect(runtime_env={"env_vars": {"JOB_A": "1", "JOB_B": "1"}})
    try:
        @ray.remote
        def read(*names):
            return [os.environ.get(n) for n in names]

        @ray.remote
        def nested():
            return ray.get(read.remote("JOB_A", "JOB_B", "TASK_C"))

        assert ray.get(read.remote("JOB_A", "JOB_B"), timeout=60) == ["1", "1"]
        over = read.options(runtime_env={"env_vars": {"JOB_B": "2", "TASK_C": "3"}})
        assert ray.get(over.remote("JOB_A", "JOB_B", "TASK_C"), timeout=60) == ["1", "2", "3"]
        # A task started by a task runs in its parent's env.
        child = nested.options(runtime_env={"env_vars": {"TASK_C": "c"}})
        assert ray.get(child.remote(), timeout=60) == ["1", "1", "c"]
        assert ray.get_runtime_context().runtime_env["env_vars"]["JOB_A"] == "1"
    finally:
        ray.shutdown()
        cluster.connected = False


def test_working_dir_reaches_a_node_that_lacks_it(cluster, tmp_path):
    import libclient as ray

    mod = f"renv_mod_{uuid.uuid4().hex[:8]}"
    wd = tmp_path / "project"
    (wd / "data").mkdir(parents=True)
    (wd / f"{mod}.py").write_text("VALUE = 41\n")
    (wd / "data" / "note.txt").write_text("hello")
    (wd / "skip.log").write_text("left out")
    (wd / ".gitignore").write_text("*.log\n")
    far = _far_node(cluster)
    cluster.connect(runtime_env={"working_dir": str(wd)})
    try:
        @ray.remote(resources={"far": 1})
        def use():
            import importlib

            m = importlib.import_module(mod)
            return (m.VALUE + 1, m.__file__, os.getcwd(), open("data/note.txt").read(),
                    os.path.exists("skip.log"), ray.get_runtime_context().get_node_id())

        value, path, cwd, note, has_log, node = ray.get(use.remote(), timeout=60)
        assert value == 42 and note == "hello" and not has_log
        assert node == far.node_id
        # Unpacked into the far node's own runtime directory, never the driver's dir.
        assert cwd.startswith(far.session_dir) and path.startswith(cwd)
        assert not cwd.startswith(str(tmp_path))
        assert not cwd.startswith(cluster.head_node.session_dir)

        @ray.remote(resources={"far": 1})
        class Holder:
            def where(self):
                import importlib

                return importlib.import_module(mod).VALUE, os.getcwd()

        h = Holder.remote()
        assert ray.get(h.where.remote(), timeout=60) == (41, cwd)
    finally:
        ray.shutdown()
        cluster.connected = False


def test_identical_dirs_are_stored_once(cluster, tmp_path):
    import libclient as ray
    from libclient.runtime_env import packages

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.py").write_text("X = 1\n")
    cluster.connect()
    try:
        core = ray.api._require()
        u1 = packages.upload_path(core.gcs, str(tmp_path / "one"))
        u2 = packages.upload_path(core.gcs, str(tmp_path / "two"))
        assert u1 == u2
        name = u1[len("gcs://"):-len(".zip")]
        keys = core.gcs.kv_keys(packages.KV_NS, name)
        assert sorted(keys) == sorted([name.encode(), f"{name}:0".encode()])
    finally:
        ray.shutdown()
        cluster.connected = False


def test_py_modules_are_importable(ray, tmp_path):
    pkg = f"renv_pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("from .inner import f\n")
    (tmp_path / pkg / "inner.py").write_text("def f():\n    return 'inner'\n")

    @ray.remote(runtime_env={"py_modules": [str(tmp_path / pkg)]}, resources={"far": 1})
    def use():
        import importlib

        m = importlib.import_module(pkg)
        return m.f(), m.__file__, os.getcwd()

    value, path, _cwd = ray.get(use.remote(), timeout=60)
    assert value == "inner"
    assert "runtime_resources" in path and not path.startswith(str(tmp_path))


def test_bad_runtime_envs_are_refused_clearly(ray, tmp_path):
    @ray.remote
    def f():
        return 1

    cases = [
        ({"env_var": {"A": "1"}}, "unknown runtime_env field 'env_var'"),
        ({"env_vars": {"A": 1}}, "dict of str to str"),
        ({"working_dir": str(tmp_path / "missing")}, "is not a directory"),
        ({"working_dir": "s3://bucket/x.zip"}, "only local directories"),
        ({"conda": "env"}, "not supported by Shoal"),
        ({"pip": "no-such-requirements.txt"}, "not a requirements file"),
        ({"config": {"setup_timeout_seconds": "1"}}, "must be int"),
        ("env_vars", "must be a dict"),
    ]
    for env, message in cases:
        with pytest.raises(ValueError, match=message):
            f.options(runtime_env=env)
    with pytest.raises(ValueError, match="unknown runtime_env field"):
        ray.remote(runtime_env={"bogus": 1})(type("C", (), {}))
    assert ray.get(f.remote(), timeout=30) == 1  # the driver is fine


def test_pip_installs_into_a_cached_target(ray):
    import shutil

    if shutil.which("pip") is None and not os.path.exists(
            os.path.join(os.path.dirname(sys.executable), "pip")):
        pytest.skip("no pip")

    @ray.remote(runtime_env={"pip": ["six==1.16.0"]})
    def use():
        import six

        return six.__version__, six.__file__

    version, path = ray.get(use.remote(), timeout=180)
    assert version == "1.16.0"
    assert os.sep.join(["runtime_resources", "pip"]) in path


def test_pip_failure_is_a_runtime_env_setup_error(ray):
    from libclient.exceptions import RuntimeEnvSetupError

    @ray.remote(runtime_env={"pip": ["shoal-no-such-package-" + uuid.uuid4().hex[:6]]})
    def use():
        return 1

    with pytest.raises(RuntimeEnvSetupError, match="pip install"):
        ray.get(use.remote(), timeout=180)
