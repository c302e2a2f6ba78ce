"""Text for people: the status table and event lines. Formatting only."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from typing import Any


def duration(seconds: float) -> str:
    """The one way rotator writes a duration, measured or configured, as the config reads
    it back: 0.0004 -> '0ms', 0.5482 -> '548ms', 1.0 -> '1s', 2.634 -> '2.63s',
    90 -> '1m30s', 3600 -> '1h', 7500 -> '2h05m', 200000 -> '55h33m'."""
    if round(seconds * 1000) < 1000:
        return f"{max(seconds, 0) * 1000:.0f}ms"
    if round(seconds, 2) < 60:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"


def os_error(exc: OSError, *, paths: bool = True) -> str:
    """An OSError for people: what, the errno's name (to search for), and the path(s) it
    concerns (unless the caller names the path itself):
    `No space left on device (ENOSPC): /var/lib/rotator/logs/web/x.log`."""
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno is not None and exc.errno in errno.errorcode:
        what += f" ({errno.errorcode[exc.errno]})"
    if not paths:
        return what
    names = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{what}: {' -> '.join(names)}" if names else what


def error_text(exc: BaseException) -> str:
    """Any error in one line: an OSError as `os_error` has it, else its type and message."""
    if isinstance(exc, OSError):
        return os_error(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone (a closed pipe): what its buffer
    still holds would fail again at exit (Python's docs, "Note on SIGPIPE")."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def status_table(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = (
        "COMPONENT",
        "STATE",
        "LISTEN",
        "PID",
        "PORT",
        "UPTIME",
        "REQUESTS",
        "IN FLIGHT",
        "RESTARTS",
        "LAST ROTATION",
        "LAST STOP",
    )
    rows: list[tuple[str, ...]] = [header]
    notes = []
    for c in status["components"]:
        instances = c.get("instances") or []
        several = c.get("replicas", 1) > 1 or len(instances) > 1
        active = None if several else c.get("active")
        last = c.get("last_rotation")
        healthy = sum(1 for i in instances if i["healthy"])
        rows.append(
            (
                c["name"],
                c["state"]
                + (f" ({healthy}/{c['replicas']} healthy)" if several else "")
                + ("" if active is None or active["healthy"] else " (unhealthy)"),
                c["listen"],
                str(active["pid"]) if active else "-",
                _where(active) if active else "-",
                duration(now - active["since"]) if active else "-",
                str(c.get("requests", 0)),
                str(c.get("in_flight", 0)),
                str(c["restarts"]),
                f"{duration(now - last['at'])} ago, took {duration(last['seconds'])}"
                if last
                else "-",
                c.get("last_stop") or "-",
            )
        )
        if several:
            rows.extend(_replica_row(i, now) for i in instances)
        for i in instances:  # STATUS= sent over sd_notify
            if i.get("status"):
                notes.append(f"  {c['name']}: pid {i['pid']} says: {i['status']}")
        for d in c["draining"]:
            notes.append(
                f"  {c['name']}: draining pid {d['pid']} on {_where(d)} ({d['in_flight']} in flight)"
            )
        if canary := c.get("canary"):
            notes.append(_canary_note(c["name"], canary))
        if limits := c.get("limits"):
            notes.append(_limits_note(c["name"], limits, instances, now))
        definition = c.get("definition") or {}
        if definition.get("source") == "deployed":
            since = (
                f" since {time.strftime('%Y-%m-%d %H:%M', time.localtime(definition['at']))}"
                if definition.get("at")
                else ""
            )
            notes.append(
                f"  {c['name']}: runs its deployed definition{since}: {' '.join(definition.get('command', []))}"
            )
        if c.get("last_stop") == "forced":
            notes.append(
                f"  {c['name']}: its last instance ignored its stop signal and was killed "
                "after stop_timeout"
            )
        if c.get("last_error") and c["state"] != "running":
            notes.append(f"  {c['name']}: {c['last_error']}")
            notes.extend(f"    | {line}" for line in c.get("log_tail", []))
    unsaved = (status.get("daemon") or {}).get("state_file_error")
    if unsaved:
        since = time.strftime("%H:%M:%S", time.localtime(unsaved["since"]))
        notes.append(
            f"warning: since {since} the daemon {unsaved['message']}; what runs now is not "
            "recorded (a daemon started after this one dies would not know it); retrying"
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines + notes)


def _canary_note(name: str, canary: dict[str, Any]) -> str:
    """A running canary in one line: its share, pids, time left and both sides' figures
    (as canary.compare words them, in the status document)."""
    pids = ", ".join(str(i["pid"]) for i in canary["instances"])
    left = duration(canary["ends_in_s"])
    return f"  {name}: canary {canary['weight']}% (pid {pids}, {left} left): {canary['figures']}"


def _limits_note(
    name: str, limits: dict[str, Any], instances: list[dict[str, Any]], now: float
) -> str:
    """max_memory and restart_every, and how close the instances are to them:
    `hermes: max_memory 512MiB (pid 4242: 300MiB); restart_every 24h (next: pid 4242 in 3h10m)`."""
    parts = []
    if most := limits.get("max_memory"):
        used = ", ".join(
            f"pid {i['pid']}: {_mib(i['rss_bytes'])}"
            for i in instances
            if i.get("rss_bytes") is not None
        )
        parts.append(f"max_memory {_mib(most)}" + (f" ({used})" if used else ""))
    if every := limits.get("restart_every"):
        due = [i for i in instances if i.get("restart_at") is not None]
        first = min(due, key=lambda i: float(i["restart_at"]), default=None)
        parts.append(
            f"restart_every {duration(every)}"
            + (
                f" (next: pid {first['pid']} in {duration(first['restart_at'] - now)})"
                if first
                else ""
            )
        )
    return f"  {name}: {'; '.join(parts)}"


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.0f}MiB"


def _replica_row(instance: dict[str, Any], now: float) -> tuple[str, ...]:
    """A replica's line, under its component's: its slot, health, pid, port, uptime, counts."""
    return (
        f"  [{instance['replica']}]",
        "healthy" if instance["healthy"] else "unhealthy",
        "",
        str(instance["pid"]),
        _where(instance),
        duration(now - instance["since"]),
        str(instance["requests"]),
        str(instance["in_flight"]),
        "",
        "",
        "",
    )


def _where(instance: dict[str, Any]) -> str:
    """The port of a TCP instance, the socket file name of a Unix one."""
    if instance.get("port"):
        return str(instance["port"])
    return str(instance.get("socket") or "-").rsplit("/", 1)[-1]


def history_line(event: dict[str, Any]) -> str:
    """An event from the history: when, which component (or the daemon itself), what; and
    the log lines an exit carries, indented below it."""
    when = event["time"]
    stamp = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
    )
    who = event["component"] or "rotator"
    tail = "".join(f"\n    | {line}" for line in event.get("log_tail") or [])
    return f"{stamp} {who}: {event['message']}{tail}"


def event_line(event: dict[str, Any], since: float | None = None) -> str:
    prefix = f"[{duration(max(0.0, event['time'] - since)):>6}] " if since is not None else ""
    return f"{prefix}{event['component']}: {event['message']}"


def json_line(when: float | None, message: str, record: dict[str, Any] | None = None) -> str:
    """One JSON log record: an event's fields, or a daemon line as {"message": ...}."""
    fields = record if record is not None else {"component": None, "message": message}
    if not fields.get("component"):
        fields = {**fields, "component": None}  # the daemon's own: no component
    when = time.time() if when is None else when
    stamp = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
    )
    return json.dumps(
        {**fields, "time": stamp + time.strftime("%z", time.localtime(when))}, default=str
    )
