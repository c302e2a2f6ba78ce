"""Reading rotator.yaml: the YAML text in, a frozen rotator.config.Config out.

Reads the config file (and checks that `cwd` directories exist) but opens no sockets and
starts no processes. It walks the YAML node tree so that every problem names the line of
the offending value and its key path (with a did-you-mean for unknown keys); all problems
are collected and raised together in one ConfigError, so a broken file is fixed in one pass.
It also holds the value parsers the file shares with the command line: durations, sizes,
`--env NAME=VALUE`, and where the file is looked for (`default_path`).

The specs themselves, and what is derived from them at run time (rendering a command,
start order, deploy overrides, stored definitions), live in rotator.config.

Layout: the public functions first, then the private `_Parser` and its helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import math
import os
import re
import signal
from collections.abc import Callable, Collection, Mapping
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import yaml
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import Reader, ReaderError

from rotator import envfile
from rotator.config import (
    Address,
    AdminSpec,
    CanarySpec,
    ComponentSpec,
    Config,
    ConfigError,
    HealthSpec,
    KubernetesExport,
    LimitsSpec,
    Problem,
    ProxySpec,
    RestartPolicy,
    WatchSpec,
    foreign_placeholder,
    socket_paths,
    split_words,
    watch_base,
)
from rotator.printer import duration

T = TypeVar("T")
Entry = tuple[Node, Node]  # (key node, value node): keys carry the line for "unknown key"

TOP_KEYS = ("admin", "state_dir", "max_clients", "defaults", "components", "export")
KUBERNETES_KEYS = ("image", "images", "namespace")  # export.kubernetes
HEALTH_KEYS = (
    "path",
    "interval",
    "timeout",
    "start_timeout",
    "unhealthy_threshold",
    "tcp",
    "exec",
    "ready",  # sd_notify (notify.py)
    "watchdog",
)
READY_MODES = ("poll", "notify")
# The keys that choose the kind of check: one per block; a component's replaces the default's.
HEALTH_KINDS = ("path", "tcp", "exec")
LOGS_KEYS = ("max_size", "keep")
CANARY_KEYS = ("duration", "min_requests", "max_error_rate", "max_latency_ratio")
ENV_FILE_KEYS = ("path", "required")  # an env_file item as a mapping, as in docker compose
DEFAULT_KEYS = (
    "health",
    "drain_timeout",
    "stop_signal",
    "stop_timeout",
    "hold_timeout",
    "verify",
    "max_restarts",
    "restart_window",
    "restart_backoff",
    "restart_backoff_max",
    "cwd",
    "env",
    "connect_timeout",
    "read_timeout",
    "request_timeout",
    "keepalive_timeout",
    "header_timeout",
    "trust_forwarded",
    "max_header_size",
    "max_headers",
    "max_connections",
    "max_clients",
    "transport",
    "sockets",
    "env_file",
    "logs",
    "replicas",
    "canary",
    "max_memory",
    "restart_every",
    "limits_interval",
    # Restart on save (rotator.watcher).
    "watch",
    "watch_ignore",
    "watch_debounce",
)
PER_COMPONENT_KEYS = ("listen", "ports", "command", "depends_on")
COMPONENT_KEYS = PER_COMPONENT_KEYS + DEFAULT_KEYS

STR_TAG = "tag:yaml.org,2002:str"
NULL_TAG = "tag:yaml.org,2002:null"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ADDRESS = re.compile(r"(?:\[([^\]\s]+)\]|([^\s:\[\]]+)):(\d+)")
_PORTS = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_INTEGER = re.compile(r"\s*[-+]?\d+\s*")
_NUMBER = re.compile(r"\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*")
_DURATION = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h)?")
# 1m30s, 2h 05m: units from the largest down, as rotator prints durations (and nginx reads them).
_DURATION_PART = r"(?:\d+(?:\.\d*)?|\.\d+)\s*(?:ms|s|m|h)"
_COMPOUND = re.compile(rf"{_DURATION_PART}(?:\s*{_DURATION_PART})+")
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)")
_UNITS: dict[str | None, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# A rate: a percentage (1%, 0.5%) or a bare fraction (0.005). Signed, to say "negative".
_RATE = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(%)?")
_SIZE = re.compile(r"([-+]?\d+)\s*(B|KiB|MiB)?")
_SIZE_UNITS: dict[str | None, int] = {"B": 1, "KiB": 1024, "MiB": 1024 * 1024, None: 1}
_BOOLEANS = {"true": True, "false": False}
_WILDCARDS = {"0.0.0.0", "::"}
_IMAGE = re.compile(r"\S+")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes namespace
TRANSPORTS = ("tcp", "unix")
# Nesting a file may have (rotator.yaml itself needs 5). PyYAML composes recursively,
# so without a limit 1,000 levels would end in a RecursionError.
MAX_DEPTH = 100
MAX_SOCKETS = 1000  # a socket pool this large already has more than any rotation needs
# A pool holds replicas + 1 (a rotation starts one new instance before an old one stops),
# and a socket pool at most MAX_SOCKETS; a thousand processes is past any one machine anyway.
MAX_REPLICAS = MAX_SOCKETS - 1
TOP = "(top level)"  # the field of a problem with the file as a whole
# Guessing a did-you-mean compares a name with every candidate; past this many
# comparisons in one file (20,000 components each naming an unknown one) guesses stop.
HINT_BUDGET = 200_000
# The longest Unix socket path that binds everywhere: sun_path is 104 bytes on macOS
# (108 on Linux), including the terminating NUL.
MAX_SOCKET_PATH = 103
# The socket pool's size when `sockets` is not set, for one replica: more replicas get as
# many spare paths beside them as one has (a rotation's new instance, and old ones draining).
DEFAULT_SOCKETS = 4
# The smallest limits: below these about any process passes max_memory at once, an
# instance would hardly serve before restart_every replaces it, and checking the
# limits (a process scan) would cost more than it tells.
MIN_MAX_MEMORY = 1024 * 1024
MIN_RESTART_EVERY = 1.0
MIN_LIMITS_INTERVAL = 0.1


def parse_duration(value: object) -> float:
    """Seconds from 250ms, 2s, 1.5m, 1h, 1m30s or a bare number of seconds (30, 0.5, "30")."""
    seconds: float | None = None
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
            seconds = float(m[1]) * _UNITS[m[2]]
        elif isinstance(value, str) and _COMPOUND.fullmatch(value.strip()):
            parts = [(float(n), _UNITS[unit]) for n, unit in _PART.findall(value)]
            if all(a[1] > b[1] for a, b in itertools.pairwise(parts)):
                seconds = sum(n * unit for n, unit in parts)
    except OverflowError:
        seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a duration (use 250ms, 2s, 1m or a number of seconds)")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative (a duration must be 0 or more)")
    return seconds


def parse_rate(value: object) -> float:
    """A fraction from 0 to 1 from a percentage (1%, 0.5%, "100%") or a bare fraction below 1
    (0.005). A bare 1 or more is refused rather than guessed: `1` could mean 1% or 100%."""
    rate: Fraction | None = None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        rate = Fraction(value)
        written, percentage = str(value), False
    elif isinstance(value, str) and (m := _RATE.fullmatch(value.strip())):
        # Exact decimals: 0.3% then equals 3 errors in 1,000 requests, not a hair less.
        rate = Fraction(m[1]) / 100 if m[2] else Fraction(m[1])
        written, percentage = m[1], bool(m[2])
    if rate is None:
        raise ValueError(
            f"{value!r} is not a rate (use a percentage such as 1% or 0.5%, or a fraction"
            " below 1 such as 0.005)"
        )
    if rate < 0:
        raise ValueError(f"{value!r} is negative (a rate must be 0% or more)")
    if percentage and rate > 1:
        raise ValueError(f"{value!r} is more than 100%")
    if not percentage and rate >= 1:
        raise ValueError(
            f"{value!r} is not a fraction below 1: write {written}% for a percentage"
            " (a bare number is a fraction: 0.01 is 1%)"
        )
    return float(rate)


def parse_size(value: object) -> int:
    """Bytes from 512B, 64KiB, 1MiB or a bare number of bytes (65536, "65536")."""
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        with contextlib.suppress(ValueError):  # more digits than int() converts
            size = int(m[1]) * _SIZE_UNITS[m[2]]
    if size is None:
        raise ValueError(f"{value!r} is not a size (use 512B, 64KiB, 1MiB or a number of bytes)")
    if size < 0:
        raise ValueError(f"{value!r} is negative (a size must be 0 or more)")
    return size


def default_path(env: Mapping[str, str]) -> Path:
    return Path(env.get("ROTATOR_CONFIG") or "rotator.yaml")


def load(path: Path | str) -> Config:
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        problem = Problem(str(path), None, "", f"cannot read the config file: {reason}")
        raise ConfigError([problem]) from None
    try:
        return parse(data.decode("utf-8"), path)
    except UnicodeDecodeError as exc:
        # Read on with the bad bytes replaced, so that other problems are found in the
        # same pass; the first bad byte is named at its line and field.
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        where = (len(data[: exc.start].decode("utf-8")), line)
        message = f"byte 0x{data[exc.start]:02x} at column {column} is not UTF-8 (the file must be)"
        return parse(data.decode("utf-8", "replace"), path, bad_encoding=(*where, message))


def parse(text: str, path: Path, bad_encoding: tuple[int, int, str] | None = None) -> Config:
    """The config in `text`; `bad_encoding`: (character index, line, message) of a byte
    that was not UTF-8 in the file (and was replaced), reported with the other problems."""
    parser = _Parser(Path(path))
    if bad_encoding:
        index, line, message = bad_encoding
        parser.problems.append(Problem(parser.file, line, _field_at(text, index) or TOP, message))
    config = parser.config(text)
    if parser.problems or config is None:
        raise ConfigError(sorted(parser.problems, key=lambda p: p.line or 0))
    return config


def parse_env_assignments(items: list[str]) -> dict[str, str]:
    """{"K": "V"} from `--env K=V` arguments; split at the first '=', a later K wins."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env {item!r} is not NAME=VALUE (no '=')")
        if not name:
            raise ValueError(f"--env {item!r} has an empty name (use NAME=VALUE)")
        env[name] = value
    return env


# -- private: walking the YAML node tree ---------------------------------------------------------


class _Parser:
    """Walks the YAML node tree (not plain dicts) so every problem can name its line."""

    def __init__(self, path: Path) -> None:
        self.file = str(path)
        self.path = Path(os.path.abspath(path.expanduser()))
        self.base = self.path.parent
        self.state_dir = self.base.joinpath(".rotator").resolve()
        self.loader = yaml.SafeLoader("")  # only its constructors are used, to type scalars
        self.problems: list[Problem] = []
        # For the cross-component checks: (owner, value, node, field path).
        self.listens: list[tuple[str, Address, Node | None, str]] = []
        self.pools: list[tuple[str, tuple[int, ...], Node, str]] = []
        # (component, field path, [(dependency name, its node)]) for check_dependencies.
        self.dependencies: list[tuple[str, str, list[tuple[str, Node]]]] = []
        self.component_names: list[str] = []  # as written, valid or not
        self.hint_budget = HINT_BUDGET

    def fail(self, node: Node | None, path: str, message: str, line: int | None = None) -> None:
        if node is not None:
            line = node.start_mark.line + 1
        self.problems.append(Problem(self.file, line, path or TOP, message))

    # -- the file ----------------------------------------------------------------------------

    def config(self, text: str) -> Config | None:
        if (root := self.compose(text)) is False:
            return None
        top = self.mapping(root, "", TOP_KEYS)
        if top is None:
            return None
        admin = AdminSpec()
        admin_keys = self.mapping(_value(top, "admin"), "admin", ("listen",)) or {}
        if "listen" in admin_keys and (
            addr := self.address(admin_keys["listen"][1], "admin.listen")
        ):
            admin = AdminSpec(addr)
        self.listens.append(
            ("the admin API", admin.listen, _value(admin_keys, "listen"), "admin.listen")
        )
        state_dir = self.state_dir
        if "state_dir" in top and (found := self.path_value(top["state_dir"][1], "state_dir")):
            state_dir = self.state_dir = found
            if (problem := _not_a_directory(state_dir)) not in (None, "does not exist"):
                self.fail(top["state_dir"][1], "state_dir", f"{state_dir} {problem}")
        max_clients = None
        if "max_clients" in top:
            max_clients = self.total_clients(top["max_clients"][1], "max_clients")
        defaults = self.defaults(_value(top, "defaults"))
        # A missing `components` is reported where the file's mapping begins.
        first_line = 1 if root is None else root.start_mark.line + 1
        components = self.components(top.get("components"), defaults, first_line)
        self.check_overlaps()
        kubernetes = self.kubernetes(_value(top, "export"))
        return Config(self.path, admin, state_dir, components, kubernetes, max_clients)

    def compose(self, text: str) -> Node | Literal[False] | None:
        """The file's root node (None for an empty file); False once a problem is reported."""
        loader: _Loader | None = None
        try:
            loader = _Loader(text)
            return loader.get_single_node()
        except _TooDeep as exc:
            field = _field(loader.keys if loader else [])
            message = f"nested more than {MAX_DEPTH} levels deep"
            self.fail(None, field, message, exc.mark.line + 1)
        except ReaderError as exc:  # a character YAML does not allow (a NUL, say)
            line = text.count("\n", 0, exc.position) + 1
            what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else "a character"
            message = f"invalid YAML: {what} is not allowed in a YAML file"
            self.fail(None, _field_at(text, exc.position), message, line)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            field = _field(loader.keys if loader else [])
            message = f"invalid YAML: {exc.problem or exc.context}"
            self.fail(None, field, message, 1 if mark is None else mark.line + 1)
        except yaml.YAMLError as exc:  # not raised by PyYAML 6 while composing; one line anyway
            self.fail(None, "", f"invalid YAML: {' '.join(str(exc).split())}", 1)
        finally:
            if loader is not None:
                loader.dispose()
        return False

    def defaults(self, node: Node | None) -> dict[str, Any]:
        # Parsed once, so a bad default is reported once, at its defaults.* path.
        found = self.mapping(node, "defaults", DEFAULT_KEYS + PER_COMPONENT_KEYS) or {}
        for key in PER_COMPONENT_KEYS:
            if key in found:
                self.fail(found[key][0], f"defaults.{key}", "can only be set per component")
        values = self.shared(found, "defaults")
        self.check_backoff(found, values, {}, "defaults")
        return values

    def components(
        self, entry: Entry | None, defaults: dict[str, Any], first_line: int
    ) -> tuple[ComponentSpec, ...]:
        if entry is None:
            message = "missing (at least one component is required)"
            self.fail(None, "components", message, first_line)
            return ()
        found = self.mapping(entry[1], "components")
        if found == {}:
            self.fail(entry[1], "components", "must list at least one component")
        specs = [self.component(name, *kv, defaults) for name, kv in (found or {}).items()]
        self.component_names = list(found or {})
        self.check_dependencies(self.component_names)
        return tuple(spec for spec in specs if spec is not None)

    def component(
        self, name: str, key: Node, node: Node, defaults: dict[str, Any]
    ) -> ComponentSpec | None:
        path = f"components.{name}"
        if not _NAME.fullmatch(name):  # names end up in file names
            self.fail(
                key,
                path,
                f"{name!r} is not a valid name (letters, digits, '_', '.', '-';"
                " starting with a letter or digit)",
            )
        found = self.mapping(node, path, COMPONENT_KEYS)
        if found is None:
            return None
        listen = self.required(found, key, path, "listen", "the public host:port", self.address)
        # Read quietly here (a bad value is reported with the shared keys): it decides
        # whether `ports` is required or refused.
        transport = self.peek_transport(found, defaults)
        ports: tuple[int, ...] | None = ()
        if transport == "unix":
            if "ports" in found:
                self.fail(
                    found["ports"][0],
                    f"{path}.ports",
                    "ports is not used with transport: unix (instances listen on Unix sockets)",
                )
        elif transport == "tcp":
            ports = self.required(
                found, key, path, "ports", "the pool of private ports", self.ports
            )
        elif "ports" in found:
            ports = self.ports(found["ports"][1], f"{path}.ports")
        command = self.required(
            found, key, path, "command", "the command that starts an instance", self.command
        )
        if command and transport and (problem := foreign_placeholder(command, transport)):
            self.fail(found["command"][1], f"{path}.command", problem)
        if listen:
            self.listens.append(
                (f"component {name!r}", listen, found["listen"][1], f"{path}.listen")
            )
        if ports:
            self.pools.append((name, ports, found["ports"][1], f"{path}.ports"))
        depends_on: list[tuple[str, Node]] = []
        if "depends_on" in found:
            depends_on = self.names_list(found["depends_on"][1], f"{path}.depends_on") or []
            self.dependencies.append((name, f"{path}.depends_on", depends_on))
        own = self.shared(found, path)
        self.check_backoff(found, own, defaults, path)
        # Component wins: health field by field (but the kind of check as a whole), env
        # and logs key by key, env_file as a whole (and under env), the rest as a whole.
        health = HealthSpec(**_merged_health(defaults.get("health", {}), own.pop("health", {})))
        if transport:
            self.check_exec(health, transport, found, key, path)
        files = own.pop("env_file", defaults.get("env_file", []))
        env = {var: value for _, variables in files for var, value in variables.items()}
        env |= {**defaults.get("env", {}), **own.pop("env", {})}
        logs = {**defaults.get("logs", {}), **own.pop("logs", {})}
        canary = CanarySpec(**{**defaults.get("canary", {}), **own.pop("canary", {})})
        merged = ("health", "env", "env_file", "logs", "canary")
        rest = {k: v for k, v in defaults.items() if k not in merged} | own
        rest.setdefault("cwd", self.base.resolve())
        watch = self.watch_spec(name, rest)
        wanted = rest.pop("replicas", 1)
        replicas = min(os.cpu_count() or 1, MAX_REPLICAS) if wanted == "auto" else wanted
        count = rest.pop("sockets", min(replicas + DEFAULT_SOCKETS - 1, MAX_SOCKETS))
        sockets = socket_paths(self.state_dir, name, count) if transport == "unix" else ()
        if transport == "tcp" and "sockets" in found:
            self.fail(found["sockets"][0], f"{path}.sockets", "is only used with transport: unix")
        # Its own bad value is reported already: no pool is too small for what is not known.
        if "replicas" not in found or "replicas" in own:
            pool = len(sockets) if transport == "unix" else len(ports) if ports else None
            self.check_pool(pool, replicas, wanted == "auto", transport, found, key, path)
        if sockets and (size := len(os.fsencode(sockets[-1]))) > MAX_SOCKET_PATH:
            at = found["transport"][1] if "transport" in found else key
            self.fail(
                at,
                f"{path}.transport",
                f"socket path {sockets[-1]} is {size} bytes, more than the {MAX_SOCKET_PATH}"
                " a Unix socket path may have; choose a shorter state_dir",
            )
            return None
        if listen is None or ports is None or command is None or transport is None:
            return None
        proxy = ProxySpec(**{k: rest.pop(k) for k in _PROXY_KEYS & rest.keys()})
        restart = RestartPolicy(**{k: rest.pop(k) for k in _RESTART_KEYS & rest.keys()})
        limits = LimitsSpec(
            **{field: rest.pop(key) for key, field in _LIMITS_KEYS.items() if key in rest}
        )
        return ComponentSpec(
            name,
            listen,
            ports,
            command,
            env=MappingProxyType(env),
            health=health,
            depends_on=tuple(dict.fromkeys(dep for dep, _ in depends_on)),
            sockets=sockets,
            env_files=tuple(file for file, _ in files),
            log_max_size=logs.get("max_size", 0),
            log_keep=logs.get("keep", _SPEC_DEFAULTS["log_keep"]),
            replicas=replicas,
            replicas_auto=wanted == "auto",
            canary=canary,
            watch=watch,
            proxy=proxy,
            restart=restart,
            limits=limits,
            **rest,
        )

    def kubernetes(self, node: Node | None) -> KubernetesExport:
        """The `export` section (read after the components: `images` names them)."""
        path = "export.kubernetes"
        section = self.mapping(node, "export", ("kubernetes",)) or {}
        found = self.mapping(_value(section, "kubernetes"), path, KUBERNETES_KEYS) or {}
        image = self.image(found["image"][1], f"{path}.image") if "image" in found else None
        namespace = None
        if "namespace" in found:
            value_node, here = found["namespace"][1], f"{path}.namespace"
            if (text := self.scalar(value_node, here, raw=True)) is not None:
                if _DNS_LABEL.fullmatch(text):
                    namespace = text
                else:
                    self.fail(
                        value_node,
                        here,
                        f"{text!r} is not a namespace name (lowercase letters, digits and '-',"
                        " at most 63, starting and ending with a letter or digit)",
                    )
        images: dict[str, str] = {}
        names = dict.fromkeys(self.component_names)
        for name, (key_node, value_node) in (
            self.mapping(_value(found, "images"), f"{path}.images") or {}
        ).items():
            here = f"{path}.images.{name}"
            if name not in names:
                hint = self.name_hint(name, names) if names else ""
                self.fail(key_node, here, f"unknown component {name!r}{hint}")
            elif (own := self.image(value_node, here)) is not None:
                images[name] = own
        return KubernetesExport(image, MappingProxyType(images), namespace)

    def image(self, node: Node, path: str) -> str | None:
        if (text := self.scalar(node, path, raw=True)) is None:
            return None
        if not _IMAGE.fullmatch(text):
            self.fail(node, path, f"{text!r} is not an image name (e.g. registry/app:1.2)")
            return None
        return str(text)

    def peek_transport(self, found: dict[str, Entry], defaults: dict[str, Any]) -> str | None:
        """The component's transport (its own, else the default's, else tcp), without
        reporting anything; None when its own value is not a valid transport."""
        if "transport" not in found:
            return str(defaults.get("transport", "tcp"))
        node = found["transport"][1]
        if isinstance(node, ScalarNode) and (text := node.value.strip().lower()) in TRANSPORTS:
            return text
        return None

    def shared(self, found: dict[str, Entry], path: str) -> dict[str, Any]:
        """The keys a component shares with `defaults`; only valid values are returned."""
        readers: dict[str, Callable[[Node, str], Any]] = {
            "health": self.health,
            "drain_timeout": lambda node, at: self.duration(node, at, allow_zero=True),
            "stop_timeout": self.duration,
            "hold_timeout": self.duration,
            "verify": lambda node, at: self.duration(node, at, allow_zero=True),
            "max_restarts": lambda node, at: self.integer(node, at, minimum=0),
            "restart_window": self.duration,
            "restart_backoff": self.duration,
            "restart_backoff_max": self.duration,
            "stop_signal": self.stop_signal,
            "cwd": self.directory,
            "env": self.env,
            "connect_timeout": self.duration,
            "read_timeout": self.duration,
            "request_timeout": lambda node, at: self.duration(node, at, allow_zero=True),
            "keepalive_timeout": self.duration,
            "header_timeout": self.duration,
            "trust_forwarded": self.boolean,
            "max_header_size": lambda node, at: self.size(node, at, minimum=1024),
            "max_headers": lambda node, at: self.integer(node, at, minimum=1),
            "max_connections": lambda node, at: self.integer(node, at, minimum=0),
            "max_clients": lambda node, at: self.integer(node, at, minimum=0),
            "transport": self.transport,
            "sockets": lambda node, at: self.integer(node, at, minimum=2, maximum=MAX_SOCKETS),
            "env_file": self.env_files,
            "logs": self.logs,
            "canary": self.canary,
            "replicas": lambda node, at: self.count_or_auto(node, at, maximum=MAX_REPLICAS),
            "max_memory": self.memory_limit,
            "restart_every": self.age_limit,
            "limits_interval": self.limits_interval,
            "watch": self.patterns,
            "watch_ignore": self.patterns,
            "watch_debounce": lambda node, at: self.duration(node, at, allow_zero=True),
        }
        values = {
            key: read(found[key][1], f"{path}.{key}")
            for key, read in readers.items()
            if key in found
        }
        return {key: value for key, value in values.items() if value is not None}

    def check_backoff(
        self, found: dict[str, Entry], values: dict[str, Any], base: dict[str, Any], path: str
    ) -> None:
        """restart_backoff <= restart_backoff_max, for the values this block sets.

        `values` are the block's valid values, `base` what it is merged over (defaults).
        Blocks that set neither, or set one invalidly (already reported), are skipped.
        """
        keys = ("restart_backoff", "restart_backoff_max")
        if not any(k in values for k in keys) or any(k in found and k not in values for k in keys):
            return
        initial, most = (values.get(k, base.get(k, _SPEC_DEFAULTS[k])) for k in keys)
        if most >= initial:
            return
        if "restart_backoff_max" in values:
            message = f"{duration(most)} is less than restart_backoff ({duration(initial)})"
            self.fail(found["restart_backoff_max"][1], f"{path}.restart_backoff_max", message)
        else:
            message = f"{duration(initial)} is more than restart_backoff_max ({duration(most)})"
            self.fail(found["restart_backoff"][1], f"{path}.restart_backoff", message)

    def check_pool(
        self,
        size: int | None,
        replicas: int,
        auto: bool,
        transport: str | None,
        found: dict[str, Entry],
        key: Node,
        path: str,
    ) -> None:
        """The pool (`size` ports, or socket paths; None when unknown) holds replicas + 1:
        a rotation starts one new instance before it stops an old one. Reported at the
        component's `ports` or `sockets`, wherever `replicas` was set. One replica on one
        port stays allowed, as before replicas existed: it runs, and a rotation asks for a
        second port (a socket pool has at least 2 anyway)."""
        if size is None or transport is None or size > replicas or replicas == 1:
            return
        if transport == "tcp":
            at, here, what = found["ports"][1], f"{path}.ports", "port"
        elif "sockets" in found:
            at, here, what = found["sockets"][1], f"{path}.sockets", "socket"
        else:  # a pool that only defaults.sockets sized (the built-in one is never too small)
            at, here, what = key, f"{path}.sockets (from defaults)", "socket"
        written = f"auto ({replicas} on this machine)" if auto else str(replicas)
        self.fail(
            at,
            here,
            f"{size} {what}{'' if size == 1 else 's'} for replicas: {written}; a rotation needs"
            f" replicas + 1 = {replicas + 1} (one new instance starts before an old one stops)",
        )

    def check_dependencies(self, names: list[str]) -> None:
        """Unknown names, self-dependencies, duplicates, then one problem per cycle."""
        edges: dict[str, list[tuple[str, Node]]] = {name: [] for name in names}
        for name, path, deps in self.dependencies:
            seen: set[str] = set()
            for dep, node in deps:
                if dep == name:
                    self.fail(node, path, f"{name!r} cannot depend on itself")
                elif dep in seen:
                    self.fail(node, path, f"{dep!r} is listed twice")
                elif dep not in edges:
                    hint = self.name_hint(dep, names, name)
                    self.fail(node, path, f"unknown component {dep!r}{hint}")
                else:
                    edges[name].append((dep, node))
                seen.add(dep)
        cycle_of: dict[str, set[str]] = {}
        for group in _cycles({name: [dep for dep, _ in deps] for name, deps in edges.items()}):
            members = set(group)
            cycle_of.update(dict.fromkeys(group, members))
        done: set[str] = set()
        for name in names:  # file order: a cycle is reported at its first component
            if name in done or name not in cycle_of:
                continue
            members = cycle_of[name]
            done |= members
            cycle, first = _shortest_cycle(name, edges, members)
            self.fail(
                first,
                f"components.{name}.depends_on",
                f"dependency cycle: {' -> '.join(cycle)}",
            )

    def name_hint(self, name: str, names: Collection[str], exclude: str | None = None) -> str:
        """' (did you mean ...?)' for an unknown component `name` among `names` (but
        `exclude`), or what else to say; guesses stop once HINT_BUDGET is spent."""
        if not (len(names) - (exclude in names)):
            return " (there is no other component)"
        if self.hint_budget > 0:
            self.hint_budget -= len(names)
            close = difflib.get_close_matches(name, names, n=2)
            if close := [other for other in close if other != exclude]:
                return f" (did you mean {close[0]!r}?)"
        if len(names) <= 10:
            return f" (expected one of: {', '.join(n for n in names if n != exclude)})"
        return ""

    def check_overlaps(self) -> None:
        """Binds that would fail, or steal each other's traffic, at runtime. Each address
        and port is checked against the first earlier one it clashes with, through dicts:
        20,000 components take no longer than twice 10,000."""
        same_host: dict[tuple[int, str], int] = {}  # (port, host) -> the first listen there
        first_on_port: dict[int, int] = {}
        wildcard_on_port: dict[int, int] = {}
        for i, (_, addr, node, path) in enumerate(self.listens):
            spot = (addr.port, addr.host.lower())
            clashes = [same_host.get(spot)]
            if addr.host in _WILDCARDS:  # a wildcard takes the port on every host
                clashes.append(first_on_port.get(addr.port))
                wildcard_on_port.setdefault(addr.port, i)
            else:
                clashes.append(wildcard_on_port.get(addr.port))
            same_host.setdefault(spot, i)
            first_on_port.setdefault(addr.port, i)
            if earlier := [j for j in clashes if j is not None]:
                other, prior, _, _ = self.listens[min(earlier)]
                if addr == prior:
                    self.fail(node, path, f"{addr} is also the listen address of {other}")
                else:
                    self.fail(node, path, f"{addr} overlaps {prior}, the listen address of {other}")
        public: dict[int, str] = {}
        for owner, addr, _, _ in self.listens:
            public.setdefault(addr.port, owner)
        first_pool: dict[int, int] = {}  # port -> the first pool with it
        for i, (_, pool, pool_node, pool_path) in enumerate(self.pools):
            shared: dict[int, list[int]] = {}  # an earlier pool -> its ports in this one
            for port in pool:
                if port in public:
                    self.fail(
                        pool_node, pool_path, f"port {port} is the listen port of {public[port]}"
                    )
                if (j := first_pool.setdefault(port, i)) != i:
                    shared.setdefault(j, []).append(port)
            for j, ports in shared.items():
                self.fail(
                    pool_node,
                    pool_path,
                    f"{_ports_phrase(sorted(ports))} also in the pool of component"
                    f" {self.pools[j][0]!r}",
                )

    # -- node helpers ------------------------------------------------------------------------

    def mapping(
        self, node: Node | None, path: str, keys: Collection[str] | None = None
    ) -> dict[str, Entry] | None:
        """Key -> (key node, value node), or None if not a mapping. An empty value is {}."""
        if node is None or node.tag == NULL_TAG:
            return {}
        if not isinstance(node, MappingNode):
            self.fail(node, path, f"must be a mapping, not {_kind(node)}")
            return None
        found: dict[str, Entry] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.fail(key_node, path, f"a key must be a plain name, not {_kind(key_node)}")
                continue
            key, here = key_node.value, _join(path, key_node.value)
            if key in found:  # PyYAML would silently keep the last one
                first = found[key][0].start_mark.line + 1
                self.fail(key_node, here, f"duplicate key (first set on line {first})")
            elif keys is not None and key not in keys:
                self.fail(key_node, here, "unknown key" + _did_you_mean(key, keys))
            else:
                found[key] = (key_node, value_node)
        return found

    def scalar(self, node: Node, path: str, raw: bool = False) -> Any:
        """The typed value of a scalar (or its text as written, if raw); None once reported."""
        if not isinstance(node, ScalarNode):
            self.fail(node, path, f"must be a single value, not {_kind(node)}")
            return None
        if node.tag == NULL_TAG:
            self.fail(node, path, "needs a value")
            return None
        if "\0" in node.value:
            self.fail(node, path, NUL)
            return None
        if raw:
            return node.value
        try:
            return self.loader.construct_object(node)
        except yaml.YAMLError as exc:  # e.g. an unknown !tag
            self.fail(node, path, f"invalid value: {getattr(exc, 'problem', None) or exc}")
            return None
        except ValueError as exc:  # e.g. more digits than int() converts; the gist only
            self.fail(node, path, f"invalid value: {str(exc).split(':')[0]}")
            return None

    def required(
        self,
        found: dict[str, Entry],
        at: Node,
        path: str,
        key: str,
        what: str,
        read: Callable[[Node, str], T | None],
    ) -> T | None:
        if key not in found:
            self.fail(at, f"{path}.{key}", f"missing ({what})")
            return None
        return read(found[key][1], f"{path}.{key}")

    # -- field readers: each returns the value, or None after reporting ------------------------

    def address(self, node: Node, path: str) -> Address | None:
        text = self.scalar(node, path, raw=True)  # raw: YAML would read 1:30 as a number
        if text is None:
            return None
        if not (m := _ADDRESS.fullmatch(text.strip())):
            self.fail(node, path, f"{text!r} is not host:port (e.g. 127.0.0.1:8001 or [::1]:8001)")
            return None
        if not 1 <= (port := int(m[3])) <= 65535:
            self.fail(node, path, f"{port} is not a port (1-65535)")
            return None
        return Address(m[1] or m[2], port)

    def ports(self, node: Node, path: str) -> tuple[int, ...] | None:
        items = node.value if isinstance(node, SequenceNode) else [node]
        ranges = [self.port_range(item, path) for item in items]
        if None in ranges:
            return None
        pool = tuple(dict.fromkeys(port for r in ranges if r for port in r))  # ordered de-dup
        if not pool:
            self.fail(node, path, "the pool is empty (give at least one port)")
            return None
        return pool

    def port_range(self, node: Node, path: str) -> range | None:
        value = self.scalar(node, path)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            low = high = value
        elif isinstance(value, str) and (m := _PORTS.fullmatch(value)):
            low, high = int(m[1]), int(m[2] or m[1])
        else:
            self.fail(
                node,
                path,
                f"{value!r} is not a port or range (use 18001, 18001-18010 or a list of them)",
            )
            return None
        if bad := [p for p in (low, high) if not 1 <= p <= 65535]:
            self.fail(node, path, f"{bad[0]} is not a port (1-65535)")
            return None
        if low > high:
            self.fail(node, path, f"{low}-{high} is an empty range")
            return None
        return range(low, high + 1)

    def command(self, node: Node, path: str) -> tuple[str, ...] | None:
        if isinstance(node, SequenceNode):
            bad = [
                item
                for item in node.value
                if not (isinstance(item, ScalarNode) and item.tag == STR_TAG)
            ]
            for item in bad:
                what = f"{item.value!r} (quote it)" if isinstance(item, ScalarNode) else _kind(item)
                self.fail(item, path, f"list items must be strings, not {what}")
            nul = [item for item in node.value if item not in bad and "\0" in item.value]
            for item in nul:
                self.fail(item, path, NUL)
            if bad or nul:
                return None
            words = [item.value for item in node.value]
        elif isinstance(node, MappingNode):
            self.fail(node, path, "must be a string or a list of strings, not a mapping")
            return None
        else:
            if (text := self.scalar(node, path, raw=True)) is None:
                return None
            try:
                words = split_words(text)
            except ValueError as exc:
                self.fail(node, path, f"cannot be split into words: {exc}")
                return None
        if not words:
            self.fail(node, path, "is empty")
            return None
        return tuple(words)

    def parsed(self, node: Node, path: str, parse: Callable[[object], T]) -> T | None:
        """The scalar at `node` through `parse`; its ValueError becomes a problem."""
        if (value := self.scalar(node, path)) is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            self.fail(node, path, str(exc))
            return None

    def duration(self, node: Node, path: str, allow_zero: bool = False) -> float | None:
        if (seconds := self.parsed(node, path, parse_duration)) is None:
            return None
        if seconds == 0 and not allow_zero:
            self.fail(node, path, "must be greater than 0")
            return None
        return seconds

    def memory_limit(self, node: Node, path: str) -> int | None:
        """0 turns it off (a default's, say); below MIN_MAX_MEMORY, about any process passes it."""
        size = self.parsed(node, path, parse_size)
        if size is not None and 0 < size < MIN_MAX_MEMORY:
            self.fail(node, path, f"must be 0 (off) or {_bytes(MIN_MAX_MEMORY)} or more")
            return None
        return size

    def age_limit(self, node: Node, path: str) -> float | None:
        """0 turns it off; below MIN_RESTART_EVERY, an instance would hardly serve at all."""
        seconds = self.parsed(node, path, parse_duration)
        if seconds is not None and 0 < seconds < MIN_RESTART_EVERY:
            self.fail(node, path, f"must be 0 (off) or {duration(MIN_RESTART_EVERY)} or more")
            return None
        return seconds

    def limits_interval(self, node: Node, path: str) -> float | None:
        seconds = self.parsed(node, path, parse_duration)
        if seconds is not None and seconds < MIN_LIMITS_INTERVAL:
            self.fail(node, path, f"must be {duration(MIN_LIMITS_INTERVAL)} or more")
            return None
        return seconds

    def size(self, node: Node, path: str, minimum: int) -> int | None:
        if (size := self.parsed(node, path, parse_size)) is None:
            return None
        if size < minimum:
            self.fail(node, path, f"must be {_bytes(minimum)} or more, not {_bytes(size)}")
            return None
        return size

    def transport(self, node: Node, path: str) -> str | None:
        if (text := self.scalar(node, path, raw=True)) is None:
            return None
        if (value := text.strip().lower()) not in TRANSPORTS:
            self.fail(node, path, f"{text!r} is not a transport (use tcp or unix)")
            return None
        return value

    def ready(self, node: Node, path: str) -> str | None:
        if (text := self.scalar(node, path, raw=True)) is None:
            return None
        if (value := text.strip().lower()) not in READY_MODES:
            self.fail(node, path, f"{text!r} is not a readiness mode (use poll or notify)")
            return None
        return value

    def boolean(self, node: Node, path: str) -> bool | None:
        """true or false as written (any case, quoted or not); YAML 1.1's yes/no/on/off and
        numbers are refused, so a typo cannot silently read as a boolean."""
        if (text := self.scalar(node, path, raw=True)) is None:
            return None
        if (value := _BOOLEANS.get(text.strip().lower())) is None:
            self.fail(node, path, f"{text!r} is not a boolean (use true or false)")
        return value

    def health(self, node: Node, path: str) -> dict[str, Any]:
        found = self.mapping(node, path, HEALTH_KEYS) or {}
        values: dict[str, Any] = {}
        if "path" in found:
            node, here = found["path"][1], f"{path}.path"
            if (text := self.scalar(node, here, raw=True)) is not None and text.startswith("/"):
                values["path"] = text
            elif text is not None:
                self.fail(node, here, f"{text!r} must start with '/'")
        for key in ("interval", "timeout", "start_timeout"):
            if key in found and (seconds := self.duration(found[key][1], f"{path}.{key}")):
                values[key] = seconds
        if "unhealthy_threshold" in found:
            here = f"{path}.unhealthy_threshold"
            if (count := self.integer(found["unhealthy_threshold"][1], here, 1)) is not None:
                values["unhealthy_threshold"] = count
        if "tcp" in found and (tcp := self.boolean(found["tcp"][1], f"{path}.tcp")) is not None:
            values["tcp"] = tcp
        if "exec" in found and (words := self.command(found["exec"][1], f"{path}.exec")):
            values["exec"] = words
        # sd_notify (notify.py): who says the instance is ready, and how often it must say alive.
        if "ready" in found and (ready := self.ready(found["ready"][1], f"{path}.ready")):
            values["ready"] = ready
        if "watchdog" in found:
            here = f"{path}.watchdog"
            if (seconds := self.duration(found["watchdog"][1], here, allow_zero=True)) is not None:
                values["watchdog"] = seconds
        kinds = [k for k in HEALTH_KINDS if k in found and not (k == "tcp" and not values.get(k))]
        if len(kinds) > 1:
            self.fail(
                found[kinds[1]][0],
                f"{path}.{kinds[1]}",
                f"cannot be set with {kinds[0]}: a check is an HTTP GET of path, a TCP"
                " connect (tcp: true) or a command (exec), one of them",
            )
        return values

    def check_exec(
        self, health: HealthSpec, transport: str, found: dict[str, Entry], key: Node, path: str
    ) -> None:
        """An exec check's command, like `command`, may only use its transport's placeholder."""
        if not health.exec or not (problem := foreign_placeholder(health.exec, transport)):
            return
        at, here = key, f"{path}.health.exec (from defaults)"
        node = _value(found, "health")
        for key_node, value_node in node.value if isinstance(node, MappingNode) else []:
            if key_node.value == "exec":
                at, here = value_node, f"{path}.health.exec"
        self.fail(at, here, problem)

    def env_files(self, node: Node, path: str) -> list[tuple[Path, dict[str, str]]]:
        """Each file of `env_file` (a path, a list of them, or {path, required} items) with
        its variables; a missing file is a problem unless `required: false`."""
        items = node.value if isinstance(node, SequenceNode) else [node]
        read: list[tuple[Path, dict[str, str]]] = []
        for i, item in enumerate(items):
            here = f"{path}[{i}]" if isinstance(node, SequenceNode) else path
            required: bool | None = True
            if isinstance(item, MappingNode):
                found = self.mapping(item, here, ENV_FILE_KEYS) or {}
                if "required" in found:
                    required = self.boolean(found["required"][1], f"{here}.required")
                at = self.required(found, item, here, "path", "the env file", self.path_value)
            else:
                at = self.path_value(item, here)
            if at is None or required is None:
                continue
            try:
                read.append((at, envfile.read(at)))
            except FileNotFoundError:
                if required:
                    self.fail(
                        item,
                        here,
                        f"{at} does not exist (give it as {{path: ..., required: false}}"
                        " if it may be missing)",
                    )
            except envfile.EnvFileError as exc:
                self.problems.append(Problem(exc.file, exc.line, here, exc.message))
        return read

    def logs(self, node: Node, path: str) -> dict[str, int]:
        found = self.mapping(node, path, LOGS_KEYS) or {}
        values: dict[str, int] = {}
        if "max_size" in found:
            # 0 turns rotation off (a default's, say); below 1KiB a file would rotate on
            # about every line.
            size = self.parsed(found["max_size"][1], f"{path}.max_size", parse_size)
            if size is not None and 0 < size < 1024:
                self.fail(
                    found["max_size"][1], f"{path}.max_size", "must be 0 (off) or 1KiB or more"
                )
            elif size is not None:
                values["max_size"] = size
        if "keep" in found and (keep := self.integer(found["keep"][1], f"{path}.keep", 1)):
            values["keep"] = keep
        return values

    def canary(self, node: Node, path: str) -> dict[str, Any]:
        """The `canary:` block's valid values (merged field by field over the defaults')."""
        found = self.mapping(node, path, CANARY_KEYS) or {}
        readers: dict[str, Callable[[Node, str], Any]] = {
            "duration": self.duration,
            "min_requests": lambda node, at: self.integer(node, at, minimum=0),
            "max_error_rate": lambda node, at: self.parsed(node, at, parse_rate),
            "max_latency_ratio": self.ratio,
        }
        values = {
            key: read(found[key][1], f"{path}.{key}")
            for key, read in readers.items()
            if key in found
        }
        return {key: value for key, value in values.items() if value is not None}

    def ratio(self, node: Node, path: str) -> float | None:
        """A number above 0 (1.5, 2, "1.5"): how many times another value something may be."""
        if (value := self.scalar(node, path)) is None:
            return None
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            value = float(value)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            self.fail(node, path, f"{_short(value)} is not a number (e.g. 1.5)")
            return None
        if value <= 0:
            self.fail(node, path, f"must be above 0, not {_short(value)}")
            return None
        return float(value)

    def integer(
        self, node: Node, path: str, minimum: int, maximum: int | None = None
    ) -> int | None:
        if (value := self.scalar(node, path)) is None:
            return None
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            with contextlib.suppress(ValueError):  # more digits than int() converts
                value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(node, path, f"{_short(value)} is not a whole number")
            return None
        if value < minimum:
            self.fail(node, path, f"must be {minimum} or more, not {_short(value)}")
            return None
        if maximum is not None and value > maximum:
            self.fail(node, path, f"must be {maximum} or less, not {_short(value)}")
            return None
        return value

    def total_clients(self, node: Node, path: str) -> int | None:
        """The top-level max_clients: a whole number, 1 or more, or `auto` (None, as when
        a problem was reported: the daemon then derives it from the descriptor limit)."""
        value = self.count_or_auto(node, path)
        return None if value == "auto" else value

    def count_or_auto(
        self, node: Node, path: str, maximum: int | None = None
    ) -> int | Literal["auto"] | None:
        """A whole number, 1 or more (up to `maximum`), or `auto` (any case); None once
        reported. What `auto` means is the caller's."""
        if (value := self.scalar(node, path)) is None:
            return None
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            with contextlib.suppress(ValueError):  # more digits than int() converts
                value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(node, path, f"{_short(value)} is not a whole number or auto")
            return None
        if value < 1:
            self.fail(node, path, f"must be 1 or more (or auto), not {_short(value)}")
            return None
        if maximum is not None and value > maximum:
            self.fail(node, path, f"must be {maximum} or less (or auto), not {_short(value)}")
            return None
        return value

    def names_list(self, node: Node, path: str) -> list[tuple[str, Node]] | None:
        """Component names: a list of them, or a single name; each with its node."""
        items = node.value if isinstance(node, SequenceNode) else [node]
        names = [(self.scalar(item, path, raw=True), item) for item in items]
        if any(name is None for name, _ in names):
            return None
        return names

    def patterns(self, node: Node, path: str) -> list[tuple[str, Node, str]] | None:
        """`watch` or `watch_ignore`: paths or globs, a list of them or a single one; each
        with its node and key path, for a problem found later (a path that does not exist)."""
        items = node.value if isinstance(node, SequenceNode) else [node]
        found = []
        for i, item in enumerate(items):
            here = f"{path}[{i}]" if isinstance(node, SequenceNode) else path
            if (text := self.scalar(item, here, raw=True)) is None:
                continue
            if not text.strip():
                self.fail(item, here, "is empty")
                continue
            found.append((text, item, here))
        return found if len(found) == len(items) else None

    def watch_spec(self, name: str, rest: dict[str, Any]) -> WatchSpec:
        """The component's watch settings, popped from its merged keys. A watched path (for
        a glob: its directory before the first wildcard) must exist under the cwd."""
        cwd: Path = rest["cwd"]
        entries = rest.pop("watch", [])
        for text, node, here in entries:
            base = watch_base(text)
            where = cwd.joinpath(Path(base).expanduser())
            try:
                if where.exists():
                    continue
                problem = "does not exist"
            except OSError as exc:  # a name too long, EACCES on a parent
                problem = f"cannot be looked at: {_reason(exc)}"
            what = f"{where} (the directory of the glob)" if base != text else str(where)
            whose = f" (in the cwd of {name})" if here.startswith("defaults") else ""
            self.fail(node, here, f"{what} {problem}{whose}")
        ignore = tuple(text for text, _, _ in rest.pop("watch_ignore", []))
        return WatchSpec(
            paths=tuple(text for text, _, _ in entries),
            ignore=WatchSpec.ignore + tuple(p for p in ignore if p not in WatchSpec.ignore),
            debounce=rest.pop("watch_debounce", WatchSpec.debounce),
        )

    def stop_signal(self, node: Node, path: str) -> signal.Signals | None:
        if (value := self.scalar(node, path)) is None:
            return None
        name = str(value).upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if isinstance(value, str) and name in signal.Signals.__members__:
            return signal.Signals[name]
        self.fail(
            node,
            path,
            f"{value!r} is not a signal (use e.g. TERM, INT, HUP, QUIT, KILL, USR1 or USR2)",
        )
        return None

    def path_value(self, node: Node, path: str) -> Path | None:
        if (text := self.scalar(node, path, raw=True)) is None:
            return None
        try:
            return self.base.joinpath(Path(text).expanduser()).resolve()
        except (OSError, RuntimeError) as exc:  # ~nobody, a symlink loop, a name too long
            self.fail(node, path, f"{text!r} is not a usable path: {_reason(exc)}")
            return None

    def directory(self, node: Node, path: str) -> Path | None:
        if (found := self.path_value(node, path)) is None:
            return None
        if problem := _not_a_directory(found):
            self.fail(node, path, f"{found} {problem}")
            return None
        return found

    def env(self, node: Node, path: str) -> dict[str, str]:
        values: dict[str, str] = {}
        for key, (key_node, value_node) in (self.mapping(node, path) or {}).items():
            if key_node.tag != STR_TAG or not key or "=" in key or "\0" in key:
                self.fail(
                    key_node,
                    f"{path}.{key}",
                    "is not a valid variable name (a string without '=' or NUL; quote numbers)",
                )
            elif not isinstance(value_node, ScalarNode):
                self.fail(
                    value_node, f"{path}.{key}", f"must be a single value, not {_kind(value_node)}"
                )
            elif "\0" in value_node.value:
                self.fail(value_node, f"{path}.{key}", NUL)
            else:  # the text as written: `yes` stays "yes", 1.50 stays "1.50"; empty is ""
                values[key] = "" if value_node.tag == NULL_TAG else value_node.value
        return values


class _TooDeep(yaml.YAMLError):
    def __init__(self, mark: Mark) -> None:
        super().__init__(f"nested more than {MAX_DEPTH} levels deep")
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing nesting deeper than MAX_DEPTH, and keeping the keys of
    the nodes being composed so that a syntax error can name its field."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.keys: list[str | None] = []  # a key per level; None for list items (and keys)

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if len(self.keys) >= MAX_DEPTH:
            raise _TooDeep(self.peek_event().start_mark)
        self.keys.append(index.value if isinstance(index, ScalarNode) else None)
        node = super().compose_node(parent, index)
        self.keys.pop()  # not on an error: then `keys` says where it happened
        return node


def _field(keys: list[str | None]) -> str:
    """The field path of a list of keys; past 4 keys (rotator.yaml's deepest) cut short."""
    named = [key for key in keys if key is not None]
    return ".".join(named[:4]) + (".…" if len(named) > 4 else "")


def _field_at(text: str, index: int) -> str:
    """The field that holds character `index` of `text`, read with the characters YAML
    refuses blanked out ("" if it is not valid YAML even so): for a problem found before
    the file could be parsed, such as a byte that is not UTF-8."""
    loader = _Loader(Reader.NON_PRINTABLE.sub(" ", text))
    try:
        node = loader.get_single_node()
    except yaml.YAMLError:
        return ""
    finally:
        loader.dispose()
    keys: list[str | None] = []
    for _ in range(MAX_DEPTH):  # a recursive alias (&a [*a]) must not loop forever
        if isinstance(node, MappingNode):
            items = node.value
        elif isinstance(node, SequenceNode):
            items = [(None, item) for item in node.value]
        else:
            break
        inner = [(k, v) for k, v in items if (k or v).start_mark.index <= index < v.end_mark.index]
        if not inner:
            break
        key, node = inner[0]
        keys.append(key.value if isinstance(key, ScalarNode) else None)
    return _field(keys)


def _cycles(edges: Mapping[str, list[str]]) -> list[list[str]]:
    """The strongly connected components with more than one name (every dependency cycle
    lies within one): Tarjan's algorithm, without recursion, in linear time."""
    order: dict[str, int] = {}  # when each name was reached
    low: dict[str, int] = {}  # the earliest name reachable back from it, still on the stack
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in edges:
        if root in order:
            continue
        order[root] = low[root] = len(order)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(edges[root]))]
        while work:
            name, deps = work[-1]
            for dep in deps:
                if dep not in order:
                    order[dep] = low[dep] = len(order)
                    stack.append(dep)
                    on_stack.add(dep)
                    work.append((dep, iter(edges[dep])))
                    break
                if dep in on_stack:
                    low[name] = min(low[name], order[dep])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[name])
                if low[name] == order[name]:
                    group = []
                    while (member := stack.pop()) != name:
                        on_stack.discard(member)
                        group.append(member)
                    on_stack.discard(name)
                    if group:
                        groups.append([*group, name])
    return groups


def _shortest_cycle(
    start: str, edges: dict[str, list[tuple[str, Node]]], members: set[str]
) -> tuple[list[str], Node]:
    """The shortest cycle start -> ... -> start (edges in listed order break ties), and the
    node of its first edge, for the line of the problem."""
    came_from: dict[str, tuple[str, Node]] = {}
    queue = [start]
    for name in queue:  # breadth first; the list grows while iterated
        for dep, node in edges[name]:
            if dep in members and dep not in came_from:
                came_from[dep] = (name, node)
                queue.append(dep)
        if start in came_from:
            break
    cycle, name = [start], start
    while True:
        name, node = came_from[name]
        cycle.append(name)
        if name == start:
            break
    cycle.reverse()
    return cycle, node


def _bytes(size: int) -> str:
    """65536 -> '64KiB', 1048576 -> '1MiB', 1000 -> '1000B': sizes in messages."""
    for unit, factor in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


_SPEC_DEFAULTS = {
    f.name: f.default
    for spec in (ComponentSpec, ProxySpec, RestartPolicy)
    for f in dataclasses.fields(spec)
}
# The flat YAML keys that fill a component's nested specs.
_PROXY_KEYS = frozenset(f.name for f in dataclasses.fields(ProxySpec))
_RESTART_KEYS = frozenset(f.name for f in dataclasses.fields(RestartPolicy))
_LIMITS_KEYS = {
    "max_memory": "max_memory",
    "restart_every": "restart_every",
    "limits_interval": "interval",
}
NUL = "contains a NUL character (no path, command or variable can hold one)"


def _not_a_directory(path: Path) -> str | None:
    """Why `path` is not a directory ("does not exist", ...), or None if it is one."""
    try:
        if path.is_dir():
            return None
        return "is not a directory" if path.exists() else "does not exist"
    except OSError as exc:  # EACCES on a parent: is_dir() raises it
        return f"cannot be looked at: {_reason(exc)}"


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _short(value: object) -> str:
    """repr(value), cut to 40 characters: a message quotes what was written, not 1 MB of it."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:36]}...{text[-1]}"


def _merged_health(defaults: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A component's health fields over the defaults'; a component that chooses a kind
    of check (path, tcp or exec) replaces the default's kind as a whole."""
    if any(key in own for key in HEALTH_KINDS):
        defaults = {k: v for k, v in defaults.items() if k not in HEALTH_KINDS}
    return {**defaults, **own}


def _value(found: dict[str, Entry], key: str) -> Node | None:
    return found[key][1] if key in found else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    return "a list" if isinstance(node, SequenceNode) else "a single value"


def _did_you_mean(key: str, keys: Collection[str]) -> str:
    if close := difflib.get_close_matches(key, list(keys), n=1):
        return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(keys)})"


def _ports_phrase(ports: list[int]) -> str:
    """[18005, 18006, 18009] -> 'ports 18005-18006, 18009 are': short enough for a message."""
    runs: list[list[int]] = []
    for port in ports:
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"ports {text} are" if len(ports) > 1 else f"port {text} is"
