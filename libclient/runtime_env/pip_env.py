"""runtime_env['pip']: requirements installed once per node into a cached target dir.

Decided: built with ``pip install --target`` into ``<node runtime dir>/
runtime_resources/pip/<hash>``, keyed by the requirement list and the
worker's Python version, and put first on the worker's ``sys.path``. Ray
clones a virtualenv instead; a target directory gives the same isolation
for what a task imports (the base packages stay visible, as with Ray's
``--system-site-packages``) without copying an interpreter. pip resolves
from the indexes this machine's pip is configured for (PyPI here).
Limits: modules the worker has already imported before the task runs
(msgpack, cloudpickle, ...) keep their base version; ``pip_version`` is
refused (the nodes' pip is used).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from libclient.exceptions import RuntimeEnvSetupError
from libclient.runtime_env.packages import _locked

_DONE = ".shoal-pip-done"


def pip_key(requirements: list[str]) -> str:
    text = "\n".join([sys.version.split()[0], *requirements])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def ensure(requirements: list[str], cache_dir: str, timeout: float | None) -> str:
    """The directory holding ``requirements``, installing them the first time.

    Raises:
        RuntimeEnvSetupError: pip failed or took longer than ``timeout``.
    """
    target = os.path.join(cache_dir, "pip", pip_key(requirements))
    if os.path.exists(os.path.join(target, _DONE)):
        return target
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    with _locked(target + ".lock"):
        if os.path.exists(os.path.join(target, _DONE)):
            return target
        tmp = tempfile.mkdtemp(prefix=".pip-", dir=os.path.dirname(target))
        argv = [sys.executable, "-m", "pip", "install", "--no-input", "--quiet",
                "--disable-pip-version-check", "--no-warn-script-location",
                "--target", tmp, *requirements]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeEnvSetupError(
                f"pip install {' '.join(requirements)} took longer than {timeout:.0f} s "
                "(runtime_env['config']['setup_timeout_seconds'])") from None
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
            raise RuntimeEnvSetupError(f"pip install {' '.join(requirements)} failed "
                                       f"(status {proc.returncode}):\n" + "\n".join(tail))
        open(os.path.join(tmp, _DONE), "w").close()
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    return target
