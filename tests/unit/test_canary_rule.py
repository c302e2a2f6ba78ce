"""rotator.canary (issue 17): the rule that promotes or rolls back a canary, every branch
and its bounds; the comparison line; how many replicas a canary takes; the canary part
of a deploy request. Pure: figures in, verdicts and text out."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from rotator.canary import (
    Figures,
    Verdict,
    canary_count,
    describe,
    from_request,
    judge,
    limit_percent,
    milliseconds,
    percent,
)
from rotator.config import CanarySpec
from rotator.configfile import parse_rate

RULE = CanarySpec()  # 60s, min_requests 20, max_error_rate 1%, max_latency_ratio 1.5
STABLE = Figures(1905, 1, 0.012)


def final(canary: Figures, stable: Figures = STABLE, rule: CanarySpec = RULE) -> Verdict | None:
    return judge(canary, stable, rule, final=True)


def early(canary: Figures, stable: Figures = STABLE, rule: CanarySpec = RULE) -> Verdict | None:
    return judge(canary, stable, rule, final=False)


def test_error_rate() -> None:
    assert Figures(0, 0, None).error_rate == 0.0  # no requests: no errors, not a division
    assert Figures(20, 4, 0.01).error_rate == 0.2


# -- the verdict at the end of the window ------------------------------------------------


def test_a_good_canary_is_promoted_with_its_figures() -> None:
    assert final(Figures(212, 0, 0.014)) == Verdict(
        True,
        "212 requests, error rate 0.0% <= max_error_rate 1.0%,"
        " p95 14 ms <= 1.5 x stable's 12 ms: within the rule",
    )


def test_too_few_requests_roll_back() -> None:
    assert final(Figures(12, 0, 0.010)) == Verdict(False, "not enough traffic (12 of 20 requests)")
    many = dataclasses.replace(RULE, min_requests=5000)
    assert final(Figures(1234, 0, 0.010), rule=many) == Verdict(
        False, "not enough traffic (1,234 of 5,000 requests)"
    )
    # Even a perfect canary one request short.
    assert final(Figures(19, 0, 0.001)) == Verdict(False, "not enough traffic (19 of 20 requests)")


def test_exactly_min_requests_is_enough() -> None:
    verdict = final(Figures(20, 0, 0.010))
    assert verdict is not None and verdict.promote
    assert verdict.reason.startswith("20 requests, ")


def test_errors_above_max_error_rate_roll_back() -> None:
    assert final(Figures(20, 4, 0.010)) == Verdict(
        False, "canary error rate 20.0% > max_error_rate 1.0%"
    )
    # Just above: as many decimals as it takes not to read "1.0% > 1.0%".
    assert final(Figures(2500, 26, 0.010)) == Verdict(
        False, "canary error rate 1.04% > max_error_rate 1.0%"
    )


def test_exactly_max_error_rate_is_within_the_rule() -> None:
    verdict = final(Figures(100, 1, 0.010))
    assert verdict == Verdict(
        True,
        "100 requests, error rate 1.0% <= max_error_rate 1.0%,"
        " p95 10 ms <= 1.5 x stable's 12 ms: within the rule",
    )
    # A rate as written in the file: 0.3% is exactly 3 errors in 1,000 (0.3 / 100 in
    # floating point would be a hair less, and roll this canary back).
    rule = dataclasses.replace(RULE, max_error_rate=parse_rate("0.3%"))
    for requests in (1000, 3000, 100_000):
        at_bound = final(Figures(requests, requests * 3 // 1000, 0.010), rule=rule)
        assert at_bound is not None and at_bound.promote, at_bound
    assert final(Figures(1000, 4, 0.010), rule=rule) == Verdict(
        False, "canary error rate 0.4% > max_error_rate 0.3%"
    )


def test_a_rate_shown_beside_its_limit_reads_on_its_side() -> None:
    # 1.045% against 1.04%: one decimal would show 1.0%, below the limit it broke.
    rule = dataclasses.replace(RULE, max_error_rate=parse_rate("1.04%"))
    verdict = final(Figures(20_000, 209, 0.010), rule=rule)
    assert verdict == Verdict(False, "canary error rate 1.045% > max_error_rate 1.04%")
    # Below it, promoted, 0.99% (not 1.0%) against 1.0%.
    assert "error rate 0.99% <= max_error_rate 1.0%" in str(final(Figures(10_000, 99, 0.01)))


def test_zero_max_error_rate_refuses_any_error() -> None:
    rule = dataclasses.replace(RULE, max_error_rate=0.0)
    assert final(Figures(10_000, 1, 0.010), rule=rule) == Verdict(
        False, "canary error rate 0.01% > max_error_rate 0.0%"
    )
    assert final(Figures(10_000, 0, 0.010), rule=rule) == Verdict(
        True,
        "10,000 requests, error rate 0.0% <= max_error_rate 0.0%,"
        " p95 10 ms <= 1.5 x stable's 12 ms: within the rule",
    )


def test_the_stable_error_rate_does_not_lift_the_limit() -> None:
    # e_c <= E and e_c <= e_s + E: with e_s >= 0 the first decides. A stable side that
    # fails 10% does not let a canary fail 5%.
    assert final(Figures(100, 5, 0.010), Figures(1000, 100, 0.012)) == Verdict(
        False, "canary error rate 5.0% > max_error_rate 1.0%"
    )


def test_a_slow_canary_rolls_back() -> None:
    assert final(Figures(100, 0, 0.031)) == Verdict(False, "p95 31 ms > 1.5 x stable's 12 ms")
    # Just above 1.5 x 12 ms = 18 ms: decimals so that it does not read "18 ms > 1.5 x 12 ms".
    assert final(Figures(100, 0, 0.0184)) == Verdict(False, "p95 18.4 ms > 1.5 x stable's 12.0 ms")
    assert final(Figures(100, 0, 0.01801)) == Verdict(
        False, "p95 18.01 ms > 1.5 x stable's 12.00 ms"
    )
    other = dataclasses.replace(RULE, max_latency_ratio=3)
    assert final(Figures(100, 0, 0.037), rule=other) == Verdict(
        False, "p95 37 ms > 3 x stable's 12 ms"
    )


def test_exactly_the_latency_limit_is_within_the_rule() -> None:
    # 1.5 x 0.012 is 0.018000000000000002 in floating point; 18 ms is at the bound.
    verdict = final(Figures(100, 0, 0.018))
    assert verdict is not None and verdict.promote
    assert "p95 18 ms <= 1.5 x stable's 12 ms: within the rule" in verdict.reason
    # And 1.5 x 0.009 is 0.013499999999999998: 13.5 ms is at the bound too, not above it.
    verdict = final(Figures(100, 0, 0.0135), Figures(100, 0, 0.009))
    assert verdict is not None and "p95 13.5 ms <= 1.5 x stable's 9.0 ms" in verdict.reason
    # At the bound, as many decimals as it takes to read so: not "13.6 <= 1.5 x 9.0".
    verdict = final(Figures(100, 0, 0.01356), Figures(100, 0, 0.00904))
    assert verdict is not None and "p95 13.56 ms <= 1.5 x stable's 9.04 ms" in verdict.reason
    below = final(Figures(100, 0, 0.0179))
    assert below is not None and "p95 17.9 ms <= 1.5 x stable's 12.0 ms" in below.reason


def test_sub_millisecond_latencies_keep_two_digits() -> None:
    verdict = final(Figures(100, 0, 0.00042), Figures(100, 0, 0.00030))
    assert verdict is not None and "p95 0.42 ms <= 1.5 x stable's 0.30 ms" in verdict.reason
    slower = final(Figures(100, 0, 0.00046), Figures(100, 0, 0.00030))
    assert slower is not None and slower.promote
    assert "p95 0.46 ms within 5 ms of stable's 0.30 ms" in slower.reason


def test_latency_differences_under_the_slack_never_roll_back() -> None:
    """1.6 x a fast app's p95 is a fraction of a millisecond: noise, not a regression."""
    assert final(Figures(100, 0, 0.0049), Figures(100, 0, 0.0001)).promote  # type: ignore[union-attr]
    assert final(Figures(100, 0, 0.0052), Figures(100, 0, 0.0001)) == Verdict(
        False, "p95 5.20 ms > stable's 0.10 ms + 5 ms"
    )
    # Past the slack, the ratio decides: 20 ms against 12 ms is out, 17 ms in.
    assert not final(Figures(100, 0, 0.020), Figures(100, 0, 0.012)).promote  # type: ignore[union-attr]
    assert final(Figures(100, 0, 0.017), Figures(100, 0, 0.012)).promote  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("canary", "stable", "why"),
    [
        (Figures(100, 0, 0.050), Figures(0, 0, None), "the stable side answered no request"),
        (Figures(100, 0, 0.050), Figures(7, 7, None), "no p95 measured on the stable side"),
        (Figures(100, 1, None), STABLE, "no p95 measured on the canary"),
    ],
)
def test_the_latency_rule_is_skipped_without_a_comparison(
    canary: Figures, stable: Figures, why: str
) -> None:
    verdict = final(canary, stable)
    assert verdict is not None and verdict.promote  # 50 ms would break 1.5 x anything known
    assert verdict.reason.endswith(f", latency not compared ({why}): within the rule")


def test_min_requests_zero_promotes_on_health_alone() -> None:
    none = dataclasses.replace(RULE, min_requests=0)
    assert final(Figures(0, 0, None), rule=none) == Verdict(
        True, "no requests reached the canary: promoted on its health alone"
    )
    # What did arrive is still judged.
    assert final(Figures(3, 0, 0.010), rule=none) == Verdict(
        True,
        "3 requests, error rate 0.0% <= max_error_rate 1.0%,"
        " p95 10 ms <= 1.5 x stable's 12 ms: within the rule",
    )
    assert final(Figures(1, 0, 0.100), rule=none) == Verdict(
        False, "p95 100 ms > 1.5 x stable's 12 ms"
    )


# -- during the window ------------------------------------------------------------------


def test_a_broken_canary_rolls_back_as_soon_as_it_has_min_requests() -> None:
    assert early(Figures(19, 19, 0.010)) is None  # all errors, but not yet 20 answers
    assert early(Figures(20, 1, 0.010)) == Verdict(
        False, "canary error rate 5.0% > max_error_rate 1.0%"
    )


def test_during_the_window_nothing_else_decides() -> None:
    assert early(Figures(0, 0, None)) is None
    assert early(Figures(100, 1, 0.010)) is None  # exactly max_error_rate
    assert early(Figures(100, 0, 0.500)) is None  # slow: judged at the end only
    assert early(Figures(5, 0, 0.010)) is None  # too few: judged at the end only
    none = dataclasses.replace(RULE, min_requests=0)
    assert early(Figures(0, 0, None), rule=none) is None
    assert early(Figures(1, 1, None), rule=none) == Verdict(
        False, "canary error rate 100.0% > max_error_rate 1.0%"
    )


# -- the comparison line ----------------------------------------------------------------


def test_describe_as_the_issue_shows_it() -> None:
    assert describe("hermes", 10, Figures(212, 0, 0.014), STABLE) == (
        "canary hermes 10%: 212 requests, 0 errors (0.0%), p95 14 ms"
        " | stable 1,905 requests, 1 error (0.05%), p95 12 ms"
    )


def test_describe_singulars_nothing_yet_and_small_figures() -> None:
    assert describe("web", 25, Figures(1, 1, 0.0025), Figures(0, 0, None)) == (
        "canary web 25%: 1 request, 1 error (100.0%), p95 2.5 ms"
        " | stable 0 requests, 0 errors (0.0%), p95 -"
    )
    assert describe("web", 1, Figures(12_345, 2, 0.00042), Figures(1_234_567, 3, 1.5)) == (
        "canary web 1%: 12,345 requests, 2 errors (0.02%), p95 0.42 ms"
        " | stable 1,234,567 requests, 3 errors (0.0002%), p95 1500 ms"
    )


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (0.0, "0.0%"),
        (0.2, "20.0%"),
        (1 / 3, "33.3%"),
        (1.0, "100.0%"),
        (0.005, "0.5%"),
        (1 / 1905, "0.05%"),  # not 0.1% or 0.0%: the first significant digit shows
        (0.00005, "0.005%"),
    ],
)
def test_percent(rate: float, text: str) -> None:
    assert percent(rate) == text


def test_limits_are_shown_as_written() -> None:
    written = ["1%", "0.25%", "0.3%", "0%", "100%", "0.05%", "12.5%"]
    shown = ["1.0%", "0.25%", "0.3%", "0.0%", "100.0%", "0.05%", "12.5%"]
    assert [limit_percent(parse_rate(text)) for text in written] == shown


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.0, "0 ms"), (0.014, "14 ms"), (0.0025, "2.5 ms"), (0.00042, "0.42 ms")],
)
def test_milliseconds(seconds: float | None, text: str) -> None:
    assert milliseconds(seconds) == text


# -- replicas and requests ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "percent_", "count"),
    [
        (1, 10, 1),
        (1, 99, 1),
        (3, 10, 1),  # 0.3: at least one
        (10, 10, 1),
        (10, 11, 2),  # 1.1: up
        (4, 50, 2),
        (5, 50, 3),
        (8, 99, 8),
        (21, 5, 2),
        (999, 1, 10),
    ],
)
def test_canary_count(replicas: int, percent_: int, count: int) -> None:
    assert canary_count(replicas, percent_) == count


def test_from_request_takes_the_rule_and_overrides_it() -> None:
    rule = CanarySpec(duration=120.0, min_requests=50, max_error_rate=0.005)
    assert from_request({"weight": 10}, rule) == (10, rule)
    weight, taken = from_request({"weight": 99, "duration": 30, "min_requests": 0}, rule)
    assert (weight, taken) == (99, dataclasses.replace(rule, duration=30.0, min_requests=0))
    assert isinstance(taken.duration, float)
    assert from_request({"weight": 1, "duration": 0.5}, rule)[1].duration == 0.5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([10], "canary must be an object, not list"),
        ({"weight": 10, "for": 30}, "canary: unknown field 'for' (allowed: weight, duration, min_requests)"),
        ({}, "canary.weight must be a whole number of percent from 1 to 99, not None"),
        ({"weight": 0}, "canary.weight must be a whole number of percent from 1 to 99, not 0"),
        ({"weight": 100}, "canary.weight must be a whole number of percent from 1 to 99, not 100"),
        ({"weight": True}, "canary.weight must be a whole number of percent from 1 to 99, not True"),
        ({"weight": "10"}, "canary.weight must be a whole number of percent from 1 to 99, not '10'"),
        ({"weight": 10.5}, "canary.weight must be a whole number of percent from 1 to 99, not 10.5"),
        ({"weight": 10, "duration": 0}, "canary.duration must be a number of seconds above 0, not 0"),
        ({"weight": 10, "duration": -1}, "canary.duration must be a number of seconds above 0, not -1"),
        ({"weight": 10, "duration": "30s"}, "canary.duration must be a number of seconds above 0, not '30s'"),
        ({"weight": 10, "duration": float("inf")}, "canary.duration must be a number of seconds above 0, not inf"),
        ({"weight": 10, "duration": float("nan")}, "canary.duration must be a number of seconds above 0, not nan"),
        ({"weight": 10, "duration": 10**400}, f"canary.duration must be a number of seconds above 0, not {10**400!r}"),
        ({"weight": 10, "min_requests": -1}, "canary.min_requests must be a whole number, 0 or more, not -1"),
        ({"weight": 10, "min_requests": 2.5}, "canary.min_requests must be a whole number, 0 or more, not 2.5"),
        ({"weight": 10, "min_requests": False}, "canary.min_requests must be a whole number, 0 or more, not False"),
    ],
)  # fmt: skip
def test_from_request_refuses_a_bad_request(data: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        from_request(data, RULE)
    assert str(caught.value) == message
