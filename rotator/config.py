"""The configuration model: frozen specs that every other module reads, and pure helpers on them.

Pure: no file reading, no sockets, no processes. Holds Address, Endpoint, HealthSpec,
CanarySpec, LimitsSpec, WatchSpec, ComponentSpec (with `render`, the placeholder substitution), AdminSpec,
KubernetesExport, Config (with `start_order`, `token_path`, `log_dir`), Problem and
ConfigError. Besides, it derives specs for `rotator deploy` (`with_overrides`) and turns a
spec's definition (command, cwd, env) into JSON for the state file and back
(`definition_of`, `apply_definition`).

Reading rotator.yaml into this model (file:line errors, did-you-mean, durations and sizes,
dependency cycles) is rotator.configfile's job; this module does not import it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import signal
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

# What `rotator deploy` may change. Not `replicas`: a deploy changes what runs, not how
# many; the count stays the config's (or `rotator scale`'s).
DEFINITION_KEYS = ("command", "cwd", "env")
# A regex rather than str.format, so literal braces (awk scripts, JSON) pass through untouched.
_PLACEHOLDER = re.compile(r"\{(port|socket|host|name|python|replica)\}")
# One piece of a command line, as shlex.split (POSIX mode) reads it: unquoted text, a
# backslash escape, a single- or double-quoted string, a run of whitespace, or (failing
# all of them) a stray quote or trailing backslash. Possessive, so it never backtracks.
_WORD_PART = re.compile(
    r"""([^ \t\r\n'"\\]++)|\\(.)|'([^']*+)'|"((?:[^"\\]++|\\.)*+)"|([ \t\r\n]++)|(.)""",
    re.DOTALL,
)
_QUOTED_ESCAPE = re.compile(r'\\([\\"])')
_QUOTING = re.compile(r"['\"\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_BLANKS = re.compile(r"[ \t\r\n]+")  # shlex's whitespace: not \v, \f or Unicode spaces
_WILDCARD = re.compile(r"[*?\[]")  # what makes a `watch` entry a glob


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        # An IPv6 literal needs brackets, or the port would be ambiguous.
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Endpoint:
    """Where one instance listens: `host`:`port`, or the Unix socket `path` (then `port`
    is 0 and `host` only names the Host header a probe sends)."""

    host: str
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        return f"socket {self.path}" if self.path is not None else f"port {self.port}"

    @property
    def short(self) -> str:
        """A few characters: ':18001' or 'web.1.sock'."""
        return f":{self.port}" if self.path is None else os.path.basename(self.path)

    @property
    def at(self) -> dict[str, int | str]:
        """For event data: {"port": P} or {"socket": path}."""
        return {"port": self.port} if self.path is None else {"socket": self.path}

    @property
    def address(self) -> dict[str, int | str | None]:
        """For status: both keys, the one that does not apply None."""
        return {"port": None if self.path else self.port, "socket": self.path}


@dataclass(frozen=True)
class HealthSpec:
    path: str = "/health"
    interval: float = 1.0
    timeout: float = 2.0
    start_timeout: float = 30.0
    # Consecutive failed checks before a running instance counts as unhealthy (also in verify).
    unhealthy_threshold: int = 3
    # The kind of check: an HTTP GET of `path` (the default); a TCP connect that succeeds
    # (`tcp`); or a command that exits 0 (`exec`: words with `command`'s placeholders).
    tcp: bool = False
    exec: tuple[str, ...] = ()
    # Readiness (sd_notify, notify.py): `poll` waits for the first healthy probe; `notify`
    # for READY=1 from the instance's tree, then confirms with one probe at once.
    ready: str = "poll"
    # With WATCHDOG=1 expected at least this often (seconds; 0 = no watchdog): an instance
    # silent for longer counts as unhealthy.
    watchdog: float = 0.0

    @property
    def kind(self) -> str:
        return "exec" if self.exec else "tcp" if self.tcp else "http"


def _proxy(default: Any, does: str) -> Any:
    """A ProxySpec field; `does` says what it does at the proxy (export's notes read it)."""
    return field(default=default, metadata={"does": does})


@dataclass(frozen=True)
class ProxySpec:
    """The proxy in front of a component's instances (seconds, bytes); each knob is
    documented in docs/configuration.md. A reload swaps the whole object."""

    hold_timeout: float = _proxy(5.0, "holds requests while no instance is ready")
    connect_timeout: float = _proxy(5.0, "bounds connecting to an instance")  # then 504
    read_timeout: float = _proxy(60.0, "bounds waiting for an instance's bytes")
    request_timeout: float = _proxy(0.0, "bounds a whole exchange")  # 0 = no limit
    header_timeout: float = _proxy(10.0, "bounds how long a request head may take")  # 408
    keepalive_timeout: float = _proxy(60.0, "closes idle client connections")
    # Keep incoming X-Forwarded-* (append to -For) or replace them.
    trust_forwarded: bool = _proxy(False, "decides on X-Forwarded-* headers")
    max_header_size: int = _proxy(64 * 1024, "limits request heads")  # larger: 431
    max_headers: int = _proxy(100, "limits request header lines")  # more: 431
    # Requests passed to instances at once; 0 = no limit.
    max_connections: int = _proxy(0, "limits requests in flight")
    # Client connections open at once on `listen`; 0 = only the daemon's total applies.
    max_clients: int = _proxy(0, "limits client connections")


@dataclass(frozen=True)
class RestartPolicy:
    """How crashed instances are replaced (seconds)."""

    max_restarts: int = 5  # more crash restarts than this within restart_window: failed
    restart_window: float = 60.0
    restart_backoff: float = 0.5  # delay before the first crash restart, doubled each time
    restart_backoff_max: float = 30.0


@dataclass(frozen=True)
class CanarySpec:
    """How `rotator deploy --canary` judges a canary (rotator.canary holds the rule). Not
    an instance field: a reload that changes it updates the component in place."""

    duration: float = 60.0  # the window, in seconds; `deploy --for` overrides it
    min_requests: int = 20  # fewer answered by the end: rolled back; `--min-requests`
    max_error_rate: float = 0.01  # a fraction of the canary's requests: 0.01 is 1%
    max_latency_ratio: float = 1.5  # the canary's p95 over the stable instances'


# What `watch` never reacts to, besides the user's `watch_ignore`: version control, caches,
# dependencies, rotator's own files, and the swap, backup and temporary files of editors
# (vim, emacs, JetBrains IDEs, Kate; vim writes `4913` to test a directory), and macOS's
# Finder records. A pattern without `/` matches any one name in a path.
WATCH_IGNORE = (
    ".git",
    ".hg",
    ".svn",
    "__pycache__",
    "*.pyc",
    "node_modules",
    ".rotator",
    ".*.swp",
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "4913",
    "*___jb_tmp___",
    "*___jb_old___",
    "*.kate-swp",
    ".DS_Store",
)


@dataclass(frozen=True)
class WatchSpec:
    """Restart on save (rotator.watcher): `paths` (paths or globs as written, relative
    to the component's cwd; empty: off), the patterns ignored (WATCH_IGNORE and the
    user's `watch_ignore`), and the quiet time after a change before rotating (seconds).
    Not an instance field: a reload that changes it applies in place."""

    paths: tuple[str, ...] = ()
    ignore: tuple[str, ...] = WATCH_IGNORE
    debounce: float = 0.3


@dataclass(frozen=True)
class LimitsSpec:
    """What makes rotator replace an instance that still serves (rotator.limits checks it):
    bytes and seconds, 0 = no such limit. Not an instance field: a reload that changes it
    applies at the next check."""

    max_memory: int = 0  # the RSS of the instance's whole process tree
    restart_every: float = 0.0  # its age, plus a jitter of up to 10% fixed per instance
    interval: float = 5.0  # `limits_interval`: how often both are checked

    @property
    def active(self) -> bool:
        return bool(self.max_memory or self.restart_every)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    listen: Address
    ports: tuple[int, ...]
    command: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str] = field(
        hash=False
    )  # a MappingProxyType is unhashable; keep specs hashable
    health: HealthSpec
    drain_timeout: float = 30.0
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    depends_on: tuple[str, ...] = ()  # started before this one, stopped after it
    verify: float = 0.0  # seconds of health checks after a deploy's switch; 0 = off
    restart: RestartPolicy = RestartPolicy()
    proxy: ProxySpec = ProxySpec()  # the YAML keys stay flat: `connect_timeout: 5s`
    # "tcp": instances listen on a port of `ports`; "unix": on a socket path of `sockets`
    # (state_dir/sockets/<name>.<n>.sock), and `ports` is empty.
    transport: str = "tcp"
    sockets: tuple[str, ...] = ()
    # The `env_file` files read into `env` (absolute; for messages and export only).
    env_files: tuple[Path, ...] = ()
    # `logs`: a running instance's file is copied to <file>.1 and truncated once it is
    # this large (bytes; 0 = never), keeping `log_keep` such copies.
    log_max_size: int = 0
    log_keep: int = 5
    # Instances serving at once behind `listen`, each in a slot 0 .. replicas-1 (`{replica}`,
    # ROTATOR_REPLICA). `replicas_auto`: written as `auto`, resolved to the CPU count when
    # the file was read (export says so; another machine resolves it differently).
    replicas: int = 1
    replicas_auto: bool = False
    canary: CanarySpec = CanarySpec()  # the YAML key is nested: `canary: {duration: 2m}`
    # The YAML keys stay flat: `max_memory`, `restart_every`, `limits_interval`.
    limits: LimitsSpec = LimitsSpec()
    watch: WatchSpec = WatchSpec()  # the YAML keys stay flat: watch, watch_ignore, watch_debounce

    @property
    def unix(self) -> bool:
        return self.transport == "unix"

    def render(
        self, port: int, host: str | None = None, socket: str | None = None, *, replica: int = 0
    ) -> tuple[list[str], dict[str, str]]:
        """argv and env additions for an instance on `port` (or, given `socket`, on that
        Unix socket path) filling slot `replica`, placeholders substituted."""
        host = self.listen.host if host is None else host
        # {python}: the interpreter rotator runs on, so that a Python component
        # finds the same environment without relying on PATH.
        slot = str(replica)
        values = {"host": host, "name": self.name, "python": sys.executable, "replica": slot}
        if socket is None:
            values["port"] = str(port)
        else:
            values["socket"] = socket

        def sub(text: str) -> str:
            # A placeholder of the other transport has no value: it stays as written.
            return _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), text)

        env = {key: sub(value) for key, value in self.env.items()}
        # Last, so the instance always learns its real address and slot (as PM2's cluster
        # mode sets NODE_APP_INSTANCE, with one replica too).
        if socket is None:
            env.update(PORT=str(port), HOST=host)
        else:
            env.update(ROTATOR_SOCKET=socket)
        env.update(ROTATOR_REPLICA=slot)
        return [sub(word) for word in self.command], env


@dataclass(frozen=True)
class AdminSpec:
    listen: Address = Address("127.0.0.1", 9900)


@dataclass(frozen=True)
class KubernetesExport:
    """The `export.kubernetes` section: used by `rotator export kubernetes` only."""

    image: str | None = None  # for every component without its own in `images`
    images: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    namespace: str | None = None

    def image_of(self, name: str) -> str | None:
        return self.images.get(name, self.image)


@dataclass(frozen=True)
class Config:
    path: Path
    admin: AdminSpec
    state_dir: Path
    components: tuple[ComponentSpec, ...]
    kubernetes: KubernetesExport = KubernetesExport()
    # Client connections open at once over every component; None: `auto`, derived from
    # the descriptor limit at start (rotator.proxy.clients.total_cap).
    max_clients: int | None = None

    def component(self, name: str) -> ComponentSpec:
        for spec in self.components:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.components)

    @property
    def token_path(self) -> Path:
        """Where the daemon leaves the admin token for the CLI (mode 0600)."""
        return self.state_dir / "admin.token"

    def log_dir(self, name: str) -> Path:
        """Where a component's instances write their logs, one file each."""
        return self.state_dir / "logs" / name

    def start_order(self) -> tuple[str, ...]:
        """Component names, each after the components it depends on; ties in file order.

        Each step takes the first component in file order whose dependencies are all
        placed; stopping everything goes in the reverse of this order. Names in
        `depends_on` that are not components here are ignored (a parsed config has none);
        a cycle (only possible in a hand-built Config) is a ValueError.
        """
        names = set(self.names)
        placed: dict[str, None] = {}  # an ordered set
        pending = list(self.components)
        while pending:
            ready = next(
                (
                    spec
                    for spec in pending
                    if all(dep in placed or dep not in names for dep in spec.depends_on)
                ),
                None,
            )
            if ready is None:
                left = ", ".join(spec.name for spec in pending)
                raise ValueError(f"dependency cycle among components {left}")
            pending.remove(ready)
            placed[ready.name] = None
        return tuple(placed)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        # One line, whatever a key or value held: a newline or NUL is shown escaped.
        return text if text.isprintable() else _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


class ConfigError(Exception):
    """The config is unusable; `problems` lists everything wrong, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


# -- deploy overrides and stored definitions ---------------------------------------------------


def with_overrides(
    spec: ComponentSpec,
    *,
    command: str | list[str] | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> ComponentSpec:
    """`spec` with `rotator deploy`'s --command, --cwd and --env applied; None keeps a field.

    A string command is split like `command:` in the file; `cwd` is resolved against
    `base` (default: the current directory) and must be an existing directory; `env`
    entries are merged over the spec's env. ValueError (one line) on a bad value.
    """
    words = spec.command
    if isinstance(command, str):
        try:
            words = tuple(split_words(command))
        except ValueError as exc:
            raise ValueError(f"command {command!r} cannot be split into words: {exc}") from None
    elif command is not None:
        words = tuple(_strings(command, "command"))
    if not words:
        raise ValueError("command is empty")
    if problem := foreign_placeholder(words, spec.transport):
        raise ValueError(f"command: {problem}")
    directory = spec.cwd
    if cwd is not None:
        if not cwd:
            raise ValueError("cwd is empty")
        directory = (base or Path.cwd()).joinpath(Path(cwd).expanduser()).resolve()
        if not directory.is_dir():
            problem = "is not a directory" if directory.exists() else "does not exist"
            raise ValueError(f"cwd {directory} {problem}")
    merged = dict(spec.env)
    if env is not None:
        merged.update(_env_strings(env, "env"))
    return dataclasses.replace(spec, command=words, cwd=directory, env=MappingProxyType(merged))


def definition_of(spec: ComponentSpec) -> dict[str, Any]:
    """What deploy may change, as JSON-ready data: {"command": [...], "cwd": str, "env": {}}."""
    return {"command": list(spec.command), "cwd": str(spec.cwd), "env": dict(spec.env)}


def apply_definition(spec: ComponentSpec, definition: Mapping[str, Any]) -> ComponentSpec:
    """`spec` with a stored definition (see `definition_of`) on top. The definition replaces
    command, cwd and env as a whole; a missing key (or a null cwd) keeps the spec's value.
    ValueError on a bad shape: not a mapping, an unknown key, an empty command or one that is
    not a list of strings, a cwd that is not an absolute path, env not strings to strings.
    The cwd is not checked on disk: it may have gone since, and starting will say so.
    """
    if not isinstance(definition, Mapping):
        raise ValueError(f"definition must be a mapping, not {type(definition).__name__}")
    if unknown := [key for key in definition if key not in DEFINITION_KEYS]:
        raise ValueError(
            f"definition: unknown key {unknown[0]!r} (expected {', '.join(DEFINITION_KEYS)})"
        )
    changes: dict[str, Any] = {}
    if "command" in definition:
        command = definition["command"]
        if isinstance(command, str) or not isinstance(command, list | tuple):
            raise ValueError(
                f"definition.command must be a list of strings, not {type(command).__name__}"
            )
        if not command:
            raise ValueError("definition.command is empty")
        changes["command"] = tuple(_strings(command, "definition.command"))
    if definition.get("cwd") is not None:
        cwd = definition["cwd"]
        if not isinstance(cwd, str) or not Path(cwd).is_absolute():
            raise ValueError(f"definition.cwd must be an absolute path, not {cwd!r}")
        changes["cwd"] = Path(cwd)
    if "env" in definition:
        changes["env"] = MappingProxyType(_env_strings(definition["env"], "definition.env"))
    return dataclasses.replace(spec, **changes)


def split_words(text: str) -> list[str]:
    """Shell-like words, exactly as shlex.split(text) gives them, in linear time: shlex
    grows each word a character at a time, which takes seconds for a 1 MB word. ValueError
    on an unclosed quote or a trailing backslash."""
    if not _QUOTING.search(text):  # the common case, and the fastest
        return [word for word in _BLANKS.split(text) if word]
    words: list[str] = []
    word: list[str] | None = None  # None between words; [] after an empty quoted string
    for m in _WORD_PART.finditer(text):
        plain, escaped, single, double, space, stray = m.groups()
        if space is not None:
            if word is not None:
                words.append("".join(word))
            word = None
            continue
        if stray is not None:
            problem = "No escaped character" if stray == "\\" else "No closing quotation"
            raise ValueError(problem)
        if word is None:
            word = []
        if double is not None:  # only \" and \\ are escapes between double quotes
            word.append(_QUOTED_ESCAPE.sub(r"\1", double))
        else:
            word.append(next(part for part in (plain, escaped, single) if part is not None))
    if word is not None:
        words.append("".join(word))
    return words


def watch_base(entry: str) -> str:
    """The directory part of a `watch` entry before its first wildcard ('src/**/*.py' ->
    'src'; '*.py' -> ''); the entry itself when it has none."""
    if not _WILDCARD.search(entry):
        return entry
    parts = entry.split("/")
    fixed = list(itertools.takewhile(lambda part: not _WILDCARD.search(part), parts))
    return "/".join(fixed)


def socket_paths(state_dir: Path, name: str, count: int) -> tuple[str, ...]:
    """The socket pool of a `transport: unix` component: state_dir/sockets/<name>.<n>.sock."""
    return tuple(str(state_dir / "sockets" / f"{name}.{n}.sock") for n in range(count))


def foreign_placeholder(words: Collection[str], transport: str) -> str | None:
    """Why `words` cannot be a command of a `transport` component: a placeholder that
    has no value there ({port} with unix, {socket} with tcp); None if fine."""
    foreign, own = ("port", "socket") if transport == "unix" else ("socket", "port")
    if any(m[1] == foreign for word in words for m in _PLACEHOLDER.finditer(word)):
        return f"{{{foreign}}} has no value with transport: {transport} (use {{{own}}})"
    return None


def _strings(items: Any, what: str) -> list[str]:
    words = list(items)
    for i, word in enumerate(words):
        if not isinstance(word, str):
            raise ValueError(f"{what}[{i}] must be a string, not {type(word).__name__}")
    return words


def _env_strings(env: Any, what: str) -> dict[str, str]:
    if not isinstance(env, Mapping):
        raise ValueError(f"{what} must be a mapping, not {type(env).__name__}")
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name:
            raise ValueError(f"{what}: {name!r} is not a variable name (a string without '=')")
        if not isinstance(value, str):
            raise ValueError(f"{what}.{name} must be a string, not {type(value).__name__}")
    return dict(env)
