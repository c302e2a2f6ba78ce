"""Env files (`env_file:` in the config, `rotator deploy --env-file`): dotenv text in,
{NAME: value} out, every problem naming the file's line.

The syntax is the common core of docker compose's and python-dotenv's: `NAME=VALUE` a
line, blank lines and `#` comments skipped, an optional `export ` before the name, space
around `=` ignored. A value is taken as written, unquoted (up to an inline ` #` comment,
surrounding space stripped), in single quotes (literal), or in double quotes (with the
escapes \\n \\t \\r \\" \\\\ \\$); quoted values may span lines. `$` is never expanded, as in
systemd's EnvironmentFile= and `docker run --env-file`: a value means the same wherever
the file is read, whatever the reader's environment. Later lines win.

Hand-written rather than python-dotenv: the syntax above is about sixty lines, and
python-dotenv reports a bad line as a warning and skips it, where a config error must
stop the load and name the line.
"""

from __future__ import annotations

import re
from pathlib import Path

_ASSIGNMENT = re.compile(r"[ \t]*(?:export[ \t]+)?([^\s=]*)[ \t]*(=?)[ \t]*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
_INLINE_COMMENT = re.compile(r"\s#")


class EnvFileError(ValueError):
    """A line of an env file that cannot be read; `line` is None for the file as a whole."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {message}")
        self.file = file
        self.line = line
        self.message = message


def read(path: Path) -> dict[str, str]:
    """The variables of the file at `path`. EnvFileError for a bad line or an unreadable
    file; FileNotFoundError (untouched) when there is none, for the caller to judge."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: an editor's BOM is not a name
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise EnvFileError(str(path), None, f"cannot read the env file: {reason}") from None
    return parse(text, str(path))


def parse(text: str, file: str) -> dict[str, str]:
    text = text.replace("\r\n", "\n")
    values: dict[str, str] = {}
    pos, line = 0, 1
    while pos < len(text):
        end = _line_end(text, pos)
        content = text[pos:end].strip()
        if not content or content.startswith("#"):
            pos, line = end + 1, line + 1
            continue
        match = _ASSIGNMENT.match(text, pos, end)
        assert match is not None  # every part of the pattern may be empty
        name, start = match[1], match.end()
        if not match[2]:
            raise EnvFileError(file, line, f"{content!r} is not NAME=VALUE")
        if not _NAME.fullmatch(name):
            raise EnvFileError(
                file,
                line,
                f"{name!r} is not a variable name (letters, digits, '_', '.', '-';"
                " not starting with a digit)",
            )
        if start < end and text[start] in "'\"":
            values[name], after = _quoted(text, start, file, line)
            end = _line_end(text, after)
            trailing = text[after:end].strip()
            line += text.count("\n", pos, after)
            if trailing and not trailing.startswith("#"):
                raise EnvFileError(file, line, f"unexpected {trailing!r} after the closing quote")
        else:
            values[name] = _INLINE_COMMENT.split(text[start:end], maxsplit=1)[0].strip()
        pos, line = end + 1, line + 1
    return values


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _quoted(text: str, start: int, file: str, line: int) -> tuple[str, int]:
    """The value of the quoted string at `start`, and the position after its closing quote."""
    quote, i = text[start], start + 1
    while i < len(text) and text[i] != quote:
        i += 2 if quote == '"' and text[i] == "\\" else 1
    if i >= len(text):
        raise EnvFileError(file, line, f"the {quote} that opens this value is never closed")
    body = text[start + 1 : i]
    if quote == '"':
        body = _ESCAPE.sub(lambda m: _ESCAPES.get(m[1], m[0]), body)
    return body, i + 1
