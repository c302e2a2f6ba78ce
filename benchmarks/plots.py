"""PNG plots of the restart benchmark: each request's latency over time, each rotation marked.

matplotlib is optional (`pip install -e '.[bench]'`); without it `available()` is
False and the benchmarks print that they skipped the plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Group name -> colour; a group not listed gets matplotlib's next colour.
COLOURS = {
    "keep-alive, retry": "tab:blue",
    "keep-alive, no retry": "tab:orange",
    "new connection": "tab:purple",
}

TICKS = [m * 10.0**e for e in range(-2, 5) for m in (1, 2, 5)]  # latency axis, ms


@dataclass
class Panel:
    """One load run of one scenario, times in seconds since the load began."""

    title: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]]  # group: (sent at s, latency ms)
    failures: Sequence[float] = ()
    rotations: Sequence[tuple[float, float]] = ()  # (began, ended)
    switches: Sequence[float] = ()  # a new backend's first answer
    notes: list[str] = field(default_factory=list)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def timeline_png(path: Path, title: str, panels: Sequence[Panel]) -> Path:
    """One row per panel, shared time axis, log latency axis; returns the path written."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(
        len(panels), 1, figsize=(12, 3.2 * len(panels)), sharex=True, squeeze=False
    )
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        _draw(ax, panel)
        # 1-2-5 ticks, written plainly (20, not 2x10^1), whatever the range.
        low, high = ax.get_ylim()
        ax.set_yticks([t for t in TICKS if low <= t <= high])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    axes[-1, 0].set_xlabel("seconds since the load began")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _draw(ax: Any, panel: Panel) -> None:
    for i, (start, end) in enumerate(panel.rotations):
        ax.axvspan(start, end, color="0.88", lw=0, label="restart running" if i == 0 else None)
    for i, t in enumerate(panel.switches):
        ax.axvline(t, color="tab:green", lw=0.8, ls="--", label="new backend answers" if i == 0 else None)  # fmt: skip
    for name, (sent, latency) in panel.series.items():
        # Pixel markers: 100 000+ points per run stay readable and cheap to draw.
        ax.plot(sent, latency, ",", color=COLOURS.get(name), alpha=0.6, rasterized=True)
        ax.plot([], [], "o", ms=4, color=COLOURS.get(name), label=f"{name} (latency)")
    if panel.failures:
        # At the top of the panel, whatever the latency scale.
        ax.plot(panel.failures, [0.96] * len(panel.failures), "|", color="red", ms=8,
                transform=ax.get_xaxis_transform(), label="failed request")  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms")
    ax.set_title(panel.title, fontsize=9, loc="left")
    ax.grid(True, which="major", axis="y", color="0.8", lw=0.5)
    ax.legend(loc="lower right", fontsize=7, markerscale=1, framealpha=0.8)
    for i, note in enumerate(panel.notes):
        ax.text(0.005, 0.04 + 0.08 * i, note, transform=ax.transAxes, fontsize=7, color="0.3")
