"""The host config file: layers, validation, and daemons that fail fast on bad config."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
from test_ops_support import ROOT, check_log_text, free_port, start_daemon, stop

from libclient import hostconfig
from libclient.hostconfig import ConfigError, resolve


def _write(tmp_path, text):
    path = tmp_path / "shoal.toml"
    path.write_text(text)
    return str(path)


def test_defaults_and_derived_paths():
    conf = resolve(None, {})
    assert conf["stored"]["socket"] == "/run/shoal/stored.sock"
    assert conf["raylet"]["socket"] == "/run/shoal/raylet.sock"
    assert conf["gcsd"]["data_dir"] == "/var/lib/shoal/gcs"
    assert conf.gcs_address == "tcp://127.0.0.1:6379"


def test_layers_file_then_env_then_flags_then_set(tmp_path):
    path = _write(tmp_path, '[node]\nruntime_dir = "run"\n[stored]\nmemory = "1G"\n'
                            '[gcs]\nmembers = ["10.0.0.1:7000", "10.0.0.2:7000"]\n'
                            'chain_length = 2\n')
    conf = resolve(path, {})
    assert conf["node"]["runtime_dir"] == str(tmp_path / "run")  # relative to the file
    assert conf["stored"]["socket"] == str(tmp_path / "run" / "stored.sock")
    assert conf["stored"]["memory"] == 1 << 30
    assert conf["gcs"]["members"] == ["tcp://10.0.0.1:7000", "tcp://10.0.0.2:7000"]
    env = {"SHOAL_STORED_MEMORY": "2G", "SHOAL_RAYLET_RESOURCES": '{"accel": 2}'}
    conf = resolve(path, env)
    assert conf["stored"]["memory"] == 2 << 30 and conf["raylet"]["resources"] == {"accel": 2}
    conf = resolve(path, env, {"stored.memory": "3G"})
    assert conf["stored"]["memory"] == 3 << 30
    conf = resolve(path, env, {"stored.memory": "3G"}, ["stored.memory=4G"])
    assert conf["stored"]["memory"] == 4 << 30


@pytest.mark.parametrize("text, env, flags, message", [
    ("[stored]\nmemroy = 5\n", {}, {}, "unknown [stored] config keys: ['memroy'] "
                                       "(did you mean 'memroy' -> 'memory'?)"),
    ("[storedd]\n", {}, {}, "unknown config sections: ['storedd']"),
    ("port = 5\n", {}, {}, "keys must sit in a [section]"),
    ("[gcsd]\nport = 'eighty'\n", {}, {}, "[gcsd] port must be an integer"),
    ("[raylet]\nnum_cpus = 'four'\n", {}, {}, "[raylet] num_cpus must be a number"),
    ("[raylet]\nresources = {accel = -1}\n", {}, {}, "[raylet] resources must map"),
    ("[log]\nlevel = 'loud'\n", {}, {}, "[log] level must be one of"),
    ("[gcs]\nchain_length = 3\n", {}, {}, "[gcs] chain_length is 3 but [gcs] members"),
    ("", {"SHOAL_GCSD_SYNC": "maybe"}, {},
     "environment variable SHOAL_GCSD_SYNC: [gcsd] sync must be true or false"),
    ("", {}, {"stored.memory": "lots"}, "command line: [stored] memory must be a byte count"),
    ("[stored\n", {}, {}, "is not valid TOML"),
])
def test_bad_values_name_the_key_and_the_source(tmp_path, text, env, flags, message):
    with pytest.raises(ConfigError) as info:
        resolve(_write(tmp_path, text), env, flags)
    assert message in str(info.value)


def test_set_rejects_unknown_keys_and_config_path_rules(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown \[node\] config keys: \['idd'\]"):
        resolve(None, {}, {}, ["node.idd=ab"])
    with pytest.raises(ConfigError, match="section.key=value"):
        resolve(None, {}, {}, ["memory=1G"])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(str(tmp_path / "missing.toml"), {})
    assert hostconfig.config_path("none", {}) is None
    assert hostconfig.config_path(None, {"SHOAL_CONFIG": "/x.toml"}) == "/x.toml"
    assert hostconfig.config_path("/y.toml", {"SHOAL_CONFIG": "/x.toml"}) == "/y.toml"


def test_example_config_parses_and_every_key_is_documented():
    conf = resolve(str(ROOT / "systemd" / "shoal.toml"), {})
    assert conf["gcsd"]["data_dir"] == "/var/lib/shoal/gcs"
    doc = (ROOT / "docs" / "operations.md").read_text()
    for section, keys in hostconfig.SCHEMA.items():
        for key in keys:
            assert f"`{hostconfig.env_name(section, key)}`" in doc, (section, key)


def _run_daemon(args, timeout=60, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, preexec_fn=preexec_fn)


def _drop_dac_override():
    # Root ignores mode bits through CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH; drop
    # them from the bounding set so the exec'd daemon is refused like anyone.
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


def _fatal(res):
    assert res.returncode == 2, res.stderr
    events = check_log_text(res.stderr)  # the failure itself is a JSON line too
    fatal = [e for e in events if e["event"] == "fatal"]
    assert fatal and fatal[-1]["summary"].startswith("error: ")
    return fatal[-1]["error"]


def test_daemons_refuse_unknown_key_and_wrong_type(tmp_path):
    path = _write(tmp_path, "[stored]\nmemory = '1G'\ncapacity = 5\n")
    error = _fatal(_run_daemon(["daemons.stored", "--config", path]))
    assert "[stored] config keys: ['capacity']" in error
    path = _write(tmp_path, "[raylet]\nnum_cpus = 'many'\n")
    error = _fatal(_run_daemon(["daemons.raylet", "--config", path]))
    assert "[raylet] num_cpus must be a number" in error and path in error


def test_raylet_fails_fast_when_gcsd_is_unreachable(tmp_path):
    port = free_port()  # nobody listens there
    res = _run_daemon(["daemons.raylet", "--config", "none",
                       "--set", f"node.runtime_dir={tmp_path}/run",
                       "--set", f"gcs.members=127.0.0.1:{port}",
                       "--set", "gcs.connect_timeout_s=1", "--num-cpus", "1"])
    error = _fatal(res)
    assert f"cannot register with gcsd at tcp://127.0.0.1:{port}" in error
    assert not os.path.exists(tmp_path / "run" / "raylet.sock")


def test_socket_directory_without_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        res = _run_daemon(["daemons.stored", "--config", "none", "--memory", "1M",
                           "--socket", str(locked / "sub" / "stored.sock")],
                          preexec_fn=_drop_dac_override if os.geteuid() == 0 else None)
    finally:
        locked.chmod(0o700)
    error = _fatal(res)
    assert f"socket directory {locked / 'sub'} is not usable" in error
    assert "Permission denied" in error


def test_daemon_reads_config_from_environment(tmp_path):
    path = _write(tmp_path, f'[node]\nruntime_dir = "{tmp_path}/run"\nid = "abcd"\n'
                            f'[stored]\nmemory = "4M"\n[log]\nlevel = "debug"\n')
    env = dict(os.environ, SHOAL_CONFIG=path, SHOAL_LOG_DESTINATION=str(tmp_path / "logs"))
    proc, ready = start_daemon("stored", [], tmp_path / "stderr.txt", env=env)
    try:
        assert ready == {"socket": f"{tmp_path}/run/stored.sock", "capacity": 4 << 20,
                         "transfer_address": ready["transfer_address"]}
    finally:
        assert stop(proc) == 0
    events = check_log_text((tmp_path / "logs" / "stored.log").read_text())
    assert events[0]["event"] == "stored_started" and events[0]["config"] == path
    assert {e["node_id"] for e in events} == {"abcd"}
    assert (tmp_path / "stderr.txt").read_text() == ""
