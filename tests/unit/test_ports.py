"""Port choice as pure logic: a dict stands in for the probe."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest

from rotator.ports import (
    Choice,
    NoFreePort,
    PortState,
    choose_port,
    describe_exhausted,
    describe_holders,
    describe_squatters,
    format_pool,
    rotation_order,
)

FREE, TIME_WAIT, BUSY = PortState.FREE, PortState.TIME_WAIT, PortState.BUSY
POOL = [18001, 18002, 18003, 18004]


def fake_probe(
    states: dict[int, PortState], probed: list[int] | None = None
) -> Callable[[int], PortState]:
    def probe(port: int) -> PortState:
        if probed is not None:
            probed.append(port)
        return states.get(port, FREE)

    return probe


def test_rotation_order_starts_after_last_used_and_wraps() -> None:
    assert rotation_order(POOL, 18002) == [18003, 18004, 18001, 18002]
    assert rotation_order(POOL, 18004) == [18001, 18002, 18003, 18004]


def test_rotation_order_without_or_with_unknown_last_used_starts_at_first() -> None:
    assert rotation_order(POOL, None) == POOL
    assert rotation_order(POOL, 9999) == POOL
    assert rotation_order([], None) == []


def test_choose_takes_next_free_port_in_rotation() -> None:
    assert choose_port(POOL, 18001, (), fake_probe({})) == Choice(18002, FREE)
    assert choose_port(POOL, None, (), fake_probe({})) == Choice(18001, FREE)


def test_choose_skips_in_use_without_probing_them() -> None:
    probed: list[int] = []
    choice = choose_port(POOL, 18001, {18002, 18003}, fake_probe({}, probed))
    assert choice == Choice(18004, FREE)
    assert probed == [18004]


def test_choose_skips_busy_ports() -> None:
    probe = fake_probe({18002: BUSY, 18003: BUSY})
    assert choose_port(POOL, 18001, (), probe) == Choice(18004, FREE)


def test_choose_prefers_free_over_an_earlier_time_wait() -> None:
    probe = fake_probe({18002: TIME_WAIT, 18003: TIME_WAIT, 18004: FREE, 18001: FREE})
    assert choose_port(POOL, 18001, (), probe) == Choice(18004, FREE)


def test_choose_stops_probing_at_first_free() -> None:
    probed: list[int] = []
    choose_port(POOL, None, (), fake_probe({18001: TIME_WAIT}, probed))
    assert probed == [18001, 18002]


def test_time_wait_fallback_takes_first_in_rotation_order() -> None:
    # After 18002: 18003 (busy), 18004 (time_wait), 18001 (time_wait), 18002 (in use).
    probe = fake_probe({18001: TIME_WAIT, 18003: BUSY, 18004: TIME_WAIT})
    assert choose_port(POOL, 18002, {18002}, probe) == Choice(18004, TIME_WAIT)


def test_exhausted_pool_raises_no_free_port() -> None:
    probe = fake_probe({18001: BUSY, 18003: BUSY, 18004: BUSY})
    with pytest.raises(NoFreePort) as info:
        choose_port(POOL, None, {18002}, probe)
    assert info.value.pool == tuple(POOL)
    assert info.value.holders == {}
    assert "18001-18004" in str(info.value)


def test_no_free_port_message_follows_holders_filled_later() -> None:
    exc = NoFreePort([18001, 18002])
    exc.holders[18001] = [(4242, "python3")]
    assert str(exc) == (
        "no free port in pool 18001-18002 "
        "(held: 18001 by pid 4242 (python3), 18002 by an unknown process)"
    )
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.pool, copy.holders) == (exc.pool, exc.holders)


def test_empty_pool_raises() -> None:
    with pytest.raises(NoFreePort, match="empty"):
        choose_port([], None, (), fake_probe({}))


def test_describe_exhausted_names_holders_and_merges_runs() -> None:
    pool = [*range(18001, 18011), 18020]
    holders = {
        18001: [(4242, "python3")],
        18002: [(77, "nginx"), (78, "nginx")],
        18011: [(1, "ignored, not in pool")],
    }
    assert describe_exhausted(pool, holders) == (
        "no free port in pool 18001-18010,18020 (held: 18001 by pid 4242 (python3), "
        "18002 by pid 77 (nginx) and pid 78 (nginx), "
        "18003-18010 by an unknown process, 18020 by an unknown process)"
    )


def test_describe_exhausted_merges_same_holder_runs() -> None:
    holders = {p: [(5, "node")] for p in (18001, 18002, 18003)}
    assert describe_exhausted([18001, 18002, 18003], holders) == (
        "no free port in pool 18001-18003 (held: 18001-18003 by pid 5 (node))"
    )


def test_describe_exhausted_names_the_components_own_instances() -> None:
    own = {18001: "active instance (pid 4242)", 18003: "draining instance (pid 4100)"}
    holders = {18001: [(4242, "python3")], 18002: [(7, "nc")], 18003: [(4100, "python3")]}
    assert describe_exhausted([18001, 18002, 18003], holders, own) == (
        "no free port in pool 18001-18003 (held: 18001 by this component's active instance"
        " (pid 4242), 18002 by pid 7 (nc), 18003 by this component's draining instance"
        " (pid 4100))"
    )
    # A pool no larger than what the component itself runs: say what to do.
    assert describe_exhausted([18001], holders, own) == (
        "no free port in pool 18001 (held: 18001 by this component's active instance"
        " (pid 4242); a rotation needs a free port beside its running instances: add ports)"
    )


def test_format_pool() -> None:
    assert format_pool([*range(18001, 18011), 18020]) == "18001-18010,18020"
    assert format_pool([18001]) == "18001"
    assert format_pool([18001, 18002, 18004, 18006, 18007]) == "18001-18002,18004,18006-18007"
    assert format_pool([]) == ""


def test_describe_holders() -> None:
    assert describe_holders(8080, {8080: [(4242, "python3")]}) == "held by pid 4242 (python3)"
    assert describe_holders(8080, {8080: [(1, "a"), (2, "b")]}) == "held by pid 1 (a) and pid 2 (b)"
    assert describe_holders(8080, {}) == "held by an unknown process"


def test_describe_squatters_accepts_the_instance_alone() -> None:
    assert describe_squatters(8080, 10, {10, 11}, [(11, "worker")]) is None
    assert describe_squatters(8080, 10, {10, 11}, [(10, "master"), (11, "worker")]) is None


def test_describe_squatters_names_who_holds_the_port_instead() -> None:
    assert describe_squatters(8080, 10, {10}, [(7, "nc")]) == (
        "port 8080 is held by pid 7 (nc), not by the instance pid 10"
    )
    assert describe_squatters(8080, 10, {10}, [(None, "?")]) == (
        "port 8080 is held by a process of another user, not by the instance pid 10"
    )
    assert describe_squatters(8080, 10, {10}, [(7, "nc"), (None, "?")]) == (
        "port 8080 is held by pid 7 (nc) and a process of another user, not by the instance pid 10"
    )


def test_describe_squatters_refuses_a_listener_besides_the_instance() -> None:
    # SO_REUSEPORT: the kernel would hand part of the connections to the other one.
    assert describe_squatters(8080, 10, {10}, [(10, "app"), (7, "python3")]) == (
        "port 8080 is also held by pid 7 (python3), besides the instance pid 10"
    )


def test_describe_squatters_without_any_listener_of_the_instance() -> None:
    assert describe_squatters(8080, 10, {10}, []) == (
        "no process of the instance pid 10 listens on port 8080"
    )
