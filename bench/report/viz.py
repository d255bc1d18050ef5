"""Token-selection pictures: which patches each method keeps, idles, drops, fuses or merges.

For a few eval images, one figure per image: a row per method, a column per reduction block,
each cell the image with the state of every original patch after that block overlaid. The states
come from the methods' auxiliary outputs (`model.token_reduction.aux`, recorded with
`state.trace = True`): "patch_state" (B, N0) with methods.KEPT/IDLE/DROPPED/FUSED, and for ToMe
"patch_group" (B, N0), the output token that holds each original patch. The Swin methods also record
"window" (N0,), the attention window of every patch in that block, drawn as a dotted grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import methods  # noqa: E402

from .figure import save_figure  # noqa: E402

# Overlay colour (RGBA) per patch state; kept patches are left clear so the image shows through.
# Dropped is red, not black: Fashion-MNIST and many photos have dark backgrounds.
STATE_COLOURS = {
    methods.KEPT: (1.0, 1.0, 1.0, 0.0),
    methods.IDLE: (1.0, 0.8, 0.0, 0.6),
    methods.DROPPED: (0.85, 0.1, 0.1, 0.7),
    methods.FUSED: (0.1, 0.45, 1.0, 0.6),
}
# Merged tokens: muted colours unlike the state colours above (no yellow, red or bright blue).
MERGE_PALETTE = plt.get_cmap("tab20b")
STATE_NAMES = {methods.KEPT: "kept", methods.IDLE: "idle", methods.DROPPED: "dropped", methods.FUSED: "fused"}


@dataclass
class TokenTrace:
    """Per-patch states of one method on a batch of images, by block index."""

    label: str
    states: dict[int, np.ndarray] = field(default_factory=dict)  # block -> (B, N0) int8
    groups: dict[int, np.ndarray] = field(default_factory=dict)  # block -> (B, N0) int64 (ToMe)
    windows: dict[int, np.ndarray] = field(default_factory=dict)  # block -> (N0,) window ids (Swin methods)

    @property
    def blocks(self) -> list[int]:
        return sorted(set(self.states) | set(self.groups))

    def at(self, block: int, image: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """State and group of every patch after `block`: the latest record at or before it."""
        def latest(records):
            earlier = [b for b in records if b <= block]
            return records[max(earlier)][image] if earlier else None
        return latest(self.states), latest(self.groups)


def trace_tokens(model: torch.nn.Module, images: torch.Tensor, label: str) -> TokenTrace:
    """Run a patched model once with tracing on and collect its per-patch auxiliary outputs."""
    method = model.token_reduction
    method.state.trace = True
    model.eval()
    with torch.inference_mode():
        model(images)
    trace = TokenTrace(label)
    for block, value in method.aux.get("patch_state", {}).items():
        trace.states[int(block)] = value.detach().cpu().numpy()
    for block, value in method.aux.get("patch_group", {}).items():
        trace.groups[int(block)] = value.detach().cpu().numpy()
    for block, value in method.aux.get("window", {}).items():
        trace.windows[int(block)] = value.detach().cpu().numpy()
    return trace


def patch_overlay(grid: tuple[int, int], state: np.ndarray | None, group: np.ndarray | None) -> np.ndarray:
    """(gh, gw, 4) RGBA: merged groups in distinct colours, else the state colours."""
    gh, gw = grid
    rgba = np.zeros((gh * gw, 4))
    if state is not None:
        for value, colour in STATE_COLOURS.items():
            rgba[state == value] = colour
    if group is not None:  # a group of two or more original patches is one merged token
        ids, counts = np.unique(group, return_counts=True)
        for n, gid in enumerate(ids[counts > 1]):
            rgba[group == gid] = (*MERGE_PALETTE(n % MERGE_PALETTE.N)[:3], 0.6)
    return rgba.reshape(gh, gw, 4)


def group_borders(grid: tuple[int, int], group: np.ndarray, patch_hw: tuple[float, float]) -> list:
    """Line segments (in pixels) around merged tokens, between neighbouring patches held by different
    tokens: colours repeat once there are more merged tokens than colours, the outlines do not."""
    gh, gw = grid
    ids, counts = np.unique(group, return_counts=True)
    merged = np.isin(group, ids[counts > 1]).reshape(gh, gw)
    g = group.reshape(gh, gw)
    ph, pw = patch_hw
    segments = []
    vertical = (g[:, 1:] != g[:, :-1]) & (merged[:, 1:] | merged[:, :-1])
    horizontal = (g[1:, :] != g[:-1, :]) & (merged[1:, :] | merged[:-1, :])
    for i, j in zip(*np.nonzero(vertical)):  # edge right of patch (i, j)
        x = (j + 1) * pw - 0.5
        segments.append([(x, i * ph - 0.5), (x, (i + 1) * ph - 0.5)])
    for i, j in zip(*np.nonzero(horizontal)):  # edge below patch (i, j)
        y = (i + 1) * ph - 0.5
        segments.append([(j * pw - 0.5, y), ((j + 1) * pw - 0.5, y)])
    return segments


def _display_image(image: torch.Tensor, mean, std) -> np.ndarray:
    """Undo the eval normalisation: (C, H, W) -> (H, W) or (H, W, 3) in [0, 1]."""
    c = image.shape[0]
    x = image.float() * torch.tensor(std[:c]).view(-1, 1, 1) + torch.tensor(mean[:c]).view(-1, 1, 1)
    x = x.clamp(0, 1).permute(1, 2, 0).numpy()
    return x[..., 0] if c == 1 else x


def selection_figure(image: np.ndarray, grid: tuple[int, int], traces: list[TokenTrace], index: int, title: str = ""):
    """One image: a row per traced method, a column per reduction block of any of them."""
    blocks = sorted({b for t in traces for b in t.blocks})
    rows, cols = len(traces), len(blocks) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols + 0.5, 1.5 * rows + 0.8), squeeze=False)
    h, w = image.shape[:2]
    cmap = "gray" if image.ndim == 2 else None
    for r, trace in enumerate(traces):
        axes[r, 0].imshow(image, cmap=cmap, vmin=0, vmax=1)
        axes[r, 0].set_ylabel(trace.label, fontsize=8)
        for c, block in enumerate(blocks, start=1):
            ax = axes[r, c]
            ax.imshow(image, cmap=cmap, vmin=0, vmax=1)
            state, group = trace.at(block, index)
            ax.imshow(patch_overlay(grid, state, group), extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
            if group is not None:
                borders = group_borders(grid, group, (h / grid[0], w / grid[1]))
                ax.add_collection(LineCollection(borders, colors="white", linewidths=0.6))
            if block in trace.windows:  # the block's attention windows (shifted ones wrap around)
                borders = group_borders(grid, trace.windows[block], (h / grid[0], w / grid[1]))
                ax.add_collection(LineCollection(borders, colors="black", linewidths=0.4, linestyles=":"))
            if r == 0:
                ax.set_title(f"after block {block}", fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    legend = [Patch(facecolor=STATE_COLOURS[s][:3], alpha=max(STATE_COLOURS[s][3], 0.6), edgecolor="grey",
                    label=STATE_NAMES[s] + (" (clear)" if s == methods.KEPT else "")) for s in STATE_COLOURS]
    if any(t.groups for t in traces):
        legend.append(Patch(facecolor=MERGE_PALETTE(0), alpha=0.6, edgecolor="white",
                            label="merged (one colour and outline per token)"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return fig


def _configs(rows, target_ratio: float) -> list:
    """One reduced configuration per method variant: the keep ratio nearest `target_ratio`."""
    rows = rows[rows["method"] != "none"]
    return [group.iloc[int(np.argmin(np.abs(group["keep_ratio"].to_numpy() - target_ratio)))]
            for _, group in rows.groupby("variant", sort=False)]


def _build(row, model_name: str, checkpoint, pretrained: bool):
    from ..models import create_model, wants_pretrained

    pretrained = wants_pretrained(model_name, checkpoint, pretrained)
    model = create_model(model_name, checkpoint=checkpoint, pretrained=pretrained)
    layers = list(row.get("layers") or ()) or None
    return methods.apply(model, row["method"], keep_ratio=float(row["keep_ratio"]), layers=layers,
                         **dict(row.get("options") or {}))


def _eval_images(rows, model_name: str, checkpoint, pretrained: bool, n_images: int):
    """(unpatched model, eval set, image batch) of the model the records measured; raises if unavailable."""
    from ..data import eval_dataset
    from ..models import EMBEDDED_MODEL, wants_pretrained

    if checkpoint is None and not wants_pretrained(model_name, checkpoint, pretrained):
        raise ValueError("the records name no weights, and pictures of random weights say nothing")
    data = next((d for d in rows.get("data", pd.Series(dtype=object)).dropna()), None)
    if data is None and model_name.split(".")[0] != EMBEDDED_MODEL:
        raise ValueError("no accuracy record names the eval data")
    base = _build(dict(method="none", keep_ratio=1.0), model_name, checkpoint, pretrained)
    dataset = eval_dataset(data or "fashion-mnist", base, limit=n_images)
    return base, dataset, torch.stack([dataset[i][0] for i in range(len(dataset))])


def write_pictures(summary, out_dir, n_images: int = 3, target_ratio: float = 0.7) -> tuple[dict, dict]:
    """Token pictures for every model (and weights) of `summary` whose weights and eval data are at hand.

    Returns ({name: png path}, {what: why skipped}); nothing here is fatal to a report."""
    paths, skipped = {}, {}
    # the released weights: not a finetune's, and never random ones (pictures of those say nothing)
    summary = summary[(summary["regime"] == "off-the-shelf") & ~summary["random_weights"].fillna(False).astype(bool)]
    for (model_name, checkpoint, pretrained), rows in summary.groupby(["model", "checkpoint", "pretrained"]):
        checkpoint, name = checkpoint or None, model_name + (f" ({Path(checkpoint).name})" if checkpoint else "")
        try:
            base, dataset, images = _eval_images(rows, model_name, checkpoint, bool(pretrained), n_images)
        except Exception as exc:  # weights or data not on this machine: the tables still stand
            skipped[name] = f"model or data unavailable: {str(exc).splitlines()[0][:200]}"
            continue
        traces = []
        for row in _configs(rows, target_ratio):
            label = f"{row['variant']} keep {row['keep_ratio']:g}"
            torch.manual_seed(0)  # random methods (and untrained predictors) draw the same tokens every time
            try:
                trace = trace_tokens(_build(row, model_name, checkpoint, bool(pretrained)), images, label)
            except Exception as exc:
                skipped[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                continue
            if not trace.blocks:
                skipped[label] = "the method recorded no patch_state/patch_group aux outputs"
                continue
            traces.append(trace)
        grid = tuple(int(g) for g in base.patch_embed.grid_size)
        mean, std = dataset.data_config["mean"], dataset.data_config["std"]
        for i in range(len(images) if traces else 0):
            label = dataset.classes[dataset.targets[i]] if dataset.classes else str(dataset.targets[i])
            fig = selection_figure(_display_image(images[i], mean, std), grid, traces, i,
                                   title=f"{name}: eval image {i} ({label})")
            stem = f"tokens_{model_name}_{Path(checkpoint).stem}" if checkpoint else f"tokens_{model_name}"
            path = Path(out_dir) / f"{stem.replace('/', '_')}_img{i}"
            paths[f"token selection ({name}, image {i})"] = save_figure(fig, path)
    return paths, skipped
