"""DynamicViT against references written here from docs/methods.md#dynamicvit and the docs/methods.md#reference-counts table."""
import copy
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import methods
from methods import KEPT, MethodError
from methods.dynamicvit import policy_softmax
from random_vits import timm_geometry


# The equivalence bounds the README states: max |delta logits| against the reference, per dtype.
TOLERANCE = {torch.float32: 5e-7, torch.float64: 5e-15}
ROOT = Path(__file__).resolve().parents[1]
DEIT_S = timm_geometry("deit_small_patch16_224")
DEIT_B = timm_geometry("deit_base_patch16_224")


@pytest.fixture(scope="module")
def stock_model():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()


def patched(stock, keep_ratio, **kwargs):
    model = methods.apply(copy.deepcopy(stock), "dynamicvit", keep_ratio, **kwargs)
    # PyTorch's default Linear init (larger than the official 0.02) so that no two keep scores nearly tie.
    torch.manual_seed(1)
    for module in model.score_predictor.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return model


# --- an independent per-sample reference (docs/methods.md#dynamicvit-predictor, docs/methods.md#dynamicvit-algorithm) ----------------------------------

def reference_predictor(predictor, tokens):
    """tokens (n, D), all alive -> (n, 2) log-probs, from the official layer layout."""
    norm, fc1 = predictor.in_conv[0], predictor.in_conv[1]
    fc2, fc3, fc4 = predictor.out_conv[0], predictor.out_conv[2], predictor.out_conv[4]
    h = F.gelu(F.linear(F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps),
                        fc1.weight, fc1.bias))
    half = h.shape[1] // 2
    z = torch.cat([h[:, :half], h[:, half:].mean(0, keepdim=True).expand(len(h), -1)], dim=1)
    z = F.gelu(F.linear(z, fc2.weight, fc2.bias))
    z = F.gelu(F.linear(z, fc3.weight, fc3.bias))
    return F.log_softmax(F.linear(z, fc4.weight, fc4.bias), dim=-1)


def reference_logits(stock, predictors, image, layers, keep_counts):
    """One image: before each pruning block keep the prefix plus the keep_counts[s] image tokens with
    the largest keep log-probability (argsort), then run the unmodified block."""
    prefix = stock.num_prefix_tokens
    x = stock.norm_pre(stock._pos_embed(stock.patch_embed(image[None])))
    kept_per_stage = []
    for i, block in enumerate(stock.blocks):
        if i in layers:
            stage = layers.index(i)
            tokens = x[0, prefix:]
            order = torch.argsort(reference_predictor(predictors[stage], tokens)[:, 0], descending=True)
            order = order[:keep_counts[stage]]
            x = torch.cat([x[:, :prefix], tokens[order][None]], dim=1)
            kept_per_stage.append(x.shape[1] - prefix)
        x = block(x)
    return stock.forward_head(stock.norm(x))[0], kept_per_stage


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5])
@torch.no_grad()
def test_eval_matches_per_sample_reference(stock_model, ratio, dtype):
    stock_model = copy.deepcopy(stock_model).to(dtype)
    model = patched(stock_model, ratio).eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    logits = model(images)
    n0 = stock_model.patch_embed.num_patches  # 16 at 64 px
    expected_counts = [int(n0 * ratio), int(n0 * ratio ** 2), int(n0 * ratio ** 3)]  # 0.7: 11, 7, 5
    for b in range(len(images)):
        ref, counts = reference_logits(stock_model, model.score_predictor, images[b], [3, 6, 9], expected_counts)
        assert counts == expected_counts
        assert (logits[b] - ref).abs().max() <= TOLERANCE[dtype]


@torch.no_grad()
def test_trace_records_kept_patches(stock_model):
    model = patched(stock_model, 0.5).eval()
    model.token_reduction.state.trace = True
    model(torch.randn(2, 3, 64, 64))
    aux = model.token_reduction.aux
    assert sorted(aux["patch_state"]) == [3, 6, 9]
    kept_sets = []
    for layer, count in zip([3, 6, 9], [8, 4, 2]):  # int(16 * 0.5^s)
        state = aux["patch_state"][layer]
        assert state.shape == (2, 16)
        assert (state == KEPT).sum(1).tolist() == [count, count]
        assert aux["kept"][layer].shape == (2, 1 + count)
        kept_sets.append(state == KEPT)
    # Dropped is dropped for good: every later kept set lies inside the earlier one.
    assert not (kept_sets[1] & ~kept_sets[0]).any() and not (kept_sets[2] & ~kept_sets[1]).any()


@pytest.mark.parametrize("ratio, counts", [
    (0.9, (176, 158, 142)), (0.8, (156, 125, 100)), (0.7, (137, 96, 67)), (0.6, (117, 70, 42)), (0.5, (98, 49, 24)),
])
def test_tokens_per_stage_for_196_patches(ratio, counts):
    method = methods.build(DEIT_S, "dynamicvit", ratio)
    tokens = method.schedule().tokens_attn
    assert tokens == (197,) * 3 + (counts[0] + 1,) * 3 + (counts[1] + 1,) * 3 + (counts[2] + 1,) * 3


def test_counts_follow_the_patch_grid_not_196():
    method = methods.build(timm_geometry("deit_small_patch16_224", img_size=384), "dyvit", 0.7)  # 24 x 24 patches
    assert [method.schedule().tokens_attn[i] - 1 for i in (3, 6, 9)] == [403, 282, 197]


def test_default_layers_scale_with_depth():
    assert methods.get_method("dynamicvit").default_layers(12) == (3, 6, 9)
    assert methods.get_method("dynamicvit").default_layers(16) == (4, 8, 12)  # official LV-ViT-S


@pytest.mark.parametrize("geometry, table", [
    (DEIT_S, {0.9: 4.041, 0.8: 3.463, 0.7: 2.981, 0.6: 2.565, 0.5: 2.229}),
    (DEIT_B, {0.9: 15.51, 0.8: 13.32, 0.7: 11.48, 0.6: 9.87, 0.5: 8.56}),
])
def test_gmacs_match_the_cost_table(geometry, table):
    for ratio, gmacs in table.items():
        method = methods.build(geometry, "dynamicvit", ratio)
        assert method.total_macs() / 1e9 == pytest.approx(gmacs, abs=0.006)


def test_predictor_cost_is_the_only_overhead():
    method = methods.build(DEIT_S, "dynamicvit", 0.7)
    D = 384
    per_token = D * D + D * D // 2 + D // 2 * D // 4 + D // 4 * 2
    extra = method.total_macs(include_overhead=True) - method.total_macs(include_overhead=False)
    assert extra == per_token * (196 + 137 + 96)  # predictors see the tokens entering blocks 3, 6, 9


def test_predictors_carry_official_checkpoint_names(stock_model):
    model = methods.apply(copy.deepcopy(stock_model), "dynamicvit", 0.7)
    D = stock_model.embed_dim
    expected = {}
    for s in range(3):
        expected.update({
            f"score_predictor.{s}.in_conv.0.weight": (D,), f"score_predictor.{s}.in_conv.0.bias": (D,),
            f"score_predictor.{s}.in_conv.1.weight": (D, D), f"score_predictor.{s}.in_conv.1.bias": (D,),
            f"score_predictor.{s}.out_conv.0.weight": (D // 2, D), f"score_predictor.{s}.out_conv.0.bias": (D // 2,),
            f"score_predictor.{s}.out_conv.2.weight": (D // 4, D // 2),
            f"score_predictor.{s}.out_conv.2.bias": (D // 4,),
            f"score_predictor.{s}.out_conv.4.weight": (2, D // 4), f"score_predictor.{s}.out_conv.4.bias": (2,),
        })
    state = model.state_dict()
    got = {k: tuple(v.shape) for k, v in state.items() if k.startswith("score_predictor.")}
    assert got == expected
    assert not any("dynamicvit" in k for k in state)  # the blocks do not re-register the predictors
    assert set(model.token_reduction.trainable_modules()) == {"score_predictor"}


def test_predictor_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = methods.build(DEIT_S, "dynamicvit", 0.7)
    assert torch.equal(torch.rand(3), expected_draw)
    b = methods.build(DEIT_S, "dynamicvit", 0.7)
    for pa, pb in zip(a.trainable_modules()["score_predictor"].parameters(),
                      b.trainable_modules()["score_predictor"].parameters()):
        assert torch.equal(pa, pb)


# --- training path ---------------------------------------------------------------------------

def reference_policy_softmax(logits, policy, eps=1e-6):
    """docs/methods.md#dynamicvit-training-path literally: exp(A - max) * G with G_ij = P_j + (1 - P_j) delta_ij, then (. + eps/N)/(sum + eps)."""
    N = logits.shape[-1]
    P = policy[:, :, 0].double()
    G = P[:, None, None, :] + (1 - P[:, None, None, :]) * torch.eye(N, dtype=torch.float64)
    e = torch.exp(logits.double() - logits.double().max(-1, keepdim=True).values) * G
    return (e + eps / N) / (e.sum(-1, keepdim=True) + eps)


def test_policy_softmax_matches_formula():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 6, generator=generator) * 4
    policy = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1]], dtype=torch.float32)[..., None]
    out = policy_softmax(logits, policy)
    torch.testing.assert_close(out.double(), reference_policy_softmax(logits, policy), atol=1e-6, rtol=1e-5)
    # A dropped key is invisible to every other query but for the eps/N floor.
    assert out[0, :, [0, 1, 3, 4, 5], 2].max() < 1e-4
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 6))


POLICY_EPS_TOL = 2e-6  # the training path against the stock blocks: off by the policy softmax's eps


def force_decisions(model, keep: bool):
    """Make every Gumbel decision keep (or drop): a 200-nat gap no Gumbel noise can close."""
    with torch.no_grad():
        for predictor in model.score_predictor:
            predictor.out_conv[4].bias.copy_(torch.tensor([100.0, -100.0] if keep else [-100.0, 100.0]))


def test_training_decisions_are_hard_monotone_and_train_the_predictors(stock_model):
    model = patched(stock_model, 0.7).train()
    logits = model(torch.randn(4, 3, 64, 64))
    assert logits.shape == (4, 10)
    decisions = model.token_reduction.aux["decision"]
    assert sorted(decisions) == [3, 6, 9]
    for d in decisions.values():
        assert d.shape == (4, 16)
        assert set(d.unique().tolist()) <= {0.0, 1.0}
    assert (decisions[6] <= decisions[3]).all() and (decisions[9] <= decisions[6]).all()
    (logits.square().mean() + sum(d.mean() for d in decisions.values())).backward()
    for predictor in model.score_predictor:
        assert predictor.in_conv[1].weight.grad.abs().sum() > 0


def test_training_with_every_token_kept_is_the_stock_model(stock_model):
    model = patched(stock_model, 0.7).train()
    force_decisions(model, keep=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # Not bit for bit by design: the policy softmax's eps terms shift every weight by ~eps / N
        # (measured 5.4e-7 in fp32, 2.8e-8 in fp64).
        assert (model(images) - stock_model(images)).abs().max() <= POLICY_EPS_TOL


def test_training_with_every_patch_dropped_leaves_cls_alone(stock_model):
    """If stage 1 drops all patches, CLS attends only to itself from block 3 on: the same as the
    stock blocks 3.. run on the CLS token alone."""
    model = patched(stock_model, 0.7).train()
    force_decisions(model, keep=False)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = model(images)
        x = stock_model.norm_pre(stock_model._pos_embed(stock_model.patch_embed(images)))
        for i, block in enumerate(stock_model.blocks):
            x = block(x[:, :1] if i == 3 else x)
        expected = stock_model.forward_head(stock_model.norm(x))
    # The dropped keys keep the eps / N floor of the policy softmax (measured 8.0e-7 in fp32, 5.7e-7 in fp64).
    assert (got - expected).abs().max() <= POLICY_EPS_TOL
    assert all(d.sum() == 0 for d in model.token_reduction.aux["decision"].values())


def test_diagnosis_of_untrained_predictors(stock_model):
    """scripts/dynamicvit_diagnose.py: untrained predictors say p(keep) ~ 0.5, so the training path keeps
    r, r^2, r^3 of the patches; the random-ranking pass leaves the predictors as they were."""
    spec = importlib.util.spec_from_file_location("diagnose", ROOT / "scripts" / "dynamicvit_diagnose.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = methods.apply(copy.deepcopy(stock_model), "dynamicvit", 0.5)
    torch.manual_seed(2)
    images, labels = torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
    probe = torch.randn(2, 16, model.embed_dim)
    before = model.score_predictor[0](probe, torch.ones(2, 16, 1))
    found = script.diagnose(model, images, labels, seed=0)
    assert found["targets"] == [0.5, 0.25, 0.125]
    assert found["train_kept"] == pytest.approx(found["targets"], abs=0.06)
    assert all(0.45 < q < 0.55 for stage in found["keep_prob_quantiles"] for q in stage)
    assert found["eval_top1"] == 100.0 * (model(images).argmax(-1) == labels).float().mean().item()
    assert not model.training
    torch.testing.assert_close(model.score_predictor[0](probe, torch.ones(2, 16, 1)), before, rtol=0, atol=0)


def test_gap_model_is_refused():
    model = timm.create_model("vit_base_patch16_reg4_gap_256", pretrained=False, img_size=64,
                              embed_dim=64, num_heads=2, depth=4)
    with pytest.raises(MethodError, match="CLS"):
        methods.apply(model, "dynamicvit", 0.7)
