"""Runtime env data and packaging without any daemon: spec (pure) and packages (files)."""

import io
import os
import zipfile

import pytest

from libclient.runtime_env import packages, spec
from libclient.runtime_env.spec import RuntimeEnvError


def test_validate_normalises_and_refuses_clearly(tmp_path):
    env = spec.validate({"env_vars": {"A": "1"}, "working_dir": str(tmp_path),
                         "pip": {"packages": ["six"]}, "config": {"eager_install": True}})
    assert env == {"env_vars": {"A": "1"}, "working_dir": str(tmp_path), "pip": ["six"],
                   "config": {"eager_install": True}}
    assert spec.validate(None) == {} and spec.validate({"env_vars": {}}) == {}
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nsix==1.16.0\n\n")
    assert spec.validate({"pip": str(req)}) == {"pip": ["six==1.16.0"]}
    bad = [({"env_vars": {"A": None}}, "dict of str to str"),
           ({"env_vars": {"A=B": "1"}}, "invalid variable name"),
           ({"py_modules": "x"}, "must be a list"),
           ({"py_modules": [str(tmp_path / "nope")]}, "neither a directory"),
           ({"pip": [""]}, "invalid requirement"),
           ({"pip": ["--index-url=http://x"]}, "invalid requirement"),
           ({"pip": {"packages": ["a"], "pip_version": "==23"}}, "pip_version"),
           ({"excludes": ["*.log"]}, "only applies to"),
           ({"config": {"nope": 1}}, "unknown runtime_env\\['config'\\] field"),
           ({"container": {}}, "not supported by Shoal"),
           ({1: 2}, "keys must be strings")]
    for value, message in bad:
        with pytest.raises(RuntimeEnvError, match=message):
            spec.validate(value)
    assert issubclass(RuntimeEnvError, ValueError)


def test_merge_follows_ray_inheritance():
    parent = {"env_vars": {"A": "1", "B": "1"}, "working_dir": "gcs://_shoal_pkg_a.zip",
              "pip": ["six"]}
    child = {"env_vars": {"B": "2"}, "working_dir": "gcs://_shoal_pkg_b.zip"}
    assert spec.merge(parent, child) == {"env_vars": {"A": "1", "B": "2"},
                                         "working_dir": "gcs://_shoal_pkg_b.zip",
                                         "pip": ["six"]}
    assert spec.merge(parent, {}) is parent and spec.merge({}, child) is child


def test_env_key_is_canonical_and_empty_for_no_env():
    assert spec.env_key({}) == ""
    a = spec.env_key({"env_vars": {"A": "1", "B": "2"}, "pip": ["x"]})
    b = spec.env_key({"pip": ["x"], "env_vars": {"B": "2", "A": "1"}})
    assert a == b and a != spec.env_key({"env_vars": {"A": "1"}})


def test_check_wire_never_trusts_a_peer():
    good = {"env_vars": {"A": "1"}, "working_dir": "gcs://_shoal_pkg_" + "0" * 40 + ".zip",
            "py_modules": [], "pip": ["six"], "config": {"setup_timeout_seconds": 5}}
    key, env = spec.check_wire(good)
    assert key == spec.env_key(good) and env is good
    for bad in ([], {"x": 1}, {"env_vars": {"A": 1}}, {"env_vars": {"": "1"}},
                {"working_dir": "/etc"}, {"working_dir": "gcs://_shoal_pkg_../x.zip"},
                {"py_modules": "gcs://_shoal_pkg_a.zip"}, {"pip": ["-e ."]},
                {"config": {"setup_timeout_seconds": "1"}}):
        with pytest.raises(ValueError):
            spec.check_wire(bad)


def _tree(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_packing_is_deterministic_and_honours_excludes(tmp_path):
    files = {"a.py": "A", "pkg/b.py": "B", "pkg/data.bin": "D", "logs/x.log": "L",
             "sub/.gitignore": "*.tmp\n", "sub/keep.txt": "K", "sub/drop.tmp": "T",
             ".git/HEAD": "ref", "__pycache__/a.pyc": "c", ".rayignore": "logs/\n"}
    _tree(tmp_path / "one", files)
    _tree(tmp_path / "two", files)
    uri1, data1 = packages.pack(str(tmp_path / "one"), ["*.bin"])
    uri2, data2 = packages.pack(str(tmp_path / "two"), ["*.bin"])
    assert uri1 == uri2 and data1 == data2 and uri1.startswith(spec.URI_PREFIX)
    names = sorted(zipfile.ZipFile(io.BytesIO(data1)).namelist())
    assert names == [".rayignore", "a.py", "pkg/b.py", "sub/.gitignore", "sub/keep.txt"]
    # Unchanged files: no second zip. A change: a new name.
    assert packages.pack(str(tmp_path / "one"), ["*.bin"]) == (uri1, None)
    (tmp_path / "one" / "a.py").write_text("changed")
    uri3, data3 = packages.pack(str(tmp_path / "one"), ["*.bin"])
    assert uri3 != uri1 and data3 is not None
    # py_modules keep the package's own directory name.
    _uri, data = packages.pack(str(tmp_path / "two" / "pkg"), top=True)
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == ["pkg/b.py", "pkg/data.bin"]


def test_packages_over_the_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(packages, "MAX_PACKAGE_BYTES", 1000)
    _tree(tmp_path, {"big.txt": "x" * 2000, "small.txt": "y"})
    with pytest.raises(RuntimeEnvError, match="over the 0 MiB limit.*big.txt"):
        packages.pack(str(tmp_path))
    packages.pack(str(tmp_path), ["big.txt"])  # excluded: fits


class _FakeKv:
    """gcsd's kv calls, in memory: enough to test chunking and unpacking."""

    address = "memory"

    def __init__(self):
        self.kv = {}

    def kv_exists(self, ns, key):
        return (ns, _b(key)) in self.kv

    def kv_put(self, ns, key, value):
        self.kv[(ns, _b(key))] = value

    def kv_get(self, ns, key):
        return self.kv.get((ns, _b(key)))


def _b(key):
    return key.encode() if isinstance(key, str) else key


def test_upload_chunks_and_unpack_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(packages, "CHUNK_BYTES", 64)
    _tree(tmp_path / "src", {"m.py": "X = 1\n" * 50, "d/e.txt": os.urandom(100).hex()})
    os.chmod(tmp_path / "src" / "m.py", 0o755)
    kv = _FakeKv()
    uri = packages.upload_path(kv, str(tmp_path / "src"))
    name = spec.package_name(uri)
    assert sum(1 for ns, k in kv.kv if k.startswith(name.encode() + b":")) > 2
    cache = tmp_path / "cache"
    where = packages.ensure_local(kv, uri, str(cache))
    assert where == str(cache / name)
    assert (cache / name / "m.py").read_text() == "X = 1\n" * 50
    assert os.stat(cache / name / "m.py").st_mode & 0o777 == 0o755
    assert packages.ensure_local(kv, uri, str(cache)) == where  # cached
    kv.kv[(packages.KV_NS, f"{name}:1".encode())] = b"tampered"
    with pytest.raises(RuntimeEnvError, match="corrupt"):
        packages.ensure_local(kv, uri, str(tmp_path / "other-node"))
    with pytest.raises(RuntimeEnvError, match="not in gcsd"):
        packages.ensure_local(kv, spec.URI_PREFIX + "f" * 40 + ".zip", str(cache))
