"""What every figure of a report shares: the backend, one colour and marker per method, saving."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written on headless machines and inside jobs
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

import methods  # noqa: E402

BASELINE = "none"
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h")


def method_style(method: str) -> dict:
    """Colour and marker of a method, stable across figures and reports (registry order)."""
    order = [m for m in methods.available() if m != BASELINE]
    # an unregistered name (records from another checkout) still gets a colour of its own, stably
    index = order.index(method) if method in order else len(order) + sum(map(ord, method))
    palette = sns.color_palette("tab10", 10)
    return dict(color=palette[index % 10], marker=MARKERS[index % len(MARKERS)])


def interval_bars(ax, x, low, high, color, alpha: float = 0.4) -> None:
    """Vertical bars from `low` to `high` at `x`. Drawn from the bounds, not as ± errors around the point:
    a bootstrap percentile interval of a biased statistic (ECE) need not contain the point estimate."""
    ax.vlines(x, low, high, colors=[color], alpha=alpha, lw=1)


def save_figure(fig, path: Path) -> Path:
    """Write `path`.png (150 dpi) and `path`.pdf, close the figure, return the PNG path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=150, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path.with_suffix(".png")
