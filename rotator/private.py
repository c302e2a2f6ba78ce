"""Who may have written what rotator trusts: the state_dir and the files read from it.

The state_dir holds what the daemon acts on (state.json names processes to adopt,
admin.token lets the CLI in): another user who can write there can lock the owner
out or hand the daemon a process of theirs. So, as ssh does for its keys and sshd
(StrictModes) for the files it reads, a directory or file owned by someone else, or
writable by others, is refused with the fix in the message; a state_dir of ours that
others may only read (0755, as `mkdir` leaves it) is tightened to 0700, since only
reading was ever possible. Only the one user counts: a state_dir owned by root while
we are not root is refused too (we could write in it only if others could as well).

Only modes and owners are looked at here; what to refuse and when is the caller's.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path

PRIVATE_DIR = 0o700


class NotPrivate(Exception):
    """A path others own or may write to; the message is one line and says what to do."""


def make_state_dir(path: Path) -> str | None:
    """Create `path` 0700, or check an existing one: ours and writable by us alone.
    A notice to print when a directory others could read was tightened, else None."""
    with contextlib.suppress(FileExistsError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=PRIVATE_DIR)
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode passes through the umask
        return None
    mode = check_dir(path, "state_dir")
    if mode & 0o077 == 0:
        return None
    os.chmod(path, PRIVATE_DIR)
    return f"state_dir {path} was readable by others (mode {mode:04o}); it is now {PRIVATE_DIR:04o}"


def check_dir(path: Path, what: str) -> int:
    """Refuse a directory someone else owns or others may write to; its mode."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotPrivate(f"{what} {path} is not a directory")
    fix = f"use a {what} of your own, or take this one over with: chown -R {_name(os.geteuid())} {path}"
    _check_owner(st, path, what, fix)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise NotPrivate(
            f"{what} {path} is writable by others (mode {mode:04o}): anyone could have "
            f"replaced what is in it; check its files, then: chmod 700 {path}"
        )
    return mode


def check_file(path: Path, what: str, fix: str) -> None:
    """Refuse a file (when there is one) that someone else owns or others may write to;
    `fix` says what to do about another owner."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    _check_file(st, path, what, fix)


def read_token(path: Path) -> str:
    """The admin token, from a file that must be ours and private to us (0600 or tighter):
    as ssh does for a key, one others may read or write is refused, for they may have used
    or replaced it. OSError when it cannot be read."""
    with open(path, encoding="utf-8") as f:
        st = os.fstat(f.fileno())  # the file read, not whatever the name points to later
        _check_owner(st, path, "admin token", "run this command as the user who runs the daemon")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            # chmod first: `rotator down` itself needs the token.
            raise NotPrivate(
                f"admin token {path} is open to others (mode {mode:04o}), who may have used "
                f"or replaced it: chmod 600 {path}, then restart the daemon (rotator down, "
                "then rotator up) for a new one"
            )
        return f.read().strip()


def _check_file(st: os.stat_result, path: Path, what: str, fix: str) -> None:
    _check_owner(st, path, what, fix)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise NotPrivate(
            f"{what} {path} is writable by others (mode {mode:04o}): anyone could have "
            "written it; remove it (rotator writes a new one, mode 0600)"
        )


def _check_owner(st: os.stat_result, path: Path, what: str, fix: str) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        you = f"uid {me}" if _name(me) == str(me) else f"uid {me}, {_name(me)}"
        raise NotPrivate(
            f"{what} {path} is owned by {_owner(st.st_uid)}, not by you ({you}): {fix}"
        )


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a name (some containers)
        return str(uid)


def _owner(uid: int) -> str:
    """`uid 1001 (alice)`, or `uid 1001` when the uid has no name."""
    name = _name(uid)
    return f"uid {uid}" if name == str(uid) else f"uid {uid} ({name})"
