"""Copy-and-truncate rotation of an instance's log file (logs.rotate) and reading across
it: history reads the copies before the file, a follower picks up the end of the copy.
Real files, written through a descriptor opened for appending, as an instance's is."""

from __future__ import annotations

import os
from pathlib import Path

from rotator import logs
from rotator.logs import LogReader

NAME = "20240101-000000.000-4242.log"


def writer(directory: Path, name: str = NAME) -> tuple[Path, int]:
    """The instance's side: a file and a descriptor opened O_APPEND, as the spawner opens it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(b"")
    return path, os.open(path, os.O_WRONLY | os.O_APPEND)


def lines(numbers: range) -> bytes:
    return b"".join(b"line %d\n" % n for n in numbers)


def texts(found: list[logs.Line]) -> list[str]:
    return [text for _, text in found]


def test_rotate_copies_truncates_and_shifts_up_to_keep(tmp_path: Path) -> None:
    path, fd = writer(tmp_path)
    try:
        for batch in range(5):
            os.write(fd, lines(range(batch * 10, batch * 10 + 10)))
            logs.rotate(path, keep=3)
            assert path.stat().st_size == 0
        # The next write of the instance lands at the start of the emptied file.
        os.write(fd, b"after\n")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"after\n"
    assert [p.name for p in logs.rotated_files(path)] == [f"{NAME}.3", f"{NAME}.2", f"{NAME}.1"]
    assert logs.rotated_path(path, 1).read_bytes() == lines(range(40, 50))
    assert logs.rotated_path(path, 3).read_bytes() == lines(range(20, 30))
    assert not logs.rotated_path(path, 4).exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".rotating")]
    # A copy is as private as the file it came from: an app's output may hold secrets.
    assert {p.stat().st_mode & 0o777 for p in logs.rotated_files(path)} == {0o600}
    # Rotated copies are not instance files: no pid of their own, not counted by retention.
    assert logs.instance_files(tmp_path) == [path]


def test_history_reads_the_copies_before_the_file(tmp_path: Path) -> None:
    path, fd = writer(tmp_path)
    try:
        os.write(fd, lines(range(0, 10)))
        logs.rotate(path, keep=5)
        os.write(fd, lines(range(10, 20)))
        logs.rotate(path, keep=5)
        os.write(fd, lines(range(20, 25)))
    finally:
        os.close(fd)
    assert texts(LogReader(tmp_path).history(100)) == [f"line {n}" for n in range(25)]
    assert texts(LogReader(tmp_path).history(12)) == [f"line {n}" for n in range(13, 25)]
    assert texts(LogReader(tmp_path, pid=4242).history(3)) == ["line 22", "line 23", "line 24"]


def test_a_follower_goes_on_across_a_rotation_without_loss_or_repeat(tmp_path: Path) -> None:
    path, fd = writer(tmp_path)
    reader = LogReader(tmp_path)
    try:
        os.write(fd, lines(range(0, 5)))
        assert texts(reader.history(10, follow=True)) == [f"line {n}" for n in range(5)]
        # Written after the last poll and before the copy: only the copy has these.
        os.write(fd, lines(range(5, 8)) + b"partial ")
        logs.rotate(path, keep=2)
        os.write(fd, b"line ends\n" + lines(range(8, 14)))
        # Grown past where the follower was: a size check alone would not see a rotation.
        assert path.stat().st_size > len(lines(range(0, 5)))
        found, behind = reader.poll()
        assert not behind
        assert texts(found) == [
            *(f"line {n}" for n in range(5, 8)),
            "partial line ends",
            *(f"line {n}" for n in range(8, 14)),
        ]
        assert reader.poll() == ([], False)
        os.write(fd, lines(range(10, 12)))
        logs.rotate(path, keep=2)
        assert texts(reader.poll()[0]) == ["line 10", "line 11"]
        # Truncated by someone else (no new copy): read again from the start.
        os.write(fd, b"a longer line\n")
        assert texts(reader.poll()[0]) == ["a longer line"]
        os.truncate(path, 0)
        os.write(fd, b"y\n")
        assert texts(reader.poll()[0]) == ["y"]
    finally:
        os.close(fd)


def test_a_follower_that_starts_after_a_rotation_does_not_reread_the_copy(
    tmp_path: Path,
) -> None:
    path, fd = writer(tmp_path)
    try:
        os.write(fd, lines(range(0, 3)))
        logs.rotate(path, keep=2)
        reader = LogReader(tmp_path)
        assert texts(reader.poll()[0]) == []  # a file that appeared after the history
        os.write(fd, b"new\n")
        assert texts(reader.poll()[0]) == ["new"]
    finally:
        os.close(fd)


def test_prune_removes_an_instance_file_with_its_copies(tmp_path: Path) -> None:
    old, fd = writer(tmp_path, "20240101-000000.000-100.log")
    os.close(fd)
    for n in (1, 2):
        logs.rotated_path(old, n).write_text("old copy\n")
    new, fd = writer(tmp_path, "20240101-000001.000-200.log")
    os.close(fd)
    logs.rotated_path(new, 1).write_text("new copy\n")
    removed = logs.prune(tmp_path, running={200}, keep=1)
    assert removed == [old, logs.rotated_path(old, 2), logs.rotated_path(old, 1)]
    assert sorted(os.listdir(tmp_path)) == [new.name, f"{new.name}.1"]
