"""systemd units and supervisord.conf: verified by the tools that will run them."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys

import pytest
from test_ops_support import ROOT

UNITS = ["gcsd.service", "stored.service", "raylet.service", "shoal.target"]
SERVICES = UNITS[:3]


def _units() -> dict[str, configparser.ConfigParser]:
    out = {}
    for name in UNITS:
        cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
        cp.optionxform = str  # systemd keys are case-sensitive
        cp.read(ROOT / "systemd" / name)
        out[name] = cp
    return out


def _script(name: str) -> str:
    # Console scripts sit beside the interpreter in a venv and in pyenv.
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.access(path, os.X_OK) else (shutil.which(name) or path)


def _verify(directory) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", "--recursive-errors=no",
                           *[str(directory / u) for u in UNITS]],
                          capture_output=True, text=True, timeout=120, cwd=directory)


@pytest.fixture
def unit_copies(tmp_path):
    """The units with ExecStart pointing at this install's console scripts."""
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text()
        for daemon in ("gcsd", "stored", "raylet"):
            text = text.replace(f"/usr/local/bin/{daemon} ", f"{_script(daemon)} ")
        (tmp_path / name).write_text(text)
    return tmp_path


def test_systemd_analyze_verify_reports_nothing(unit_copies):
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install systemd (systemd-analyze); see .ci/run")
        pytest.skip("systemd-analyze is not installed")
    res = _verify(unit_copies)
    # Warnings fail too: verify exits 0 on some of them, so any output is a failure.
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr
    # And the check can fail: a misspelt key is reported.
    broken = (unit_copies / "stored.service").read_text().replace("RestartSec=", "RestartSecs=")
    (unit_copies / "stored.service").write_text(broken)
    assert "RestartSecs" in (_verify(unit_copies).stderr)


def test_units_follow_the_service_contract():
    units = _units()
    for name in SERVICES:
        svc, unit = units[name]["Service"], units[name]["Unit"]
        assert svc["Type"] == "notify" and svc["Restart"] == "on-failure"
        assert int(svc["WatchdogSec"]) > 0
        assert svc["User"] == "shoal" and "DynamicUser" not in svc
        assert svc["RemoveIPC"] == "no"
        assert "shoal.target" in unit["PartOf"].split()
        assert units[name]["Install"]["WantedBy"] == "shoal.target"
        assert svc["ExecStart"].startswith(f"/usr/local/bin/{name.split('.')[0]} ")
    for name in ("stored.service", "raylet.service"):
        assert units[name]["Service"]["RuntimeDirectory"] == "shoal"
        assert units[name]["Service"]["RuntimeDirectoryPreserve"] == "yes"
        assert "PrivateDevices" not in units[name]["Service"]  # /dev/shm, /dev/nvidia*
        assert "DevicePolicy" not in units[name]["Service"]
    assert units["gcsd.service"]["Service"]["StateDirectory"] == "shoal"
    after = units["raylet.service"]["Unit"]["After"].split()
    assert "stored.service" in after and "gcsd.service" in after
    assert "gcsd.service" in units["stored.service"]["Unit"]["After"].split()
    assert units["shoal.target"]["Install"]["WantedBy"] == "multi-user.target"


def test_supervisord_conf_has_the_group_and_restart_policy():
    cp = configparser.RawConfigParser()
    cp.read(ROOT / "supervisord.conf")
    assert cp["group:shoal"]["programs"] == "gcsd,stored,raylet"
    priorities = [int(cp[f"program:{p}"]["priority"]) for p in ("gcsd", "stored", "raylet")]
    assert priorities == sorted(priorities)
    for program in ("gcsd", "stored", "raylet"):
        section = cp[f"program:{program}"]
        for key in ("autorestart", "startsecs", "stopasgroup", "killasgroup", "stdout_logfile"):
            assert key in section, (program, key)
        assert section["stopasgroup"] == section["killasgroup"] == "true"
