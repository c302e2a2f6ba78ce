"""The per-instance log files: naming, retention, and reading them as one log (real files)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rotator import logs
from rotator.logs import LogReader


def write(directory: Path, stamp: str, pid: int, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}-{pid}.log"
    path.write_bytes(data)
    return path


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_names_sort_in_start_order_and_carry_the_pid(tmp_path: Path) -> None:
    first = logs.named_for(logs.starting_path(tmp_path, when=1_700_000_000.5), 99999)
    second = logs.named_for(logs.starting_path(tmp_path, when=1_700_000_000.501), 7)
    assert first.name == "20231114-221320.500-99999.log"
    assert first.name < second.name  # the pid's digits do not decide the order
    for path in (first, second):
        path.write_text("x\n")
    (tmp_path / logs.starting_path(tmp_path).name).write_text("not yet named\n")
    (tmp_path / "notes.txt").write_text("not a log\n")
    assert logs.instance_files(tmp_path) == [first, second]
    assert logs.pids(tmp_path) == [99999, 7]
    assert logs.find(tmp_path, 7) == second and logs.find(tmp_path, 8) is None


def test_prune_keeps_the_newest_and_every_running_instance(tmp_path: Path) -> None:
    files = [write(tmp_path, f"20240101-000000.{i:03d}", 100 + i, b"x\n") for i in range(14)]
    removed = logs.prune(tmp_path, running={100, 113}, keep=10)
    assert removed == files[1:4]  # the oldest (pid 100) still runs
    assert logs.instance_files(tmp_path) == [files[0], *files[4:]]
    assert logs.prune(tmp_path, running=set(), keep=10) == [files[0]]
    assert logs.prune(tmp_path / "missing", running=set()) == []


def test_prune_removes_temporary_files_left_by_a_killed_daemon(tmp_path: Path) -> None:
    left = logs.starting_path(tmp_path, when=1_700_000_000.0)
    left.write_text("a spawn the daemon never renamed\n")
    old = time.time() - logs.STALE_STARTING - 60
    os.utime(left, (old, old))
    fresh = logs.starting_path(tmp_path)  # a spawn in progress right now
    fresh.write_text("")
    named = write(tmp_path, "20240101-000000.000", 100, b"x\n")
    assert logs.prune(tmp_path, running=set()) == [left]
    assert fresh.exists() and named.exists()


def test_tail_skips_the_header_and_includes_a_partial_last_line(tmp_path: Path) -> None:
    path = write(tmp_path, "20240101-000000.000", 1, b"==== rotator: web on port 1\none\ntwo\nthr")
    start = logs.header_end(path)
    assert logs.tail(path, 20, start=start) == ["one", "two", "thr"]
    assert logs.tail(path, 2, start=start) == ["two", "thr"]
    assert logs.tail(path, 0) == []
    assert logs.header_end(write(tmp_path, "20240101-000000.001", 2, b"no header\n")) == 0


def test_history_spans_files_in_start_order(tmp_path: Path) -> None:
    write(tmp_path, "20240101-000000.000", 10, b"a1\na2\na3\n")
    write(tmp_path, "20240101-000001.000", 9, b"b1\nb2\n")
    reader = LogReader(tmp_path)
    assert reader.history(3) == [(10, "a3"), (9, "b1"), (9, "b2")]
    assert LogReader(tmp_path).history(100)[0] == (10, "a1")
    assert LogReader(tmp_path, pid=10).history(2) == [(10, "a2"), (10, "a3")]
    only = LogReader(tmp_path, pid=11)
    assert only.history(5) == [] and only.files == []


def test_history_reads_back_across_blocks_and_stops_at_its_bound(tmp_path: Path) -> None:
    line = b"%06d " + b"x" * 93 + b"\n"  # 100 bytes
    path = write(tmp_path, "20240101-000000.000", 1, b"".join(line % i for i in range(3000)))
    lines = LogReader(tmp_path).history(2500)
    assert len(lines) == 2500 and lines[0][1].startswith("000500 ") and lines[-1][1][:6] == "002999"
    append(path, b"y" * (logs.TAIL_MAX_BYTES + 10) + b"\nlast\n")
    assert LogReader(tmp_path).history(3) == [(1, "last")]  # nothing whole within reach


def test_binary_garbage_and_crlf_are_decoded_with_replacement(tmp_path: Path) -> None:
    write(tmp_path, "20240101-000000.000", 1, b"ok\r\n\xff\xfe\x00bin\n")
    assert LogReader(tmp_path).history(5) == [(1, "ok"), (1, "\ufffd\ufffd\x00bin")]


def test_following_sees_growth_new_files_and_whole_lines_only(tmp_path: Path) -> None:
    old = write(tmp_path, "20240101-000000.000", 1, b"before\npart")
    reader = LogReader(tmp_path)
    assert reader.history(10, follow=True) == [(1, "before")]  # "part" is held back
    assert reader.poll() == ([], False)
    append(old, b"ial\nmid")
    new = write(tmp_path, "20240101-000001.000", 2, b"==== rotator: header\nhello\n")
    lines, behind = reader.poll()
    assert lines == [(1, "partial"), (2, "==== rotator: header"), (2, "hello")]
    assert not behind
    append(old, b"dle\n")
    assert reader.poll()[0] == [(1, "middle")]
    append(new, b"no newline yet")
    for _ in range(logs.PARTIAL_FLUSH_POLLS):
        assert reader.poll()[0] == []
    assert reader.poll()[0] == [(2, "no newline yet")]  # the writer went quiet
    append(new, b"tail")
    old.unlink()  # pruned while followed
    assert reader.poll(final=True)[0] == [(2, "tail")]
    assert reader.files == [new.name]


def test_a_follower_reads_a_bounded_chunk_per_poll(tmp_path: Path) -> None:
    line = b"y" * 99 + b"\n"
    path = write(tmp_path, "20240101-000000.000", 1, b"")
    reader = LogReader(tmp_path)
    reader.history(0, follow=True)
    append(path, line * (logs.READ_CHUNK // len(line) + 10))
    first, behind = reader.poll()
    assert behind and len(first) == logs.READ_CHUNK // len(line)
    rest, behind = reader.poll()
    assert not behind and len(first) + len(rest) == logs.READ_CHUNK // len(line) + 10


def test_endless_lines_are_cut_not_buffered(tmp_path: Path) -> None:
    path = write(tmp_path, "20240101-000000.000", 1, b"")
    reader = LogReader(tmp_path)
    reader.history(0, follow=True)
    append(path, b"z" * (logs.MAX_LINE * 2 + 5))
    lines, _ = reader.poll()
    assert [len(text) for _, text in lines] == [logs.MAX_LINE, logs.MAX_LINE]
    assert reader.poll(final=True)[0] == [(1, "zzzzz")]
