"""IdleViT against references written here from docs/methods.md#idlevit (not from methods/idle.py), and
against the numbers of docs/methods.md#idlevit-counts-and-layers and docs/methods.md#reference-counts."""
import copy
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import methods
from methods import IDLE, KEPT, Geometry, MethodError
from methods.idle import bug_compat_layers, token_cut_loss
from random_vits import timm_geometry

IMG = 64  # 16 patches of 16 px
# The equivalence bounds the README states: max |delta logits| against a reference written from the
# paper, per dtype.
TOLERANCE = {torch.float32: 5e-7, torch.float64: 5e-15}


def _fresh(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, img_size=IMG, num_classes=10, **kwargs).eval()


@pytest.fixture(scope="module")
def deit_tiny():
    return _fresh("deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def deit_tiny_distilled():
    return _fresh("deit_tiny_distilled_patch16_224", seed=1)


@pytest.fixture(scope="module")
def layerscale_vit():
    """A small ViT with LayerScale and qkv bias, so ls1/ls2 and biases are exercised."""
    torch.manual_seed(2)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=12, num_heads=3,
                             num_classes=7, init_values=0.5, qkv_bias=True).eval()


def _images(model, batch, seed=0):
    torch.manual_seed(seed)
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size)


# ---------------------------------------------------------------------------------------------
# Reference: docs/methods.md#idlevit-algorithm, one sample at a time, with full projections and python loops.

def _keep_counts(num_patches, ratio, layers, per_stage=3):
    """docs/methods.md#idlevit-counts-and-layers: stage s (0-based) of `per_stage` consecutive idle layers keeps int(N0 * r^(s+1))."""
    return {block: int(num_patches * ratio ** (pos // per_stage + 1)) for pos, block in enumerate(layers)}


def _reference_idle_block(block, tokens, keep, num_prefix):
    """tokens (N, D) of one sample -> (N, D) and the selected positions."""
    attn = block.attn
    N = tokens.shape[0]
    H, d = attn.num_heads, attn.head_dim
    normed = block.norm1(tokens)
    q, k, v = attn.qkv(normed).reshape(N, 3, H, d).unbind(1)  # each (N, H, d)
    score = {j: sum(float(q[0, h] @ k[j, h]) for h in range(H)) / H for j in range(num_prefix, N)}
    chosen = sorted(score, key=lambda j: -score[j])[:keep]
    sel = list(range(num_prefix)) + chosen
    qs, ks, vs = q[sel], k[sel], v[sel]
    weights = (torch.einsum("ihd,jhd->hij", qs, ks) * d ** -0.5).softmax(-1)
    mixed = torch.einsum("hij,jhd->ihd", weights, vs).reshape(len(sel), H * d)
    updated = tokens[sel] + block.ls1(attn.proj(mixed))
    updated = updated + block.ls2(block.mlp(block.norm2(updated)))
    out = tokens.clone()
    for row, j in enumerate(sel):
        out[j] = updated[row]
    return out, sel


def _reference_forward(stock, images, keep_per_block):
    num_prefix = stock.num_prefix_tokens
    logits, selections = [], []
    for image in images:
        x = stock.norm_pre(stock.patch_drop(stock._pos_embed(stock.patch_embed(image[None]))))[0]
        picked = {}
        for i, block in enumerate(stock.blocks):
            if i in keep_per_block:
                x, picked[i] = _reference_idle_block(block, x, keep_per_block[i], num_prefix)
            else:
                x = block(x[None])[0]
        logits.append(stock.forward_head(stock.norm(x[None]))[0])
        selections.append(picked)
    return torch.stack(logits), selections


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("model_name", ["deit_tiny", "deit_tiny_distilled", "layerscale_vit"])
@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5])
def test_eval_matches_per_sample_reference(request, model_name, ratio, dtype):
    stock = copy.deepcopy(request.getfixturevalue(model_name)).to(dtype)
    model = methods.apply(copy.deepcopy(stock), "idle", ratio)
    model.token_reduction.state.trace = True
    images = _images(stock, 3).to(dtype)
    keep = _keep_counts(stock.patch_embed.num_patches, ratio, range(3, 12))
    with torch.inference_mode():
        out = model(images)
        expected, selections = _reference_forward(stock, images, keep)
    kept = model.token_reduction.aux["kept"]
    for b, picked in enumerate(selections):
        for block, sel in picked.items():
            assert kept[block][b].tolist() == sel
    assert (out - expected).abs().max() <= TOLERANCE[dtype]


def test_keep_ratio_one_is_the_stock_model(deit_tiny):
    model = methods.apply(copy.deepcopy(deit_tiny), "idle", 1.0)
    images = _images(deit_tiny, 2)
    with torch.inference_mode():
        assert torch.equal(model(images), deit_tiny(images))


def test_cheap_score_selects_the_same_tokens(layerscale_vit):
    plain = methods.apply(copy.deepcopy(layerscale_vit), "idle", 0.6, cheap_score=False)
    cheap = methods.apply(copy.deepcopy(layerscale_vit), "idle", 0.6)  # the default where exact
    plain.token_reduction.state.trace = cheap.token_reduction.state.trace = True
    images = _images(layerscale_vit, 3)
    with torch.inference_mode():
        assert (plain(images) - cheap(images)).abs().max() <= TOLERANCE[torch.float32]  # measured 0
    for block, kept in plain.token_reduction.aux["kept"].items():
        assert torch.equal(kept, cheap.token_reduction.aux["kept"][block])


def test_cheap_score_refuses_key_norm():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, qk_norm=True)
    with pytest.raises(MethodError, match="cheap_score"):
        methods.apply(model, "idle", 0.5, cheap_score=True)


# ---------------------------------------------------------------------------------------------
# Training (mask) path

@pytest.mark.parametrize("model_name", ["deit_tiny", "layerscale_vit"])
def test_mask_training_path_matches_gather_path(request, model_name):
    stock = request.getfixturevalue(model_name)  # no dropout / drop path: the defaults are 0
    model = methods.apply(copy.deepcopy(stock), "idle", 0.6)
    model.token_reduction.state.trace = True
    images = _images(stock, 2)
    with torch.no_grad():
        gathered = model(images)
        eval_kept = dict(model.token_reduction.aux["kept"])
        model.train()
        masked = model(images)
        model.eval()
    aux = model.token_reduction.aux
    assert set(aux["idle_mask"]) == set(aux["attn_logits"]) == set(range(3, 12))
    for block, kept in eval_kept.items():
        assert torch.equal(kept.sort(1).values, aux["kept"][block].sort(1).values)
        mask = aux["idle_mask"][block]
        assert mask.shape == (2, stock.patch_embed.num_patches + 1)
        assert torch.equal(mask.nonzero()[:, 1].reshape(2, -1), kept.sort(1).values)
        assert aux["attn_logits"][block].shape[-2:] == (mask.shape[1], mask.shape[1])
    assert (gathered - masked).abs().max() <= TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------------------------
# Idle tokens

def test_idle_tokens_pass_through_bit_identical(deit_tiny):
    model = methods.apply(copy.deepcopy(deit_tiny), "idle", 0.5)
    model.token_reduction.state.trace = True
    block = model.blocks[3]
    torch.manual_seed(0)
    tokens = torch.randn(2, 17, deit_tiny.embed_dim)
    with torch.inference_mode():
        out = block(tokens.clone())
    state = model.token_reduction.aux["patch_state"][3]
    assert state.dtype == torch.int8 and state.shape == (2, 16)
    idle = torch.cat([torch.zeros(2, 1, dtype=torch.bool), state == IDLE], dim=1)
    assert int((state == KEPT).sum()) == 2 * 8
    assert torch.equal(out[idle], tokens[idle])
    assert (out[~idle] != tokens[~idle]).any(dim=-1).all()


def test_idle_token_is_selected_again_later(layerscale_vit):
    """Block 1 changes nothing (zero output projections), block 2 scores with negated keys: its
    ranking is block 1's reversed, so exactly the tokens idle in block 1 are selected in block 2."""
    stock = copy.deepcopy(layerscale_vit)
    first, second = stock.blocks[1], stock.blocks[2]
    with torch.no_grad():
        for linear in (first.attn.proj, first.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
        dim = stock.embed_dim
        second.norm1.load_state_dict(first.norm1.state_dict())
        second.attn.qkv.weight.copy_(first.attn.qkv.weight)
        second.attn.qkv.bias.copy_(first.attn.qkv.bias)
        second.attn.qkv.weight[dim:2 * dim].neg_()
        second.attn.qkv.bias[dim:2 * dim].neg_()
    model = methods.apply(stock, "idle", 0.5, layers=[1, 2], layers_per_stage=2)
    model.token_reduction.state.trace = True
    with torch.inference_mode():
        model(_images(stock, 3))
    state = model.token_reduction.aux["patch_state"]
    assert int((state[1] == KEPT).sum()) == 3 * 8
    assert torch.equal(state[2] == KEPT, state[1] == IDLE)


def test_batch_independence(deit_tiny):
    model = methods.apply(copy.deepcopy(deit_tiny), "idle", 0.7)
    images = _images(deit_tiny, 4)
    with torch.inference_mode():
        together = model(images)
        alone = torch.cat([model(images[i:i + 1]) for i in range(4)])
    assert (together - alone).abs().max() <= 1e-5


def test_eval_with_autograd_does_not_write_in_place(layerscale_vit):
    model = methods.apply(copy.deepcopy(layerscale_vit), "idle", 0.7)
    images = _images(layerscale_vit, 2).requires_grad_(True)
    model(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Schedule, presets, MACs

DEIT_S = timm_geometry("deit_small_patch16_224")
DEIT_T = timm_geometry("deit_tiny_patch16_224")
DEIT_B = timm_geometry("deit_base_patch16_224")
STAGE_KEEP = {0.9: (176, 158, 142), 0.8: (156, 125, 100), 0.7: (137, 96, 67),
              0.6: (117, 70, 42), 0.5: (98, 49, 24)}  # docs/methods.md#idlevit-counts-and-layers


def test_geometry_of_deit_small():
    D = 384
    assert DEIT_S == Geometry(
        num_patches=196, num_prefix=1, has_cls=True, depth=12, dim=D, num_heads=6, attn_dim=D,
        attn_linear_macs=4 * D * D, mlp_macs=8 * D * D, stem_macs=196 * 768 * D, head_macs=1000 * D)


@pytest.mark.parametrize("ratio", sorted(STAGE_KEEP))
def test_keep_per_stage_matches_published_counts(ratio):
    s1, s2, s3 = STAGE_KEEP[ratio]
    infer = methods.build(DEIT_S, "idle", ratio).schedule()
    main = methods.build(DEIT_S, "idle", ratio, preset="main").schedule()
    assert infer.tokens_attn == (197,) * 3 + (1 + s1,) * 3 + (1 + s2,) * 3 + (1 + s3,) * 3
    assert main.tokens_attn == (197,) * 4 + (1 + s1,) * 3 + (1 + s2,) * 3 + (1 + s3,) * 2
    assert infer.tokens_out == (197,) * 12
    assert [b.action for b in infer.blocks] == [""] * 3 + ["idle"] * 9


def test_explicit_layers_and_stage_length():
    method = methods.build(DEIT_S, "idle", 0.5, layers=[2, 5, 8, 9, 11], layers_per_stage=2)
    assert method.keep_per_layer == {2: 98, 5: 98, 8: 49, 9: 49, 11: 24}
    default = methods.build(DEIT_S, "idle", 0.5, layers=[2, 5, 8, 9, 11])  # ceil(5 / 3) = 2
    assert default.keep_per_layer == method.keep_per_layer


# docs/methods.md#reference-counts table (GMACs, 3 decimals for DeiT-S/T, 2 for DeiT-B): the official
# scoring path (cheap_score=False), and the default, which scores cheaply on these models (no k_norm).
PUBLISHED_GMACS = [
    (DEIT_S, "infer", False, (3.965, 3.442, 3.007, 2.634, 2.333), 3),
    (DEIT_S, "main", False, (4.067, 3.620, 3.243, 2.912, 2.641), 3),
    (DEIT_B, "infer", False, (15.21, 13.24, 11.58, 10.14, 8.98), 2),
    (DEIT_T, "infer", False, (1.073, 0.927, 0.808, 0.707, 0.628), 3),
    (DEIT_S, "infer", None, (3.917, 3.352, 2.881, 2.476, 2.150), 3),
]


@pytest.mark.parametrize("geometry,preset,cheap,gmacs,digits", PUBLISHED_GMACS)
def test_total_macs_match_cost_model_table(geometry, preset, cheap, gmacs, digits):
    measured = [methods.build(geometry, "idle", r, preset=preset, cheap_score=cheap).total_macs() / 1e9
                for r in (0.9, 0.8, 0.7, 0.6, 0.5)]
    assert [round(m, digits) for m in measured] == list(gmacs)


def test_overhead_and_cheap_score_macs():
    D, N = 384, 197
    official = methods.build(DEIT_S, "idle", 0.7, cheap_score=False)
    cheap = methods.build(DEIT_S, "idle", 0.7, cheap_score=True)
    n = [1 + k for k in official.keep_per_layer.values()]
    # Official overhead per idle layer: K of the N - n idle tokens, q0, and the CLS logits.
    assert official.total_macs() - official.total_macs(include_overhead=False) == sum(
        (N - k) * D * D + D * D + N * D for k in n)
    assert cheap.total_macs() - cheap.total_macs(include_overhead=False) == 9 * (2 * D * D + N * D)
    saving = 1 - cheap.total_macs() / official.total_macs()
    assert math.isclose(saving, 0.042, abs_tol=0.0005)  # docs/methods.md#idlevit-cheap-scoring: 4.2 % at r = 0.7


@pytest.mark.parametrize("options", [{}, dict(cheap_score=True)])
def test_keep_ratio_one_costs_the_stock_model(options):
    # At r = 1 every idle layer selects all tokens and the eval forward runs the stock block (no
    # scoring), so the schedule must not charge the scoring overhead.
    idle = methods.build(DEIT_S, "idle", 1.0, **options)
    assert idle.total_macs() == methods.build(DEIT_S, "none").total_macs()
    assert all(b.action == "" for b in idle.schedule().blocks)


# ---------------------------------------------------------------------------------------------
# User errors

def test_model_without_cls_token_is_refused():
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, class_token=False, global_pool="avg")
    with pytest.raises(MethodError, match="CLS"):
        methods.apply(model, "idle", 0.7)


@pytest.mark.parametrize("options", [dict(preset="train"), dict(layers_per_stage=0),
                                     dict(cheap_score="maybe"), dict(score="cls")])
def test_bad_options(options):
    with pytest.raises(MethodError):
        methods.build(DEIT_S, "idlevit", 0.7, **options)


# ---------------------------------------------------------------------------------------------
# Token cut loss (docs/methods.md#idlevit-token-cut-loss), against a per-sample, per-row formula

def _reference_cut_loss(masks, logits, used, num_layers, kind):
    total = 0.0
    for layer in used:
        m, A = masks[layer], logits[layer]
        B, N = m.shape
        inter_sq = intra_sq = 0.0
        for b in range(B):
            W = A[b].mean(0).softmax(-1)
            for i in range(N):
                inter = sum(abs(m[b, i] - m[b, j]) * W[i, j] for j in range(1, N))
                intra = sum(m[b, i] * m[b, j] * W[i, j] for j in range(N))
                inter_sq += float(inter) ** 2
                intra_sq += float(intra - m[b, i]) ** 2
        if kind in ("both", "inter"):
            total += inter_sq / (B * N)
        if kind in ("both", "intra"):
            total += intra_sq / (B * N)
    return total / num_layers


def test_bug_compat_layers_match_the_official_loop():
    assert bug_compat_layers(8) == [0, 2, 4, 6]
    assert bug_compat_layers(12) == [0, 2, 4, 6, 8, 10]
    assert bug_compat_layers(15) == list(range(0, 15, 2))
    assert bug_compat_layers(1) == [0]


@pytest.mark.parametrize("kind", ["both", "inter", "intra", "none"])
@pytest.mark.parametrize("bug_compat", [False, True])
def test_cut_loss_matches_reference(kind, bug_compat):
    torch.manual_seed(0)
    B, H, N, blocks = 2, 3, 6, list(range(4, 12))  # 8 idle layers, as main.py
    masks, logits = {}, {}
    for block in blocks:
        mask = (torch.rand(B, N) < 0.5).float()
        mask[:, 0] = 1.0
        masks[block], logits[block] = mask, 3 * torch.randn(B, H, N, N)
    aux = {"idle_mask": masks, "attn_logits": logits}
    used = [4, 6, 8, 10] if bug_compat else blocks
    expected = _reference_cut_loss(masks, logits, used, len(blocks), kind)
    got = token_cut_loss(aux, len(blocks), kind=kind, bug_compat=bug_compat)
    assert math.isclose(float(got), expected, rel_tol=1e-5, abs_tol=1e-7)


def test_cut_loss_from_a_training_forward(layerscale_vit):
    model = methods.apply(copy.deepcopy(layerscale_vit), "idle", 0.5).train()
    model(_images(layerscale_vit, 2))
    aux = model.token_reduction.aux
    loss = token_cut_loss(aux, 9)
    masks = {b: m.detach() for b, m in aux["idle_mask"].items()}
    logits = {b: a.detach() for b, a in aux["attn_logits"].items()}
    assert math.isclose(float(loss.detach()), _reference_cut_loss(masks, logits, sorted(masks), 9, "both"),
                        rel_tol=1e-5)
    loss.backward()  # the loss reaches the weights through the raw logits
    assert model.blocks[3].attn.qkv.weight.grad.abs().sum() > 0


def test_cut_loss_errors():
    with pytest.raises(MethodError, match="training"):
        token_cut_loss({}, 8)
    with pytest.raises(MethodError, match="valid: both"):
        token_cut_loss({"idle_mask": {0: torch.ones(1, 2)}, "attn_logits": {0: torch.ones(1, 1, 2, 2)}}, 1,
                       kind="cut")
