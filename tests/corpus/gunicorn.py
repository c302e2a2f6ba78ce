"""gunicorn's request-parser corpus (MIT): fetched once from PyPI, cached, never copied here.

The files are gunicorn's `tests/requests/valid/*.http` and `tests/requests/invalid/*.http`,
each with a `.py` beside it saying what gunicorn's parser makes of it (see README.md in
this folder). The pinned source distribution is downloaded with the venv's own pip into
`.cache/corpora/` at the repository's root (gitignored), checked against its SHA-256 and
unpacked there; later runs reuse it. Without network the tests that need it skip, saying why.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = "27.0.1"
SDIST = f"gunicorn-{VERSION}.tar.gz"
SHA256 = "b1514965361c8b7e8107a80aa2a92636878df1ccfac6dd204a676426e04d9e3e"
ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ROTATOR_CORPUS_CACHE", ROOT / ".cache" / "corpora"))
HERE = CACHE / f"gunicorn-{VERSION}"
DOWNLOAD_TIMEOUT = 120.0  # seconds; the sdist is under 1 MB


@dataclass(frozen=True)
class Expected:
    """One request as gunicorn's `.py` describes it (names upper-cased, as gunicorn has them)."""

    method: str
    uri: str  # the request target as sent
    version: tuple[int, int]
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Case:
    name: str  # e.g. "valid/020"
    data: bytes  # the bytes a client sends
    expected: list[Expected] = field(default_factory=list)  # empty for an invalid file
    error: str = ""  # for an invalid file: the gunicorn error it expects
    settings: dict[str, Any] = field(default_factory=dict)  # gunicorn settings it changes


@functools.cache  # one attempt per run: both kinds of case ask
def available() -> tuple[Path | None, str]:
    """The unpacked corpus folder, fetching it on first use; or None and why not."""
    if (HERE / "tests" / "requests" / "valid").is_dir():
        return HERE, ""
    try:
        _fetch()
    except (OSError, subprocess.SubprocessError, ValueError, tarfile.TarError) as exc:
        return (
            None,
            f"gunicorn {VERSION}'s request corpus is not cached, and fetching failed: {exc}",
        )
    return HERE, ""


def _fetch() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        done = subprocess.run(
            [*pip, "--no-deps", "--no-binary", ":all:", f"gunicorn=={VERSION}", "-d", tmp],
            capture_output=True,
            text=True,
            timeout=DOWNLOAD_TIMEOUT,
        )
        sdist = Path(tmp) / SDIST
        if done.returncode != 0 or not sdist.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"pip download gunicorn=={VERSION}: {last}")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHA256:
            raise ValueError(f"{SDIST} has SHA-256 {digest}, expected {SHA256}")
        unpacked = Path(tmp) / "unpacked"
        prefix = f"gunicorn-{VERSION}/"
        wanted = (prefix + "tests/requests/", prefix + "LICENSE", prefix + "NOTICE")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
            tar.extractall(unpacked, members=members, filter="data")
        # Renamed into place in one step: a run stopped half-way leaves no half corpus.
        shutil.rmtree(HERE, ignore_errors=True)
        (unpacked / prefix).rename(HERE)


def cases(kind: str) -> list[Case]:
    """Every `.http` file of `kind` ("valid" or "invalid"), sorted by name."""
    folder, why = available()
    if folder is None:
        raise LookupError(why)
    found = []
    for http in sorted((folder / "tests" / "requests" / kind).glob("*.http")):
        request, settings = _expectation(http.with_suffix(".py"))
        name = f"{kind}/{http.stem}"
        data = decode(http.read_bytes())
        if kind == "valid":
            listed = request if isinstance(request, list) else [request]
            found.append(Case(name, data, [_expected(r) for r in listed], settings=settings))
        else:
            found.append(Case(name, data, error=getattr(request, "__name__", str(request))))
    return found


def decode(raw: bytes) -> bytes:
    """A `.http` file's bytes as sent: gunicorn's tests/treq.py writes CRLF as a literal
    backslash-r-backslash-n and ends lines for readability, and escapes NUL, LF, HTAB and
    any byte as \\xHH."""
    data = raw.replace(b"\n", b"").replace(b"\\r\\n", b"\r\n")
    data = data.replace(b"\\0", b"\0").replace(b"\\n", b"\n").replace(b"\\t", b"\t")
    data = re.sub(rb"\\x([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), data)
    if b"\\" in data:
        raise ValueError("unexpected backslash escape in corpus data")
    return data


class _Config:
    """Stands in for gunicorn.config.Config: records the settings a case changes."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}

    def set(self, name: str, value: Any) -> None:
        self.settings[name] = value


def _expectation(py: Path) -> tuple[Any, dict[str, Any]]:
    """Run a case's `.py` (pinned, hash-checked data) with gunicorn's imports stubbed:
    `uri()` keeps the raw target, Config records settings, error classes keep their name."""
    tree = ast.parse(py.read_text(encoding="utf-8"), str(py))
    cfg = _Config()
    names: dict[str, Any] = {"uri": lambda raw: raw, "cfg": cfg}
    body: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gunicorn"):
            for alias in node.names:
                stub = _Config if alias.name == "Config" else type(alias.name, (Exception,), {})
                names[alias.asname or alias.name] = stub
        else:
            body.append(node)
    tree.body = body
    exec(compile(tree, str(py), "exec"), names)
    config = names.get("cfg")
    return names["request"], (config.settings if isinstance(config, _Config) else {})


def _expected(request: dict[str, Any]) -> Expected:
    body = request.get("body", b"")
    return Expected(
        method=request["method"],
        uri=request["uri"],
        version=tuple(request["version"]),  # type: ignore[arg-type]
        headers=[(n, v) for n, v in request.get("headers", [])],
        body=body.encode("latin-1") if isinstance(body, str) else body,
    )
