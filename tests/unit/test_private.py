"""private.py's rules on real files: what is made private, tightened, or refused, and what
each refusal says to do. (The daemon and CLI using them: tests/integration/test_trust.py.)"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rotator.private import NotPrivate, check_file, make_state_dir, read_token
from tests.conftest import as_root, mode, nobody


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_state_dir_is_0700_whatever_the_umask(tmp_path: Path, no_umask: None) -> None:
    state = tmp_path / "a" / "state"
    assert make_state_dir(state) is None
    assert mode(state) == 0o700


def test_a_private_state_dir_is_left_as_it_is(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    assert make_state_dir(state) is None
    assert mode(state) == 0o700


@pytest.mark.parametrize("before", [0o755, 0o750, 0o705, 0o711])
def test_a_state_dir_others_could_only_read_is_tightened_with_a_notice(
    tmp_path: Path, before: int
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, before)
    notice = make_state_dir(state)
    assert notice == f"state_dir {state} was readable by others (mode {before:04o}); it is now 0700"
    assert mode(state) == 0o700


@pytest.mark.parametrize("before", [0o777, 0o770, 0o702, 0o720])
def test_a_state_dir_others_could_write_is_refused_and_left_alone(
    tmp_path: Path, before: int
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, before)
    with pytest.raises(NotPrivate) as refused:
        make_state_dir(state)
    assert str(refused.value) == (
        f"state_dir {state} is writable by others (mode {before:04o}): anyone could have "
        f"replaced what is in it; check its files, then: chmod 700 {state}"
    )
    assert mode(state) == before


def test_a_file_is_no_state_dir(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(NotPrivate, match="is not a directory"):
        make_state_dir(tmp_path / "state")


@as_root
def test_a_state_dir_of_another_user_is_refused_and_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chown(state, nobody(), -1)
    with pytest.raises(NotPrivate) as refused:
        make_state_dir(state)
    message = str(refused.value)
    assert message.startswith(f"state_dir {state} is owned by uid {nobody()}")
    assert "not by you (uid 0, root): use a state_dir of your own" in message
    assert message.endswith(f"take this one over with: chown -R root {state}")
    assert mode(state) == 0o755 and state.stat().st_uid == nobody()


def test_check_file_accepts_a_missing_or_private_file_and_refuses_a_writable_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    check_file(path, "state file", "FIX")  # none yet: nothing to distrust
    path.write_text("{}")
    for ok in (0o600, 0o644, 0o400):
        os.chmod(path, ok)
        check_file(path, "state file", "FIX")
    os.chmod(path, 0o620)
    with pytest.raises(NotPrivate, match=r"state file .* is writable by others \(mode 0620\)"):
        check_file(path, "state file", "FIX")


@as_root
def test_a_file_of_another_user_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_text("secret")
    os.chmod(path, 0o600)
    os.chown(path, nobody(), -1)
    with pytest.raises(NotPrivate) as refused:
        check_file(path, "state file", "FIX")
    message = str(refused.value)
    assert message.startswith(f"state file {path} is owned by uid {nobody()}")
    assert message.endswith("not by you (uid 0, root): FIX")
    with pytest.raises(NotPrivate) as refused:
        read_token(path)
    assert str(refused.value).startswith(f"admin token {path} is owned by uid {nobody()}")
    assert str(refused.value).endswith(": run this command as the user who runs the daemon")


def test_the_token_is_read_only_when_no_one_else_can_read_or_write_it(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_text("s3cret\n")
    os.chmod(path, 0o600)
    assert read_token(path) == "s3cret"
    for loose in (0o640, 0o604, 0o620):
        os.chmod(path, loose)
        with pytest.raises(NotPrivate) as refused:
            read_token(path)
        assert str(refused.value).startswith(
            f"admin token {path} is open to others (mode {loose:04o}), who may have used or "
            f"replaced it: chmod 600 {path}, then restart the daemon"
        )
    with pytest.raises(FileNotFoundError):
        read_token(tmp_path / "missing")
