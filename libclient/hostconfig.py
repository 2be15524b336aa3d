"""The host config: one TOML file per host, read by gcsd, stored, raylet and ``shoal``.

Theory of operation. :data:`SCHEMA` lists every key as ``[section] key``
with a parser and a default. A value can come from four layers; a later
layer wins:

1. the default in :data:`SCHEMA`;
2. the file: ``--config PATH``, else ``$SHOAL_CONFIG``, else
   ``/etc/shoal/shoal.toml`` if it exists (``none`` reads no file);
3. the environment: ``SHOAL_<SECTION>_<KEY>``, e.g. ``SHOAL_STORED_MEMORY=2G``;
4. flags: a daemon's own flags (``--memory``) and ``--set section.key=value``.

Every value goes through its key's parser whichever layer it came from, so a
bad value is refused the same way everywhere, with a message that names the
key and where the value came from. Unknown sections and keys are refused too
(with a did-you-mean), because a typo silently ignored is a setting that
silently does not apply. Defaults that depend on other keys (sockets under
``runtime_dir``, gcsd's data under ``state_dir``) are filled in last.

Pure: reads the file it is pointed at and the environment mapping it is
given; it creates nothing.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from libclient.logs import LEVELS

DEFAULT_PATH = "/etc/shoal/shoal.toml"
PATH_ENV = "SHOAL_CONFIG"
NO_FILE = "none"
# Top-level keys older config files carried; accepted and ignored.
_LEGACY_TOP_LEVEL = {"session_dir"}
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# [gcsd] max_message: gcsd's own snapshot and chain frames need room (a
# snapshot message is 2000 records of a few hundred bytes, ~1 MiB); past 4 GiB
# no length a client library writes could reach it.
MIN_GCSD_MESSAGE = 4 << 20
MAX_GCSD_MESSAGE = 1 << 32


class ConfigError(Exception):
    """A config value, file or flag is wrong; daemons exit with status 2."""


# ---------------------------------------------------------------- parsers
# A parser takes (value, text) -- text is True when the value is a string from
# the environment or a flag that may need converting -- and returns the value
# or raises ValueError with a reason that reads after the key's name.
Parser = Callable[[Any, bool], Any]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string(value: Any, _text: bool) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _path(value: Any, text: bool) -> str:
    # Relative paths are made absolute by resolve(): against the config file's
    # directory for file values, the working directory for flags and env.
    return os.path.normpath(_string(value, text))


def _int(lo: int, hi: int) -> Parser:
    def parse(value: Any, text: bool) -> int:
        if text and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"must be an integer {lo}..{hi}, got {value!r}")
        return value
    return parse


def _number(minimum: float, strict: bool) -> Parser:
    op = ">" if strict else ">="

    def parse(value: Any, text: bool) -> float:
        if text and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        if not _is_number(value) or value < minimum or (strict and value == minimum):
            raise ValueError(f"must be a number {op} {minimum:g}, got {value!r}")
        return float(value)
    return parse


def _bool(value: Any, text: bool) -> bool:
    if text and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def parse_bytes(value: Any) -> int:
    """Accept an int or a string like ``"512M"``/``"2GiB"``.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
        if m:
            return int(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"must be a byte count like 1073741824 or '1G', got {value!r}")


def _bytes(minimum: int, maximum: int | None = None) -> Parser:
    def parse(value: Any, _text: bool) -> int:
        n = parse_bytes(value)
        if maximum is not None and not minimum <= n <= maximum:
            raise ValueError(f"must be a byte count {minimum}..{maximum}, got {n}")
        if n < minimum:
            raise ValueError(f"must be > {minimum - 1}, got {n}" if minimum else
                             f"must be >= 0, got {n}")
        return n
    return parse


def _hex_id(value: Any, _text: bool) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2}){0,64}", value):
        raise ValueError(f"must be a hex string (e.g. 32 hex digits), got {value!r}")
    return value.lower()


def _level(value: Any, _text: bool) -> str:
    if not isinstance(value, str) or value.lower() not in LEVELS:
        raise ValueError(f"must be one of {', '.join(LEVELS)}, got {value!r}")
    return value.lower()


def _destination(value: Any, text: bool) -> str:
    if value == "stderr":
        return value
    try:
        return _path(value, text)
    except ValueError:
        raise ValueError(f"must be \"stderr\" or a directory path, got {value!r}") from None


def gcs_address(value: str) -> str:
    """Normalise ``host:port`` or ``tcp://host:port`` to ``tcp://host:port``.

    Raises:
        ValueError: not of that form.
    """
    address = value if value.startswith("tcp://") else f"tcp://{value}"
    m = re.fullmatch(r"tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", address)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"must be addresses like 'tcp://10.0.0.1:6379', got {value!r}")
    return address


def _listen_address(value: Any, text: bool) -> str:
    """``host:port`` to bind, port 0 meaning any free port (``[v6]:port`` too)."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", _string(value, text))
    if not m or int(m.group(2)) > 65535:
        raise ValueError(f"must be host:port like '0.0.0.0:7070' (port 0: any), got {value!r}")
    return value


def _members(value: Any, text: bool) -> list[str]:
    if text and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a non-empty list of addresses, got {value!r}")
    members = [gcs_address(v) for v in value]
    if len(set(members)) != len(members):
        raise ValueError(f"lists an address twice: {members}")
    return members


def _resources(value: Any, text: bool) -> dict[str, float]:
    if text and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not a JSON object: {exc}") from None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and _is_number(v) and v >= 0 for k, v in value.items()):
        raise ValueError(f"must map resource names to numbers >= 0, got {value!r}")
    return {k: float(v) for k, v in value.items()}


@dataclass(frozen=True)
class Key:
    """One config key: how to parse it, its default (None: unset/derived), what it is."""

    parse: Parser
    default: Any
    help: str


SCHEMA: dict[str, dict[str, Key]] = {
    "node": {
        "id": Key(_hex_id, "", "hex node id; empty: raylet picks a random one per start"),
        "address": Key(_string, "127.0.0.1", "address other hosts reach this node at"),
        "runtime_dir": Key(_path, "/run/shoal", "sockets and pid files (tmpfs)"),
        "state_dir": Key(_path, "/var/lib/shoal", "persistent data (gcsd LMDB, spill)"),
    },
    "log": {
        "level": Key(_level, "info", "minimum level written"),
        "destination": Key(_destination, "stderr",
                           '"stderr" (journald, supervisord) or a directory for <daemon>.log'),
    },
    "gcs": {
        "members": Key(_members, ["tcp://127.0.0.1:6379"],
                       "gcsd request addresses; raylets start with the first"),
        "shards": Key(_int(1, 4096), 4, "number of gcsd key shards"),
        "chain_length": Key(_int(1, 16), 1, "replicas per shard chain (<= members)"),
        "connect_timeout_s": Key(_number(0, True), 10.0,
                                 "how long a raylet waits for gcsd at start"),
    },
    "gcsd": {
        "host": Key(_string, "127.0.0.1", "interface gcsd binds"),
        "port": Key(_int(0, 65534), 6379, "request port; pub-sub uses port+1"),
        "data_dir": Key(_path, None, "LMDB directory; default <state_dir>/gcs"),
        "node_timeout_s": Key(_number(0, True), 10.0, "declare a silent node DEAD after this"),
        "sync": Key(_bool, False, "fsync every LMDB commit"),
        "member_id": Key(_int(0, 4096), None, "this gcsd's index in [gcs] members"),
        "master": Key(_string, None, "the chain master's address (with several members)"),
        "role": Key(_string, "member", '"member", or "master" for the chain master'),
        "heartbeat_s": Key(_number(0, True), 0.1, "member -> master heartbeat interval"),
        "dead_s": Key(_number(0, True), 0.6, "master: drop a member silent this long"),
        "max_message": Key(_bytes(MIN_GCSD_MESSAGE, MAX_GCSD_MESSAGE), None,
                           "largest ZeroMQ message gcsd reads (ZMQ_MAXMSGSIZE; bytes, '64M'); "
                           "default 64M"),
    },
    "stored": {
        "socket": Key(_path, None, "default <runtime_dir>/stored.sock"),
        "memory": Key(_bytes(1), None, "arena capacity (bytes, '8G'); default 30% of RAM"),
        "spill_dir": Key(_path, None, "spill directory; default <state_dir>/spill"),
        "spill": Key(_bool, True, "spill held objects to spill_dir when memory is full; "
                                  "false: such creates fail with ObjectStoreFullError"),
        "prefault": Key(_bytes(0), 0, "pre-fault this many arena bytes after start"),
        "transfer_address": Key(_listen_address, None,
                                "TCP host:port other stores pull objects from; default "
                                "<[node] address>:0 (port 0: any free port)"),
    },
    "raylet": {
        "socket": Key(_path, None, "default <runtime_dir>/raylet.sock"),
        "num_cpus": Key(_number(0, False), None, "override detected CPUs"),
        "num_gpus": Key(_number(0, False), None, "override detected GPUs"),
        "memory": Key(_bytes(0), None, "override detected memory (bytes)"),
        "resources": Key(_resources, {}, "custom resources, e.g. {accel = 2}"),
        "max_workers": Key(_int(1, 1 << 16), None, "cap on worker processes"),
        "worker_python": Key(_path, None, "interpreter for workers; default the raylet's"),
        "port": Key(_int(0, 65535), 0,
                    "TCP port other hosts reach this raylet on ([node] address); 0: any free"),
        "head": Key(_bool, False, "this node is the head (drivers given a gcsd address "
                                  "prefer it)"),
    },
    "security": {
        "keys_dir": Key(_path, None, "cluster key directory (shoal keygen); unset: links "
                                     "between hosts are neither authenticated nor encrypted"),
        "encrypt_bulk": Key(_bool, True, "encrypt stored-to-stored transfers; false: "
                                         "authenticate only (HMAC), for trusted networks"),
        "allowed_group": Key(_string, None, "local group whose users may use this node's "
                                            "Unix sockets besides the daemons' user and root "
                                            "(runtime dir then 0750, sockets 0660)"),
        "max_frame": Key(_bytes(1024), None, "largest message a daemon or worker reads "
                                             "(default 64M; stored: at most 16M; gcsd: "
                                             "[gcsd] max_message)"),
        "max_connections": Key(_int(1, 1 << 20), None, "connections each listening socket "
                                                       "serves at once (default 4096)"),
        "stall_s": Key(_number(0, True), None, "cut off a peer that read none of its "
                                               "unread output (more than stall_bytes) for "
                                               "this long (default 60; stored's transfer "
                                               "port: at most --transfer-timeout)"),
        "stall_bytes": Key(_bytes(0), None, "unread output a peer may leave for any time "
                                            "(default 4M)"),
    },
}


def env_name(section: str, key: str) -> str:
    """The environment variable that sets ``[section] key``."""
    return f"SHOAL_{section}_{key}".upper()


@dataclass
class HostConfig:
    """The resolved config: every key of every section has a value (None: unset)."""

    values: dict[str, dict[str, Any]]
    path: str | None

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def gcs_address(self) -> str:
        """The gcsd a raylet or ``shoal`` talks to first."""
        return self.values["gcs"]["members"][0]


def config_path(flag: str | None, env: Mapping[str, str]) -> str | None:
    """Which file to read: flag, then $SHOAL_CONFIG, then the default if it exists."""
    chosen = flag if flag is not None else env.get(PATH_ENV) or None
    if chosen is None:
        return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None
    return None if chosen == NO_FILE else chosen


def _unknown(kind: str, names: list[str], known: list[str]) -> str:
    hints = [f"{n!r} -> {m[0]!r}" for n in names
             if (m := difflib.get_close_matches(n, known, n=1))]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return f"unknown {kind}: {sorted(names)}{hint}"


def _read_file(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by uid {os.getuid()}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    loose = sorted(set(data) - set(tables) - _LEGACY_TOP_LEVEL)
    if loose:
        raise ConfigError(f"config file {path}: keys must sit in a [section]; "
                          + _unknown("top-level config keys", loose, list(SCHEMA)))
    unknown_sections = sorted(set(tables) - set(SCHEMA))
    if unknown_sections:
        raise ConfigError(f"config file {path}: "
                          + _unknown("config sections", unknown_sections, list(SCHEMA)))
    for section, table in tables.items():
        unknown = sorted(set(table) - set(SCHEMA[section]))
        if unknown:
            raise ConfigError(f"config file {path}: "
                              + _unknown(f"[{section}] config keys", unknown,
                                         list(SCHEMA[section])))
    return tables


def _parse_assignment(item: str) -> tuple[str, str, str]:
    name, sep, value = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot:
        raise ConfigError(f"--set takes section.key=value, got {item!r}")
    if section not in SCHEMA:
        raise ConfigError(f"--set {item!r}: "
                          + _unknown("config sections", [section], list(SCHEMA)))
    if key not in SCHEMA[section]:
        raise ConfigError(f"--set {item!r}: " + _unknown(f"[{section}] config keys", [key],
                                                          list(SCHEMA[section])))
    return section, key, value


def resolve(path: str | None, env: Mapping[str, str] | None = None,
            flags: Mapping[str, Any] | None = None,
            assignments: list[str] | None = None) -> HostConfig:
    """Merge defaults, the file, the environment and flags; check every value.

    Args:
        path: the file to read (see :func:`config_path`), or None for none.
        env: the environment (``os.environ`` by default).
        flags: ``{"section.key": value}`` from a daemon's own flags; None values
            are ignored (flag not given). String values are converted.
        assignments: ``--set`` items, ``"section.key=value"``.

    Raises:
        ConfigError: naming the key, the problem and where the value came from.
    """
    env = os.environ if env is None else env
    cwd = os.getcwd()
    # (section, key, value, is text, source for messages, base of relative paths)
    layers: list[tuple[str, str, Any, bool, str, str]] = []
    if path is not None:
        base = os.path.dirname(os.path.abspath(path))
        for section, table in _read_file(path).items():
            for key, value in table.items():
                layers.append((section, key, value, False, f"config file {path}", base))
    for section, keys in SCHEMA.items():
        for key in keys:
            raw = env.get(env_name(section, key))
            if raw:
                layers.append((section, key, raw, True,
                               f"environment variable {env_name(section, key)}", cwd))
    for name, value in (flags or {}).items():
        if value is not None:
            section, _, key = name.partition(".")
            layers.append((section, key, value, isinstance(value, str), "command line", cwd))
    for item in assignments or []:
        section, key, value = _parse_assignment(item)
        layers.append((section, key, value, True, f"--set {item}", cwd))

    values = {s: {k: spec.default for k, spec in keys.items()} for s, keys in SCHEMA.items()}
    for section, key, value, text, source, base in layers:
        parser = SCHEMA[section][key].parse
        try:
            parsed = parser(value, text)
        except ValueError as exc:
            raise ConfigError(f"{source}: [{section}] {key} {exc}") from None
        if parser in (_path, _destination) and parsed != "stderr":
            parsed = os.path.normpath(os.path.join(base, parsed))
        values[section][key] = parsed
    _derive(values)
    return HostConfig(values, path)


def _derive(values: dict[str, dict[str, Any]]) -> None:
    """Fill the defaults that depend on other keys and check keys against each other."""
    run, state = values["node"]["runtime_dir"], values["node"]["state_dir"]
    values["stored"]["socket"] = values["stored"]["socket"] or os.path.join(run, "stored.sock")
    values["raylet"]["socket"] = values["raylet"]["socket"] or os.path.join(run, "raylet.sock")
    values["gcsd"]["data_dir"] = values["gcsd"]["data_dir"] or os.path.join(state, "gcs")
    values["stored"]["spill_dir"] = values["stored"]["spill_dir"] or os.path.join(state, "spill")
    gcs = values["gcs"]
    if gcs["chain_length"] > len(gcs["members"]):
        raise ConfigError(f"[gcs] chain_length is {gcs['chain_length']} but [gcs] members "
                          f"lists only {len(gcs['members'])} gcsd(s)")
    if values["stored"]["socket"] == values["raylet"]["socket"]:
        raise ConfigError("[stored] socket and [raylet] socket are the same path")


def render(config: HostConfig) -> str:
    """The resolved config as TOML, for ``shoal config`` and for the docs."""
    lines: list[str] = []
    for section, keys in config.values.items():
        lines.append(f"[{section}]")
        for key, value in keys.items():
            if value is None:
                lines.append(f"# {key} = (unset)  # {SCHEMA[section][key].help}")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return json.dumps(value)
