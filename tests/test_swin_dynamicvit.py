"""DynamicViT on Swin (`dynamicvit-swin`, the dyswin scheme) against a per-sample reference written here from
docs/methods.md#dynamicvit-on-swin, its counts and analytic MACs (against fvcore, per stage too), and its
training path."""
import copy

import pytest
import torch
from torch import nn

import methods
from methods import IDLE, KEPT, flops
from random_vits import REFERENCE_TOL
from swin_models import IMG, SWIN_T, attention_residual, images, swin
from test_dynamicvit import reference_predictor
from test_swin_idle import fvcore_stages

# max |delta logits| against the reference: random_vits' bounds (measured up to 1.3e-15 in fp64 and 7.2e-7 in
# fp32 on these models); the training (mask) path against the eval path: TRAINING_TOL (two computations).
TOLERANCE = REFERENCE_TOL
TRAINING_TOL = 1e-12


@pytest.fixture(scope="module")
def stock():
    return swin(0)


def patched(stock, ratio):
    model = methods.apply(copy.deepcopy(stock), "dynamicvit-swin", ratio)
    torch.manual_seed(1)  # PyTorch's default Linear init: keep scores that never nearly tie, a fast path that matters
    for module in [*model.score_predictor.modules(), *model.fast_mlp.modules()]:
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return model


def reference_logits(stock, model, image, locations, counts):
    """One image: at each location the predictor ranks ALL tokens of the stage and the top counts[s] get the
    MLP until the next location; every later block of the stage attends over all tokens, unchanged, and gives
    the other tokens LayerNorm + Linear instead of the MLP."""
    x = stock.patch_embed(image[None])[0]
    flat_index, kept, fast_position, chosen = 0, None, 0, []
    for s, layer in enumerate(stock.layers):
        x = layer.downsample(x[None])[0]
        for block in layer.blocks:
            H, W, C = x.shape
            if flat_index in locations:
                stage = locations.index(flat_index)
                log_probs = reference_predictor(model.score_predictor[stage], x.reshape(H * W, C))
                order = torch.argsort(log_probs[:, 0], descending=True)
                kept = set(order[:counts[stage]].tolist())
                chosen.append(kept)
            if kept is not None and s == 2:
                fast = model.fast_mlp[fast_position]
                fast_position += 1
                y = attention_residual(block, x)
                out = torch.stack([y[t] + (block.mlp(block.norm2(y[t])) if t in kept else fast(y[t]))
                                   for t in range(H * W)])
                x = out.reshape(H, W, C)
            else:
                x = block(x[None])[0]
            flat_index += 1
    return stock.forward_head(stock.norm(x[None]))[0], chosen


@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5])
@torch.no_grad()
def test_eval_matches_per_sample_reference(stock, ratio):
    model = patched(stock, ratio)
    method = model.token_reduction
    method.state.trace = True
    assert method.layers == (3, 4, 5)  # stage 3 (4 blocks here) before its local blocks 1, 2, 3
    counts = [int(64 * r) for r in (ratio, ratio - 0.2, ratio - 0.4)]  # 0.7: 44, 32, 19
    assert [method.keep_counts[i] for i in method.layers] == counts
    x = images(2)
    out = model(x)
    for b in range(2):
        expected, chosen = reference_logits(stock, model, x[b], list(method.layers), counts)
        for block, kept in zip(method.layers, chosen):
            assert set(method.aux["kept"][block][b].tolist()) == kept
            state = method.aux["patch_state"][block][b].reshape(8, 4, 8, 4)[:, 0, :, 0].flatten()
            assert (state == KEPT).sum() == len(kept) and set(state.unique().tolist()) <= {KEPT, IDLE}
        assert (out[b] - expected).abs().max() <= TOLERANCE[torch.float64]


def test_swin_tiny_counts_and_macs():
    """Swin-T: predictors before blocks 5, 6, 7 (stage 3 local 1, 2, 3) keep int(196 rho), int(196 (rho - .2)),
    int(196 (rho - .4)); blocks 5-9 give the other tokens the fast path."""
    model = methods.apply(swin(0, torch.float32, SWIN_T, img_size=224), "dynamicvit-swin", 0.7)
    method = model.token_reduction
    assert method.layers == (5, 6, 7)
    # 0.7 - 0.2 is 0.49999999999999994 in floating point, so int(196 * it) is 97, as in the official code
    # (SPARSE_RATIO = [base_rate, base_rate - 0.2, base_rate - 0.4]; int(N * ratio)).
    assert [method.keep_counts[i] for i in method.layers] == [137, 97, 58]
    blocks = method.schedule().blocks
    assert [b.n_mlp for b in blocks[4:10]] == [196, 137, 97, 58, 58, 58]
    assert all(b.n_attn == 196 and b.windows == 4 for b in blocks[4:10])
    counted = flops.fvcore_macs(model, (3, 224, 224))
    assert flops.analytic_macs(method) == counted.total
    assert method.stage_macs() == fvcore_stages(counted, method)


def test_deeper_stage_locations():
    g = methods.model_geometry(swin(0, torch.float32, "swin_small_patch4_window7_224", img_size=224))
    method = methods.build(g, "dyswin", 0.7)
    assert method.layers == (6, 8, 10)  # stage 3 of Swin-S starts at block 4: local 2, 4, 6
    assert len(method.trainable_modules()["fast_mlp"]) == 22 - 6


@pytest.mark.parametrize("ratio", [1.0, 0.7, 0.5])
def test_analytic_macs_equal_fvcore(stock, ratio):
    model = patched(stock, ratio)
    counted = flops.fvcore_macs(model, (3, IMG, IMG))
    assert flops.analytic_macs(model.token_reduction) == counted.total
    assert model.token_reduction.stage_macs() == fvcore_stages(counted, model.token_reduction)
    plain = flops.analytic_macs(model.token_reduction, include_overhead=False)
    assert plain <= counted.total


def test_overhead_is_the_fast_path_and_the_predictors():
    g = methods.model_geometry(swin(0, torch.float32, SWIN_T, img_size=224))
    method = methods.build(g, "dynamicvit-swin", 0.7)
    D = 384
    predictor = D * D + D * D // 2 + D // 2 * D // 4 + D // 4 * 2
    fast = D * D * ((196 - 137) + (196 - 97) + 3 * (196 - 58))
    assert method.total_macs() - method.total_macs(include_overhead=False) == 3 * 196 * predictor + fast


def test_training_decisions_ratio_loss_and_gradients(stock):
    model = patched(stock, 0.7).train()
    logits = model(images(3))
    method = model.token_reduction
    decisions = method.aux["decision"]
    assert sorted(decisions) == [3, 4, 5] and all(d.shape == (3, 64) for d in decisions.values())
    assert all(set(d.unique().tolist()) <= {0.0, 1.0} for d in decisions.values())
    losses = method.training_losses({}, torch.zeros(3, 4, 4, 128), torch.ones(3, 4, 4, 128))
    expected = sum(((decisions[i].mean(1) - r) ** 2).mean() for i, r in zip((3, 4, 5), (0.7, 0.5, 0.3))) / 3
    assert torch.allclose(losses["ratio"], expected) and losses["tokens"] == 1.0
    (logits.square().mean() + losses["ratio"]).backward()
    for predictor in model.score_predictor:
        assert predictor.in_conv[1].weight.grad.abs().sum() > 0
    assert model.fast_mlp[1][1].weight.grad.abs().sum() > 0


def test_training_with_every_token_kept_is_the_stock_model(stock):
    model = patched(stock, 0.7).train()
    with torch.no_grad():
        for predictor in model.score_predictor:
            predictor.out_conv[4].bias.copy_(torch.tensor([100.0, -100.0], dtype=torch.float64))
        x = images(2)
        assert (model(x) - stock(x)).abs().max() <= TRAINING_TOL
