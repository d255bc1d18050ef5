"""bench.report.plots and bench.report.viz: files, axis labels, legend entries, one line per method, the idle
band from the FLOPs record's schedule, token pictures."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgb

import methods
from bench.models import create_model
from bench.report import plots, viz
from bench.report.figure import method_style
from bench.report.frame import variant_label

MODEL = "tokenbench_vit_fmnist"


def schedule(keep, idle):
    """A FLOPs record's `blocks`: three full blocks, then `keep` of the tokens in attention and MLP; the rest
    carried idle through the block (IdleViT) or pruned (EViT)."""
    kept = int(50 * keep)
    full = [dict(n_in=50, n_attn=50, n_mlp=50, n_out=50, action="")] * 3
    if idle:
        return full + [dict(n_in=50, n_attn=kept, n_mlp=kept, n_out=50, action="idle")] * 9
    return full + [dict(n_in=50, n_attn=50, n_mlp=50, n_out=kept, action="prune")] + \
        [dict(n_in=kept, n_attn=kept, n_mlp=kept, n_out=kept, action="")] * 8


def summary_frame():
    """A summary as bench.report.summarize gives it: baseline + two method variants at two ratios."""
    rows = [dict(method="none", keep_ratio=1.0, options_key=(), top1=90.0, gmacs=1.0, img_s=1000.0)]
    for method, options, base in (("idle", (), 88.0), ("evit", (("fuse", False),), 87.0), ("evit", (), 87.5)):
        for keep in (0.5, 0.7):
            rows.append(dict(method=method, keep_ratio=keep, options_key=options, top1=base - 10 * (1 - keep),
                             gmacs=keep, img_s=1000.0 / keep))
    frame = pd.DataFrame(rows).assign(model=MODEL, layers=[()] * len(rows), regime="off-the-shelf",
                                      finetune=[()] * len(rows), checkpoint="", pretrained=False,
                                      random_weights=False)
    frame["options"] = frame["options_key"].map(dict)
    frame["top1_ci_low"], frame["top1_ci_high"] = frame["top1"] - 1, frame["top1"] + 1
    frame["tokens_per_block"] = [[50] * 12 if m == "none" else [50] * 3 + [int(50 * k)] * 9
                                 for m, k in zip(frame["method"], frame["keep_ratio"])]
    frame["blocks"] = [schedule(1.0, False) if m == "none" else schedule(k, m == "idle")
                       for m, k in zip(frame["method"], frame["keep_ratio"])]
    frame["variant"] = frame.apply(variant_label, axis=1)
    return frame


def tidy_throughput():
    rows = []
    for method, keep in (("none", 1.0), ("idle", 0.5), ("evit", 0.5)):
        for batch in (1, 8, 64):
            img_s = batch * 10.0 / keep
            rows.append(dict(kind="throughput", status="ok", model=MODEL, method=method, keep_ratio=keep,
                             options={}, options_key=(), layers=(), regime="off-the-shelf", finetune=(),
                             batch_size=batch, batch_size_used=batch,
                             img_s=img_s, img_s_q25=img_s * 0.9, img_s_q75=img_s * 1.1, dtype="fp32",
                             device="cpu", device_name="test-cpu"))
    return pd.DataFrame(rows)


def data_lines(ax):
    """Lines that carry data: not seaborn's legend proxies (no points), not error-bar caps (_nolegend_)."""
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 0 and line.get_label() != "_nolegend_"]


def legend_colours(ax):
    """Variant -> colour, from the legend's proxy lines."""
    return {h.get_label(): to_rgb(h.get_color()) for h in ax.get_legend().legend_handles if hasattr(h, "get_color")}


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_backend_is_agg():
    assert matplotlib.get_backend().lower() == "agg"


def test_tradeoff_one_line_per_variant_and_baseline_star():
    summary = summary_frame()
    fig = plots.tradeoff(summary, "gmacs", "GMACs per image", MODEL)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "GMACs per image" and ax.get_ylabel() == "Top-1 accuracy (%)"
    assert legend_texts(ax) == ["idle", "evit", "evit (fuse=False)", "baseline (none)"]
    lines = data_lines(ax)
    assert len(lines) == 3 and all(len(line.get_xdata()) == 2 for line in lines)
    star = [c for c in ax.collections if c.get_label() == "baseline (none)"]
    assert len(star) == 1 and tuple(star[0].get_offsets()[0]) == (1.0, 90.0)
    # a method keeps its colour and marker across variants and figures
    colours = legend_colours(ax)
    assert colours["evit"] == colours["evit (fuse=False)"] == to_rgb(method_style("evit")["color"])
    assert colours["idle"] == to_rgb(method_style("idle")["color"]) != colours["evit"]
    assert sorted(to_rgb(line.get_color()) for line in lines) == sorted(
        colours[v] for v in ("idle", "evit (fuse=False)", "evit"))
    fig2 = plots.tradeoff(summary, "img_s", "images / s", MODEL)
    assert legend_colours(fig2.axes[0]) == colours


def test_throughput_vs_batch():
    fig = plots.throughput_vs_batch(tidy_throughput(), MODEL)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "batch size" and ax.get_ylabel() == "images / s" and ax.get_xscale() == "log"
    assert legend_texts(ax) == ["idle", "evit", "baseline (none)"]
    assert sorted(len(line.get_xdata()) for line in data_lines(ax)) == [3, 3, 3]


def test_tokens_per_layer_shows_idle_tokens(monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("the idle band comes from the FLOPs record's blocks, not from a rebuilt model")

    monkeypatch.setattr(methods, "apply", no_models)
    monkeypatch.setattr("bench.models.create_model", no_models)
    fig = plots.tokens_per_layer(summary_frame(), MODEL)
    assert len(fig.axes) == 2  # one panel per keep ratio
    ax = fig.axes[0]
    assert ax.get_xlabel() == "block" and "tokens" in ax.get_ylabel()
    texts = legend_texts(fig.axes[-1])  # one legend for both panels, right of the last
    assert [t for t in texts if not t.endswith(": idle")] == ["idle", "evit", "evit (fuse=False)", "baseline (none)"]
    assert "idle: idle" in texts  # IdleViT carries the rest idle: shaded between active and all tokens
    assert not any(t.startswith("evit") and t.endswith("idle") for t in texts)
    (band,) = [c for c in fig.axes[1].collections if c.get_label() == "idle: idle"]  # the keep-0.5 panel
    ys = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
    assert (ys.min(), ys.max()) == (25, 50)  # from the 25 tokens attended to all 50 carried


def test_tokens_per_layer_without_a_schedule_has_no_idle_band():
    """A run without FLOPs records has no `blocks`: the token counts are drawn, the idle band is not guessed."""
    fig = plots.tokens_per_layer(summary_frame().drop(columns="blocks"), MODEL)
    texts = legend_texts(fig.axes[-1])
    assert texts == ["idle", "evit", "evit (fuse=False)", "baseline (none)"]


def test_idle_band_from_flops_records(tmp_path):
    """The `blocks` a FLOPs job records reach the figure through load_runs and summarize."""
    from bench import report
    from bench.records import write_record
    from bench.spec import JobSpec

    for method, keep in (("none", 1.0), ("idle", 0.5), ("evit", 0.5)):
        blocks = schedule(keep, method == "idle")
        write_record(tmp_path, JobSpec("flops", MODEL, method, keep),
                     dict(gmacs=keep, gmacs_no_overhead=keep, tokens_per_block=[b["n_attn"] for b in blocks],
                          blocks=blocks), {}, 0.0)
    summary = report.summarize(report.load_runs(tmp_path))
    texts = legend_texts(plots.tokens_per_layer(summary, MODEL).axes[-1])
    assert texts == ["idle", "idle: idle", "evit", "baseline (none)"]


def test_ablation_and_write_figures(tmp_path):
    summary = summary_frame()
    assert plots.varied_options(summary) == ["fuse"]
    fig = plots.ablation(summary, "fuse")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "fuse" and ax.get_ylabel() == "Top-1 accuracy (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["False", "True (default)"]  # EViT fuses by default
    assert sorted(legend_texts(ax)) == ["evit, keep 0.5", "evit, keep 0.7"]  # idle has no fuse option
    paths = plots.write_figures(tidy_throughput(), summary, tmp_path)
    names = {p.name for p in paths.values()}
    assert {f"top1_vs_gmacs_{MODEL}.png", f"top1_vs_throughput_{MODEL}.png", f"throughput_vs_batch_{MODEL}.png",
            f"tokens_per_layer_{MODEL}.png", "ablation_fuse_top1.png", "ablation_fuse_gmacs.png"} == names
    for png in paths.values():
        assert png.stat().st_size > 1000 and png.with_suffix(".pdf").is_file()


def test_patch_overlay_colours():
    state = np.array([methods.KEPT, methods.IDLE, methods.DROPPED, methods.FUSED], np.int8)
    rgba = viz.patch_overlay((2, 2), state, None).reshape(4, 4)
    assert rgba[0, 3] == 0  # kept: clear
    assert [tuple(r) for r in rgba[1:]] == [viz.STATE_COLOURS[s] for s in state[1:]]
    groups = np.array([0, 0, 1, 2])  # patches 0 and 1 merged into one token
    rgba = viz.patch_overlay((2, 2), None, groups).reshape(4, 4)
    assert rgba[0, 3] > 0 and tuple(rgba[0]) == tuple(rgba[1]) and rgba[2, 3] == rgba[3, 3] == 0


def test_token_pictures_of_every_registered_method():
    """Each method on the tiny embedded model (random weights): per-patch states of the right shape,
    one picture row per method that records them; methods without them are reported, not fatal."""
    torch.manual_seed(0)
    images = torch.randn(2, 1, 28, 28)
    traces, skipped = [], {}
    for name in methods.available("vit"):  # the embedded model is a ViT; Swin pictures: tests/test_swin_identity.py
        model = methods.apply(create_model(MODEL), name, keep_ratio=0.5)
        trace = viz.trace_tokens(model, images, name)
        if not trace.blocks:
            skipped[name] = "no patch_state"
            continue
        for block, state in trace.states.items():
            assert state.shape == (2, 49), (name, block)
            assert set(np.unique(state)) <= {methods.KEPT, methods.IDLE, methods.DROPPED, methods.FUSED}
        traces.append(trace)
    assert set(skipped) == {"none"}  # nothing to show for the baseline; every method records its tokens
    traces = traces[:2]  # the layout check needs two rows, not every method (a figure of ~80 axes is slow)
    fig = viz.selection_figure(images[0, 0].numpy(), (7, 7), traces, 0, "test")
    blocks = sorted({b for t in traces for b in t.blocks})
    assert len(fig.axes) == len(traces) * (len(blocks) + 1)
    assert [ax.get_ylabel() for ax in fig.axes[:: len(blocks) + 1]] == [t.label for t in traces]


def test_write_pictures_reports_unavailable_weights(tmp_path):
    summary = summary_frame().assign(checkpoint=str(tmp_path / "missing.safetensors"))
    paths, skipped = viz.write_pictures(summary, tmp_path)
    assert paths == {} and "model or data unavailable" in skipped[f"{MODEL} (missing.safetensors)"]


def test_figure_names_keep_their_dots_and_lose_what_a_link_cannot_hold(tmp_path):
    import matplotlib.pyplot as plt

    from bench.report.figure import file_stem, save_figure

    # two images of one dotted timm model name must not collapse into one file
    written = [save_figure(plt.figure(), tmp_path / f"tokens_vit_base_patch16_224.augreg_in21k_img{i}") for i in (0, 1)]
    assert [p.name for p in written] == ["tokens_vit_base_patch16_224.augreg_in21k_img0.png",
                                         "tokens_vit_base_patch16_224.augreg_in21k_img1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in written] + [p.with_suffix(".pdf").name for p in written])
    assert file_stem("reliability_m_finetuned 2 ep, lr=0.01, freeze=none") == \
        "reliability_m_finetuned_2_ep_lr_0.01_freeze_none"
    assert file_stem("reliability_timm/vit_off-the-shelf") == "reliability_timm_vit_off-the-shelf"
