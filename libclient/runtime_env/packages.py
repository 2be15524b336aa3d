"""working_dir and py_modules packages: zip, name by content, store in gcsd, unpack.

The driver zips a local directory deterministically (sorted entries, fixed
timestamps), so the package's SHA-1 names its content and identical
directories are uploaded once (URI ``gcs://_shoal_pkg_<sha1>.zip``). gcsd
keeps it in its kv table under the ``runtime_env_pkgs`` namespace, split
into 4 MiB chunks (far under the 64 MiB frame limit, and spread over the
shards by key); the manifest is written last, so a manifest means a whole
package. Each node unpacks a package once into its own runtime directory,
under a file lock, through a temporary directory and an atomic rename:
nodes never share these files, they fetch from gcsd over TCP.

What is left out: ``.git`` and ``__pycache__`` (they would make the name
depend on history or on whether Python ran there), the patterns of
``.gitignore`` and ``.rayignore`` files (each applies below its own
directory, as in Ray), and the ``excludes`` patterns of the runtime_env.
Patterns are gitignore-like: ``name`` matches at any depth, ``a/b`` is
anchored, a trailing ``/`` matches directories only, ``*``/``?``/``[]``
wildcards; negation (``!``) is not supported.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import io
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Any

import msgpack

from libclient.runtime_env.spec import URI_PREFIX, RuntimeEnvError, package_name

KV_NS = "runtime_env_pkgs"
CHUNK_BYTES = 4 * 1024 * 1024
# Ray refuses packages over its gRPC limit; gcsd is no blob store either.
MAX_PACKAGE_BYTES = int(os.environ.get("SHOAL_RUNTIME_ENV_MAX_BYTES", 100 * 1024 * 1024))
ALWAYS_EXCLUDED = (".git", "__pycache__")
IGNORE_FILES = (".gitignore", ".rayignore")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

# (path, excludes, top) -> (signature, uri, zip bytes or None once uploaded)
_packed: dict[tuple, tuple[tuple, str]] = {}
_uploaded: set[tuple[str, str]] = set()  # (gcs address, uri) this process stored


class _Rule:
    __slots__ = ("base", "pattern", "dir_only", "anchored")

    def __init__(self, base: str, pattern: str) -> None:
        self.base = base  # directory (relative, "" for the top) the rule applies below
        self.dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        if pattern.startswith("**/"):
            pattern = pattern[3:]
        self.anchored = "/" in pattern
        self.pattern = pattern.lstrip("/")

    def matches(self, rel: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        if self.base:
            if not rel.startswith(self.base + "/"):
                return False
            rel = rel[len(self.base) + 1:]
        if self.anchored:
            return fnmatch.fnmatchcase(rel, self.pattern)
        return fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], self.pattern)


def _rules_in(directory: str, base: str) -> list[_Rule]:
    rules = []
    for name in IGNORE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith(("#", "!")):
                        rules.append(_Rule(base, line))
    return rules


def _walk(root: str, excludes: list[str]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, absolute path, stat) of every file to pack, sorted."""
    rules = [_Rule("", p) for p in (*ALWAYS_EXCLUDED, *excludes)]

    def visit(directory: str, rel_dir: str, rules: list[_Rule]) -> Iterator:
        rules = rules + _rules_in(directory, rel_dir)
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise RuntimeEnvError(f"cannot read {directory}: {exc}") from None
        for name in names:
            path = os.path.join(directory, name)
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling link or a file that went away
            is_dir = stat.S_ISDIR(st.st_mode)
            if any(r.matches(rel, is_dir) for r in rules):
                continue
            if is_dir:
                yield from visit(path, rel, rules)
            elif stat.S_ISREG(st.st_mode):
                yield rel, path, st

    yield from visit(root, "", rules)


def _files(path: str, excludes: list[str], top: bool) -> list[tuple[str, str, os.stat_result]]:
    if os.path.isfile(path):
        return [(os.path.basename(path), path, os.stat(path))]
    files = list(_walk(path, excludes))
    if top:  # py_modules: the package's own directory is part of every name
        prefix = os.path.basename(os.path.normpath(path))
        files = [(f"{prefix}/{rel}", p, st) for rel, p, st in files]
    total = sum(st.st_size for _, _, st in files)
    if total > MAX_PACKAGE_BYTES:
        biggest = sorted(files, key=lambda f: -f[2].st_size)[:3]
        named = ", ".join(f"{rel} ({st.st_size / 2**20:.1f} MiB)" for rel, _, st in biggest)
        raise RuntimeEnvError(
            f"{path} holds {total / 2**20:.1f} MiB to upload, over the "
            f"{MAX_PACKAGE_BYTES / 2**20:.0f} MiB limit for a runtime_env package (largest: "
            f"{named}); leave files out with runtime_env['excludes'] or a .rayignore file")
    return files


def _zip(files: list[tuple[str, str, os.stat_result]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for rel, path, st in files:
            info = zipfile.ZipInfo(rel, _ZIP_TIME)
            info.external_attr = ((st.st_mode & 0o777) | stat.S_IFREG) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as f:
                zf.writestr(info, f.read())
    return buf.getvalue()


def pack(path: str, excludes: list[str] | None = None, top: bool = False
         ) -> tuple[str, bytes | None]:
    """Zip ``path``; return its URI and the bytes (None if this process packed
    the same unchanged files before: sizes and mtimes are compared)."""
    excludes = list(excludes or ())
    files = _files(path, excludes, top)
    signature = tuple((rel, st.st_size, st.st_mtime_ns, st.st_mode) for rel, _, st in files)
    cache_key = (path, tuple(excludes), top)
    known = _packed.get(cache_key)
    if known is not None and known[0] == signature:
        return known[1], None
    data = _zip(files)
    uri = f"{URI_PREFIX}{hashlib.sha1(data).hexdigest()}.zip"
    _packed[cache_key] = (signature, uri)
    return uri, data


def upload(gcs: Any, uri: str, data: bytes | None) -> None:
    """Store the package in gcsd unless it is there already."""
    mark = (str(getattr(gcs, "address", "")), uri)
    if mark in _uploaded:
        return
    name = package_name(uri)
    if not gcs.kv_exists(KV_NS, name):
        if data is None:
            raise RuntimeEnvError(f"package {uri} is not in gcsd and its bytes are gone")
        chunks = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        for i, chunk in enumerate(chunks):
            gcs.kv_put(KV_NS, f"{name}:{i}", chunk)
        gcs.kv_put(KV_NS, name, msgpack.packb(
            {"size": len(data), "chunks": len(chunks), "sha1": name[len("_shoal_pkg_"):]}))
    _uploaded.add(mark)


def upload_path(gcs: Any, path: str, excludes: list[str] | None = None, top: bool = False
                ) -> str:
    """Pack and upload a local directory (or .py file); return its URI."""
    if path.startswith(URI_PREFIX):
        return path
    uri, data = pack(path, excludes, top)
    if data is None and (str(getattr(gcs, "address", "")), uri) not in _uploaded:
        _packed.pop((path, tuple(excludes or ()), top), None)
        uri, data = pack(path, excludes, top)
    upload(gcs, uri, data)
    return uri


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_local(gcs: Any, uri: str, cache_dir: str) -> str:
    """The directory ``uri`` is unpacked to on this node, fetching it from gcsd
    the first time (one process at a time per package).

    Raises:
        RuntimeEnvError: the package is not in gcsd, or is corrupt.
    """
    name = package_name(uri)
    target = os.path.join(cache_dir, name)
    if os.path.isdir(target):
        return target
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    with _locked(os.path.join(cache_dir, f".{name}.lock")):
        if os.path.isdir(target):
            return target
        raw = gcs.kv_get(KV_NS, name)
        if raw is None:
            raise RuntimeEnvError(f"package {uri} is not in gcsd (was the driver's upload lost?)")
        manifest = msgpack.unpackb(raw, raw=False)
        parts = []
        for i in range(int(manifest["chunks"])):
            chunk = gcs.kv_get(KV_NS, f"{name}:{i}")
            if chunk is None:
                raise RuntimeEnvError(f"package {uri} is missing chunk {i} in gcsd")
            parts.append(chunk)
        data = b"".join(parts)
        if len(data) != manifest["size"] or hashlib.sha1(data).hexdigest() != manifest["sha1"]:
            raise RuntimeEnvError(f"package {uri} in gcsd is corrupt (size or hash differ)")
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir)
        try:
            _unzip(data, tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _unzip(data: bytes, into: str) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            name = info.filename
            if name.startswith("/") or ".." in name.split("/"):
                raise RuntimeEnvError(f"package entry {name!r} points outside the package")
            path = zf.extract(info, into)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(path, mode)
