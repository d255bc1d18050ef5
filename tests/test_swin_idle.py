"""IdleViT on Swin (`idle-swin`) against a per-window reference written here from docs/methods.md#idlevit-on-swin
and the Swin paper (tests/swin_models.py), not from methods/idle_swin.py; its analytic MACs against fvcore,
per stage too; its training (mask) path against the packed eval path."""
import copy

import pytest
import torch
import torch.nn.functional as F

import methods
from methods import IDLE, KEPT, flops
from methods.idle import token_cut_loss
from random_vits import REFERENCE_TOL
from swin_models import IMG, SWIN_T, attention, images, pair_bias, swin, windows_of
from test_dynamicvit import reference_predictor

# max |delta logits| against the reference: random_vits' bounds (measured up to 1.3e-15 in fp64 and 7.2e-7 in
# fp32 on these models); the training (mask) path against the eval path: TRAINING_TOL (two computations).
TOLERANCE = REFERENCE_TOL
TRAINING_TOL = 1e-12


@pytest.fixture(scope="module")
def stock():
    return swin(0)


def keep_counts(method_layers, window_area, ratio, per_stage):
    """docs: idle block at position p of stage s = p // per_stage keeps max(1, int(M * r^(s+1))) per window."""
    return {block: max(1, int(window_area * ratio ** (p // per_stage + 1))) for p, block in enumerate(method_layers)}


def reference_idle_block(block, x, keep, score="query", idle_kv=False, predictor=None):
    """One image (H, W, C) through an idle block, window by window: the k best-scored tokens of each window
    run attention (among themselves, or over the whole window with idle_kv) and the MLP; the rest stay."""
    H, W, C = x.shape
    flat = x.reshape(H * W, C)
    out = flat.clone()
    attn = block.attn
    heads = attn.num_heads
    if score == "predictor":
        keep_logprob = reference_predictor(predictor, flat)[:, 0]
    selections = []
    for tokens in windows_of(H, W, block.window_size, block.shift_size):
        M = len(tokens)
        normed = block.norm1(flat[tokens])
        if score == "query":
            qkv = F.linear(normed, attn.qkv.weight, attn.qkv.bias).reshape(M, 3, heads, -1)
            pooled = F.linear(normed.mean(0), attn.qkv.weight, attn.qkv.bias).reshape(3, heads, -1)[0]
            scores = [float((pooled * qkv[j, 1]).sum(-1).mean()) for j in range(M)]
        else:
            scores = [float(keep_logprob[t]) for t in tokens]
        chosen = sorted(sorted(range(M), key=lambda j: -scores[j])[:keep])
        cols = list(range(M)) if idle_kv else chosen
        updated = flat[tokens][chosen] + attention(block, normed, chosen, cols, pair_bias(block, H, W, tokens, chosen, cols))
        updated = updated + block.mlp(block.norm2(updated))
        out[[tokens[c] for c in chosen]] = updated
        selections.append([tokens[c] for c in chosen])
    return out.reshape(H, W, C), selections


def reference_logits(stock, images_, keep, predictors=None, **options):
    logits, selections = [], []
    for image in images_:
        x = stock.patch_embed(image[None])[0]
        picked, flat_index = {}, 0
        for layer in stock.layers:
            x = layer.downsample(x[None])[0]
            for block in layer.blocks:
                if flat_index in keep:
                    predictor = None if predictors is None else predictors[sorted(keep).index(flat_index)]
                    x, picked[flat_index] = reference_idle_block(block, x, keep[flat_index], predictor=predictor,
                                                                 **options)
                else:
                    x = block(x[None])[0]
                flat_index += 1
        logits.append(stock.forward_head(stock.norm(x[None]))[0])
        selections.append(picked)
    return torch.stack(logits), selections


OPTIONS = [dict(), dict(idle_kv=True), dict(score="predictor"), dict(score="predictor", idle_kv=True)]


def fvcore_stages(counted, method) -> list[int]:
    """fvcore's MACs of each stage module, plus those of the method's own modules (registered on the model,
    not in the stage: predictors, fast paths) that run for that stage's blocks."""
    stages = [counted.by_module.get(f"layers.{s}", 0) for s in range(len(method.geometry.stages))]
    blocks_of = {"score_predictor": method.layers, "fast_mlp": list(getattr(method, "in_force", ()))}
    for name in method.trainable_modules():
        for position, block in enumerate(blocks_of[name]):
            stages[method.geometry.stage_of(block)] += counted.by_module.get(f"{name}.{position}", 0)
    return stages


@pytest.mark.parametrize("options", OPTIONS, ids=["query", "query-kv", "predictor", "predictor-kv"])
@pytest.mark.parametrize("ratio", [0.7, 0.5])
@torch.no_grad()
def test_eval_matches_per_window_reference(stock, ratio, options):
    model = methods.apply(copy.deepcopy(stock), "idle-swin", ratio, **options)
    method = model.token_reduction
    assert method.layers == (3, 4, 5)  # stage 3 (index 2) from its second block
    predictors = None
    if options.get("score") == "predictor":  # PyTorch's default init: keep scores that never nearly tie
        torch.manual_seed(1)
        for module in model.score_predictor.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
        predictors = model.score_predictor
    method.state.trace = True
    x = images(2)
    out = model(x)
    keep = keep_counts(method.layers, 16, ratio, 1)
    assert method.keep_per_layer == keep
    expected, selections = reference_logits(stock, x, keep, predictors, **options)
    for b, picked in enumerate(selections):
        for block, windows in picked.items():
            got = method.aux["kept"][block][b].reshape(len(windows), -1)
            assert [sorted(w) for w in got.tolist()] == [sorted(w) for w in windows]
    assert (out - expected).abs().max() <= TOLERANCE[torch.float64]


@torch.no_grad()
def test_fp32_matches_reference(stock):
    stock32 = copy.deepcopy(stock).float()
    model = methods.apply(copy.deepcopy(stock32), "idle-swin", 0.6)
    x = images(2, dtype=torch.float32)
    expected, _ = reference_logits(stock32, x, keep_counts((3, 4, 5), 16, 0.6, 1))
    assert (model(x) - expected).abs().max() <= TOLERANCE[torch.float32]


@torch.no_grad()
def test_idle_tokens_stay_bit_identical(stock):
    model = methods.apply(copy.deepcopy(stock), "idle-swin", 0.5, layers=[3])
    model.token_reduction.state.trace = True
    block = model.layers[2].blocks[1]  # flat block 3: shifted windows
    tokens = torch.randn(2, 8, 8, 64, dtype=torch.float64)  # stage 3 is 64 wide
    out = block(tokens.clone())
    state = model.token_reduction.aux["patch_state"][3]
    assert state.shape == (2, 32 * 32) and state.dtype == torch.int8
    # The stage grid is 8x8: each stage token covers 4x4 patches of the 32x32 stem grid.
    grid_state = state.reshape(2, 8, 4, 8, 4)[:, :, 0, :, 0].reshape(2, 64)
    idle = (grid_state == IDLE).reshape(2, 8, 8)
    assert int((grid_state == KEPT).sum()) == 2 * 4 * 8  # 4 windows x int(16 * 0.5)
    assert torch.equal(out[idle], tokens[idle])
    assert (out[~idle] != tokens[~idle]).any(dim=-1).all()
    windows = model.token_reduction.aux["window"][3]
    assert windows.shape == (32 * 32,) and windows.unique().numel() == 4


# --- analytic MACs against fvcore -------------------------------------------------------------------

@pytest.mark.parametrize("options", OPTIONS, ids=["query", "query-kv", "predictor", "predictor-kv"])
@pytest.mark.parametrize("ratio", [1.0, 0.7, 0.5])
def test_analytic_macs_equal_fvcore_per_stage(stock, ratio, options):
    model = methods.apply(copy.deepcopy(stock), "idle-swin", ratio, preset="stage34", **options)
    method = model.token_reduction
    counted = flops.fvcore_macs(model, (3, IMG, IMG))
    assert flops.analytic_macs(method) == counted.total
    stages = method.stage_macs()
    assert stages == fvcore_stages(counted, method)
    assert sum(stages) + method.geometry.stem_macs + method.geometry.head_macs == counted.total


@pytest.mark.parametrize("options", [dict(), dict(idle_kv=True)], ids=["query", "query-kv"])
@pytest.mark.parametrize("ratio", [0.7, 0.5])
def test_swin_tiny_macs_equal_fvcore(ratio, options):
    model = swin(0, torch.float32, SWIN_T, img_size=224)
    model = methods.apply(model, "idle-swin", ratio, **options)
    counted = flops.fvcore_macs(model, (3, 224, 224))
    assert flops.analytic_macs(model.token_reduction) == counted.total
    assert model.token_reduction.stage_macs() == fvcore_stages(counted, model.token_reduction)


def test_swin_tiny_counts():
    """Swin-T: stage 3 is blocks 4-9 at 14x14 in 4 windows of 49; the default idles blocks 5-9, in
    three keep-ratio stages of ceil(5 / 3) = 2 blocks: k = int(49 r), int(49 r^2), int(49 r^3)."""
    g = methods.model_geometry(swin(0, torch.float32, SWIN_T, img_size=224))
    method = methods.build(g, "idle-swin", 0.7)
    assert method.layers == (5, 6, 7, 8, 9)
    assert method.keep_per_layer == {5: 34, 6: 34, 7: 24, 8: 24, 9: 16}
    assert method.schedule().tokens_attn == (3136,) * 2 + (784,) * 2 + (196, 136, 136, 96, 96, 64) + (49,) * 2
    both = methods.build(g, "idle-swin", 0.7, preset="stage34")
    assert both.layers == (5, 6, 7, 8, 9, 10, 11)
    assert both.schedule().blocks[11].windows == 1 and both.schedule().blocks[5].windows == 4


# --- training path ------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(idle_kv=True)], ids=["query", "query-kv"])
def test_mask_training_path_matches_packed_path(stock, options):
    model = methods.apply(copy.deepcopy(stock), "idle-swin", 0.6, **options)
    model.token_reduction.state.trace = True
    x = images(2)
    with torch.no_grad():
        packed = model(x)
        eval_kept = {b: k.clone() for b, k in model.token_reduction.aux["kept"].items()}
        model.train()
        masked = model(x)
        model.eval()
    aux = model.token_reduction.aux
    for block, kept in eval_kept.items():
        assert torch.equal(kept.sort(1).values, aux["kept"][block].sort(1).values)
        assert aux["idle_mask"][block].shape == (2 * 4, 16) and aux["attn_logits"][block].shape == (2 * 4, 2, 16, 16)
    assert (packed - masked).abs().max() <= TRAINING_TOL


def test_cut_loss_and_predictor_gradients(stock):
    model = methods.apply(copy.deepcopy(stock), "idle-swin", 0.5, score="predictor").train()
    logits = model(images(2))
    method = model.token_reduction
    settings = dict(cut_loss="both", cut_bug_compat=False)
    cut = method.training_losses(settings, None, None)["cut"]
    expected = token_cut_loss(method.aux, 3, num_prefix=0)
    assert torch.equal(cut, expected) and cut > 0
    (logits.square().mean() + cut).backward()
    for predictor in model.score_predictor:  # straight-through: the gate's gradient reaches the predictor
        assert predictor.in_conv[1].weight.grad.abs().sum() > 0
    assert model.layers[2].blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert set(method.trainable_modules()) == {"score_predictor"}


def test_bad_options_and_layers():
    g = methods.model_geometry(swin(0))
    with pytest.raises(methods.MethodError, match="score='cls'"):
        methods.build(g, "idle-swin", 0.5, score="cls")
    with pytest.raises(methods.MethodError, match="layer 7 is outside"):
        methods.build(g, "idle-swin", 0.5, layers=[7])
