"""What every figure of a report shares: the backend, one colour and marker per method, saving."""
from __future__ import annotations

import re
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


def file_stem(text: str) -> str:
    """`text` as a file name stem: runs of anything but letters, digits, '.', '_' and '-' become one '_'
    (a regime names its settings, 'finetuned 2 ep, lr=0.01', and must not become a path or a link)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def save_figure(fig, path: Path) -> Path:
    """Write `path`.png (150 dpi) and `path`.pdf, close the figure, return the PNG path. The suffixes are
    appended, not swapped in: a stem may hold a dot (timm's 'vit_base_patch16_224.augreg_in21k', 'lr=0.01')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = path.with_name(path.name + ".png"), path.with_name(path.name + ".pdf")
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    plt.close(fig)
    return png
