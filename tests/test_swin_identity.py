"""Every Swin method (and `none`) on timm's Swin: keep ratio 1 is the stock model bit for bit, a sample does not
depend on its batch, no method writes into a tensor it did not allocate, the per-patch aux outputs feed the
token pictures; the Swin geometry of Swin-T, and the Swin variants it refuses, naming the part."""
import copy

import pytest
import timm
import torch

import methods
from methods import Geometry, MethodError, flops
from methods.swin import SwinGeometry
from swin_models import SWIN_T, images, swin

CASES = [("none", {}), ("idle-swin", {}), ("idle-swin", {"idle_kv": True}), ("idle-swin", {"score": "predictor"}),
         ("idle-swin", {"preset": "stage34"}), ("dynamicvit-swin", {})]
IDS = ["none", "idle", "idle-kv", "idle-predictor", "idle-stage34", "dynamicvit"]


@pytest.fixture(scope="module")
def stock():
    return {torch.float64: swin(0), torch.float32: swin(0, torch.float32)}


def test_swin_methods_are_the_swin_family():
    assert set(methods.available("swin")) == {m for m, _ in CASES}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method, options", CASES, ids=IDS)
@torch.no_grad()
def test_keep_ratio_one_is_the_stock_model(stock, method, options, dtype):
    model = methods.apply(copy.deepcopy(stock[dtype]), method, 1.0, **options)
    x = images(2, dtype=dtype)
    assert torch.equal(model(x), stock[dtype](x))
    assert flops.analytic_macs(model.token_reduction) == flops.analytic_macs(methods.build(stock[dtype], "none"))


@pytest.mark.parametrize("method, options", CASES, ids=IDS)
@torch.no_grad()
def test_sample_does_not_depend_on_its_batch(stock, method, options):
    model = methods.apply(copy.deepcopy(stock[torch.float32]), method, 0.5, **options)
    batch = images(4, seed=1, dtype=torch.float32)
    together = model(batch)
    for b in (0, 3):
        assert (model(batch[b:b + 1])[0] - together[b]).abs().max() <= 1e-5


def block_outputs(model, x):
    """Each block's output, cloned before the next block runs (the ground truth)."""
    x = model.patch_embed(x)
    outputs = []
    for layer in model.layers:
        x = layer.downsample(x)
        for block in layer.blocks:
            x = block(x)
            outputs.append(x.clone())
    return outputs


@pytest.mark.parametrize("method, options", CASES, ids=IDS)
@torch.no_grad()
def test_hooked_block_outputs_are_not_written_later(stock, method, options):
    model = methods.apply(copy.deepcopy(stock[torch.float64]), method, 0.5, **options)
    x = images(2, seed=3)
    blocks = model.token_reduction.geometry.blocks_of(model)
    hooked = []
    handles = [b.register_forward_hook(lambda module, args, output: hooked.append(output)) for b in blocks]
    model(x)
    for handle in handles:
        handle.remove()
    expected = block_outputs(model, x)
    assert len(hooked) == len(expected) == 7
    for i, (seen, truth) in enumerate(zip(hooked, expected)):
        assert torch.equal(seen, truth), f"block {i}"
    stages = model.forward_intermediates(x, intermediates_only=True)
    assert torch.equal(stages[2], expected[5].permute(0, 3, 1, 2))


@pytest.mark.parametrize("method, options", CASES[1:], ids=IDS[1:])
@torch.no_grad()
def test_token_pictures(stock, method, options):
    """The per-patch states a picture reads: on the stem's 32x32 grid, at every reduction block."""
    from bench.report import viz

    model = methods.apply(copy.deepcopy(stock[torch.float32]), method, 0.5, **options)
    trace = viz.trace_tokens(model, images(2, dtype=torch.float32), method)
    assert trace.blocks == list(model.token_reduction.layers)
    for block, state in trace.states.items():
        assert state.shape == (2, 32 * 32)
        assert set(state.flatten().tolist()) <= {methods.KEPT, methods.IDLE}
    if method == "idle-swin":  # the window grid of every idle block (stage 3: 4 windows of 4x4 tokens)
        g = model.token_reduction.geometry
        assert sorted(trace.windows) == trace.blocks
        assert all(len(set(w)) == g.stage_for(b).num_windows for b, w in trace.windows.items())
    fig = viz.selection_figure(images(1, dtype=torch.float32)[0].mean(0).numpy(), (32, 32), [trace], 0, method)
    assert len(fig.axes) == len(trace.blocks) + 1


def test_stage_gmacs_figure():
    import pandas as pd

    from bench.report import plots

    summary = pd.DataFrame([
        dict(model="swin", method="none", variant="none", keep_ratio=1.0, stage_gmacs=[0.75, 0.78, 2.18, 0.76]),
        dict(model="swin", method="idle-swin", variant="idle-swin", keep_ratio=0.7, stage_gmacs=[0.75, 0.78, 1.43, 0.76]),
        dict(model="swin", method="dynamicvit-swin", variant="dynamicvit-swin", keep_ratio=0.7,
             stage_gmacs=[0.75, 0.78, 1.9, 0.76]),
    ])
    fig = plots.stage_gmacs(summary, "swin")
    assert len(fig.axes[0].patches) == 3 * 4  # two variants and the baseline outline, 4 stages each


# --- geometry --------------------------------------------------------------------------------------

def test_swin_tiny_geometry():
    with torch.device("meta"):
        g = methods.model_geometry(timm.create_model(SWIN_T, pretrained=False))
    assert isinstance(g, SwinGeometry) and g.family == "swin" and g.depth == 12 and not g.has_cls
    assert [s.grid for s in g.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [s.num_windows for s in g.stages] == [64, 16, 4, 1]
    assert [s.dim for s in g.stages] == [96, 192, 384, 768] and [s.first for s in g.stages] == [0, 2, 4, 10]
    assert g.stages[2].shifts == ((0, 0), (3, 3)) * 3 and g.stages[3].shifts == ((0, 0), (0, 0))
    assert g.num_patches == 3136 and g.grid == (56, 56)
    stock = methods.build(g, "none")
    assert stock.total_macs() == 4_490_566_656  # fvcore's count of timm's Swin-T (tests: the small ones)
    assert stock.schedule().stages == (0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3)


@pytest.mark.parametrize("kwargs", [dict(), dict(window_size=8, img_size=64, patch_size=2, embed_dim=8,
                                                 depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1))])
def test_stock_macs_equal_fvcore_per_stage(kwargs):
    model = swin(0, torch.float32, **kwargs) if kwargs else swin(0, torch.float32)
    method = methods.apply(model, "none").token_reduction
    counted = flops.fvcore_macs(model, (3, *model.patch_embed.img_size))
    assert method.total_macs() == counted.total
    assert method.stage_macs() == [counted.by_module[f"layers.{s}"] for s in range(4)]


def small(**kwargs):
    return timm.create_model(SWIN_T, pretrained=False, **dict(dict(img_size=64, patch_size=4, embed_dim=8,
                                                                  depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1),
                                                                  window_size=4), **kwargs))


REFUSED = {
    "v2": (lambda: timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64, window_size=4,
                                     embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
           "model class SwinTransformerV2"),
    "padded_windows": (lambda: small(img_size=72, window_size=4), "padded"),
    "odd_merging": (lambda: small(img_size=56, patch_size=4, window_size=7), "odd grid"),
    "dynamic_size": (lambda: small(dynamic_img_size=True), "dynamic image size"),
    "no_pooling": (lambda: small(global_pool=""), "head ClassifierHead"),
}


@pytest.mark.parametrize("family", REFUSED)
def test_unmodelled_swin_is_refused_naming_the_part(family):
    make, part = REFUSED[family]
    with pytest.raises(MethodError) as err:
        methods.build(make(), "none")
    message = str(err.value)
    assert "\n" not in message and part in message


def test_vit_methods_refuse_swin():
    with pytest.raises(MethodError, match="valid for it: none, idle-swin, dynamicvit-swin"):
        methods.apply(small(), "tome", 0.5)


def test_flops_job_of_swin_tiny_has_stage_columns(tmp_path):
    from bench import jobs
    from bench.jobs import JobContext
    from bench.spec import JobSpec

    kind = jobs.get("flops")
    spec = kind.normalise(JobSpec(kind="flops", model=SWIN_T, method="idle-swin", keep_ratio=0.7, limit=5))
    assert spec.limit is None  # not adaptive: the count depends on the configuration only
    record = kind.run(spec, JobContext(tmp_path, {}))
    assert record["gmacs"] == record["gmacs_fvcore"] and len(record["stage_gmacs"]) == 4
    assert sum(record["stage_gmacs"]) < record["gmacs"] and record["blocks"][5]["windows"] == 4
