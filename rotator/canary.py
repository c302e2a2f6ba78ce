"""The canary's rule: whether a canary's figures promote it or roll it back, and its words.

Pure: no sockets, processes, clocks or asyncio. Holds Figures (one side's requests, errors
and p95 over the window), Verdict, `judge` (the rule), `describe` (the running comparison
as one line), `canary_count` (how many replicas a canary takes) and `from_request` (the
canary part of a deploy request, checked). Counting requests is the proxy's job, the
window and what a verdict does the component's; the rule's settings are `canary:` in the
config (rotator.config.CanarySpec).

The rule. For the canary (c) and the stable side (s) over the same window: n the requests
answered, e = errors / n (5xx answers, connection errors and timeouts; 0 when n = 0), p
the p95 latency. N = min_requests, E = max_error_rate, R = max_latency_ratio.

    promote  <=>  n_c >= N  and  e_c <= E  and  e_c <= e_s + E
                  and  p_c <= max(R x p_s, p_s + SLACK)

at the end of the window (or on `rotator promote`, which promotes without judging). The
latency term is left out, and the reason says so, when the stable side answered no
request or either side has no p95 (no answer measured). e_s >= 0, so e_c <= E implies
e_c <= e_s + E: the stable term never decides on its own, and a reason names E.
With N = 0, a canary that answered nothing is promoted on its health alone; whatever it
did answer is still judged. During the window, before the end:

    roll back at once  <=>  n_c >= N  and  e_c > E

so a broken canary is taken out as soon as its figures are worth anything, and a slow
one waits for the verdict (p95 over a few requests is noise). Bounds are inclusive:
e_c = E and n_c = N promote. SLACK (5 ms) keeps the ratio from judging noise: a fresh
process on a fast local app answers in 0.4 ms where its warm elder takes 0.25 ms, 1.6
times as long and of no consequence to anyone (measured with the demo app: a good canary
was rolled back on it before the slack).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeGuard

from rotator.config import CanarySpec

# Latency differences below this never fail the ratio (see the rule above).
SLACK = 0.005

# The share of requests a canary may take, in percent: 0 would be no canary, 100 a deploy.
MIN_WEIGHT, MAX_WEIGHT = 1, 99
REQUEST_KEYS = ("weight", "duration", "min_requests")  # a deploy request's "canary"
# A figure shown to tell two values apart gets at most this many more decimals.
_MORE_DECIMALS = 4


@dataclass(frozen=True)
class Figures:
    """One side's figures over the window: requests answered (errors included), errors,
    and the p95 latency in seconds (None: no latency measured)."""

    requests: int
    errors: int
    p95: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str  # one line: the figures that decided, and the limits they met or broke


def judge(canary: Figures, stable: Figures, rule: CanarySpec, *, final: bool) -> Verdict | None:
    """The verdict on the canary's figures so far. `final` (the window is over): promote or
    roll back. Not final: a roll-back once the canary has min_requests answers and breaks
    the error rule, else None (go on)."""
    enough = canary.requests >= rule.min_requests
    broken = enough and canary.error_rate > rule.max_error_rate
    if broken:
        rate, most = _apart(canary.error_rate, rule.max_error_rate)
        return Verdict(False, f"canary error rate {rate} > max_error_rate {most}")
    if not final:
        return None
    if not enough:
        needed = f"{canary.requests:,} of {rule.min_requests:,}"
        return Verdict(False, f"not enough traffic ({needed} requests)")
    if canary.requests == 0:  # min_requests 0
        return Verdict(True, "no requests reached the canary: promoted on its health alone")
    rate, most = _apart(canary.error_rate, rule.max_error_rate)
    errors = f"error rate {rate} <= max_error_rate {most}"
    if not stable.requests or not stable.p95 or canary.p95 is None:
        why = (
            "the stable side answered no request"
            if not stable.requests
            else "no p95 measured on the " + ("canary" if canary.p95 is None else "stable side")
        )
        latency = f"latency not compared ({why})"
    else:
        ratio = rule.max_latency_ratio
        limit = max(ratio * stable.p95, stable.p95 + SLACK)
        p95, base = _apart_latency(canary.p95, stable.p95, ratio)
        # Inclusive, and so not broken by a product's last bit (1.5 x 0.012 > 0.018).
        if canary.p95 > limit and not math.isclose(canary.p95, limit):
            if limit > ratio * stable.p95:  # the slack was the bound
                return Verdict(False, f"p95 {p95} > stable's {base} + {SLACK * 1000:g} ms")
            return Verdict(False, f"p95 {p95} > {ratio:g} x stable's {base}")
        if canary.p95 <= ratio * stable.p95 or math.isclose(canary.p95, ratio * stable.p95):
            latency = f"p95 {p95} <= {ratio:g} x stable's {base}"
        else:
            latency = f"p95 {p95} within {SLACK * 1000:g} ms of stable's {base}"
    return Verdict(
        True, f"{_count(canary.requests, 'request')}, {errors}, {latency}: within the rule"
    )


def describe(name: str, weight: int, canary: Figures, stable: Figures) -> str:
    """The running comparison, one line: `canary hermes 10%: 212 requests, 0 errors (0.0%),
    p95 14 ms | stable 1,905 requests, 1 error (0.05%), p95 12 ms`."""
    return f"canary {name} {weight}%: {compare(canary, stable)}"


def compare(canary: Figures, stable: Figures) -> str:
    """Both sides' figures: `212 requests, 0 errors (0.0%), p95 14 ms | stable 1,905
    requests, 1 error (0.05%), p95 12 ms` (the status table and the dashboard show it)."""
    return f"{_side(canary)} | stable {_side(stable)}"


def canary_count(replicas: int, percent: int) -> int:
    """The canary's instances: ceil(replicas x percent / 100), at least 1."""
    return max(1, -(-replicas * percent // 100))


def from_request(data: object, rule: CanarySpec) -> tuple[int, CanarySpec]:
    """The canary part of a deploy request, {"weight": 10, "duration": 30.0,
    "min_requests": 5} (weight required): the weight and `rule` with the request's
    duration and min_requests over it. ValueError, one line, on anything else."""
    if not isinstance(data, Mapping):
        raise ValueError(f"canary must be an object, not {type(data).__name__}")
    if unknown := [key for key in data if key not in REQUEST_KEYS]:
        raise ValueError(
            f"canary: unknown field {unknown[0]!r} (allowed: {', '.join(REQUEST_KEYS)})"
        )
    weight = data.get("weight")
    if not (_whole(weight) and MIN_WEIGHT <= weight <= MAX_WEIGHT):
        raise ValueError(
            f"canary.weight must be a whole number of percent from {MIN_WEIGHT} to"
            f" {MAX_WEIGHT}, not {weight!r}"
        )
    seconds = data.get("duration", rule.duration)
    # Compared before float(): JSON's 1 followed by 400 zeros is an int float() cannot take.
    if not (_number(seconds) and 0 < seconds <= sys.float_info.max):
        raise ValueError(f"canary.duration must be a number of seconds above 0, not {seconds!r}")
    count = data.get("min_requests", rule.min_requests)
    if not (_whole(count) and count >= 0):
        raise ValueError(f"canary.min_requests must be a whole number, 0 or more, not {count!r}")
    return weight, dataclasses.replace(rule, duration=float(seconds), min_requests=count)


def percent(rate: float, more: int = 0) -> str:
    """A measured rate for people: one decimal, or as many as its first significant digit
    needs (1/1905 is 0.05%, not 0.1% or 0.0%); `more` adds decimals."""
    value = rate * 100
    decimals = 1 if value == 0 else max(1, -math.floor(math.log10(value)))
    return f"{value:.{decimals + more}f}%"


def milliseconds(seconds: float | None) -> str:
    """A latency for people: whole ms from 10 ms up, else two significant digits
    (2.5 ms, 0.42 ms); '-' for none."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.{_ms_decimals(seconds)}f} ms"


def limit_percent(rate: float) -> str:
    """A configured rate as it was written: 0.01 -> '1.0%', 0.0025 -> '0.25%'."""
    text = f"{rate * 100:.6f}".rstrip("0")
    return f"{text}0%" if text.endswith(".") else f"{text}%"


# -- private --------------------------------------------------------------------------------


def _side(figures: Figures) -> str:
    return (
        f"{_count(figures.requests, 'request')}, {_count(figures.errors, 'error')}"
        f" ({percent(figures.error_rate)}), p95 {milliseconds(figures.p95)}"
    )


def _ms_decimals(seconds: float) -> int:
    value = seconds * 1000
    return 0 if value <= 0 else max(0, 1 - math.floor(math.log10(value)))


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _apart(rate: float, limit: float) -> tuple[str, str]:
    """A measured rate and its configured limit as text, the rate with enough decimals to
    read on the side of the limit it is on (1.04% against 1.0%, not 1.0% against 1.0%)."""
    written = limit_percent(limit)
    if math.isclose(rate, limit):  # at the bound: nothing to tell apart
        return written, written
    bound = float(written[:-1])
    for more in range(_MORE_DECIMALS + 1):
        text = percent(rate, more)
        if (shown := float(text[:-1])) != bound and (shown > bound) == (rate > limit):
            break
    return text, written


def _apart_latency(p95: float, base: float, ratio: float) -> tuple[str, str]:
    """The canary's p95 and the stable one as text, with the same decimals, enough that the
    first reads on the side of ratio x the second that it is on (18.4 ms against 1.5 x
    12.0 ms, not 18 ms against 1.5 x 12 ms)."""
    limit = ratio * base
    least = max(_ms_decimals(p95), _ms_decimals(base))
    for decimals in range(least, least + _MORE_DECIMALS + 1):
        text, other = f"{p95 * 1000:.{decimals}f}", f"{base * 1000:.{decimals}f}"
        shown, bound = float(text), ratio * float(other)
        if math.isclose(p95, limit):  # at the bound (1.5 x 0.012 is 0.018000000000000002)
            if shown <= bound or math.isclose(shown, bound):
                break
        elif not math.isclose(shown, bound) and (shown > bound) == (p95 > limit):
            break
    return f"{text} ms", f"{other} ms"


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
