"""ToMe against a per-sample reference written here from docs/methods.md#tome-algorithm (explicit softmax
attention with the log-size bias, python loops for the bipartite matching; not from
methods/tome.py), and against the GMACs of docs/methods.md#reference-counts."""
import math

import pytest
import torch

import methods
from methods import MethodError
from methods.tome import r_for_keep_ratio
from random_vits import (  # noqa: F401 (models is a fixture)
    DTYPES, assert_groups_match_reference, REFERENCE_TOL, in_dtype, max_batch_delta, models, patched_copy,
    random_images, timm_geometry, timm_model,
)


# ---------------------------------------------------------------------------------------------
# Reference (docs/methods.md#tome-algorithm), one sample at a time. Every token carries its size and the set of
# original patches it holds.

def _attention(block, tokens, sizes, prop_attn):
    """Explicit attention of one sample -> (attention output (N, C), head-mean keys (N, d))."""
    attn = block.attn
    N, H, d = tokens.shape[0], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(block.norm1(tokens)).reshape(N, 3, H, d).unbind(1)  # (N, H, d) each
    logits = torch.einsum("ihd,jhd->hij", q, k) * d ** -0.5
    if prop_attn:
        logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()[None, None, :]
    mixed = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v).reshape(N, H * d)
    return attn.proj(mixed), k.mean(1)


def _bipartite_merge(x, keys, sizes, groups, r, prefix):
    """Merge r tokens of one sample: A = even positions, B = odd; protected prefix tokens."""
    metric = keys / keys.norm(dim=-1, keepdim=True)
    set_a, set_b = range(0, len(x), 2), range(1, len(x), 2)
    best = {}
    for a in set_a:
        if a < prefix:
            best[a] = (-math.inf, None)
            continue
        best[a] = max(((float(metric[a] @ metric[b]), b) for b in set_b if b >= prefix),
                      key=lambda t: t[0])
    ranked = sorted(set_a, key=lambda a: -best[a][0])
    sources, unmerged = ranked[:r], ranked[r:]
    if prefix:
        unmerged = sorted(unmerged)
    order = list(range(prefix)) + [a for a in unmerged if a >= prefix] + [b for b in set_b if b >= prefix]
    members = {t: [t] for t in order}
    for a in sources:
        members[best[a][1]].append(a)
    new_x, new_sizes, new_groups = [], [], []
    for t in order:
        total = sum(sizes[m] for m in members[t])
        new_x.append(sum(sizes[m] * x[m] for m in members[t]) / total)
        new_sizes.append(total)
        new_groups.append(sorted(p for m in members[t] for p in groups[m]))
    return torch.stack(new_x), new_sizes, new_groups


def _reference_sample(model, image, r_per_block, prop_attn):
    """Logits of one image and, per merging block, the original patches of every output token."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
    sizes = [1.0] * len(x)
    groups = [[]] * prefix + [[p] for p in range(len(x) - prefix)]
    trace = {}
    for i, block in enumerate(model.blocks):
        out, keys = _attention(block, x, sizes, prop_attn)
        x = x + block.ls1(out)
        r = min(r_per_block.get(i, 0), (len(x) - prefix) // 2)
        if r > 0:
            x, sizes, groups = _bipartite_merge(x, keys, sizes, groups, r, prefix)
            trace[i] = groups
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x[None]))[0], trace


def _reference(model, images, r_per_block, prop_attn=True):
    outs = [_reference_sample(model, im, r_per_block, prop_attn) for im in images]
    return torch.stack([o[0] for o in outs]), [o[1] for o in outs]


# ---------------------------------------------------------------------------------------------
# Equivalence with the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers", "gap"])
@pytest.mark.parametrize("r", [1, 3, 5])  # 5 runs into the clamp to half the image tokens
def test_logits_match_reference(models, model_name, r, dtype):
    stock = in_dtype(models[model_name], dtype)
    images = random_images(2, seed=r, dtype=dtype)
    with torch.no_grad():
        got = patched_copy(stock, "tome", r=r)(images)
        want, _ = _reference(stock, images, {i: r for i in range(12)})
    assert (got - want).abs().max().item() <= REFERENCE_TOL[dtype]


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_both_attention_paths_with_and_without_proportional_attention(models, fused_attn, prop_attn):
    images = random_images(2, seed=7)
    patched = patched_copy(models["distilled"], "tome", fused_attn=fused_attn, r=2, prop_attn=prop_attn)
    with torch.no_grad():
        want, _ = _reference(models["distilled"], images, {i: 2 for i in range(12)}, prop_attn)
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


def test_layerscale_model_with_per_layer_r_matches_reference():
    deit3 = timm_model("deit3_small_patch16_224", 4)
    images = random_images(2, seed=8)
    r = (0, 4, 0, 3, 6, 2)  # for layers 2..7; shorter than the layer list, so padded with 0
    patched = patched_copy(deit3, "tome", layers=range(2, 10), r=",".join(map(str, r)))
    assert patched.token_reduction.merge_counts == {2: 0, 3: 4, 4: 0, 5: 3, 6: 6, 7: 2, 8: 0, 9: 0}
    with torch.no_grad():
        want, _ = _reference(deit3, images, dict(zip(range(2, 8), r)))
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


@pytest.mark.parametrize("model_name", ["distilled", "registers"])
def test_aux_outputs_match_reference_groups(models, model_name):
    stock = models[model_name]
    images = random_images(3, seed=9)
    patched = patched_copy(stock, "tome", r=4)
    patched.token_reduction.state.trace = True
    with torch.no_grad():
        patched(images)
        _, trace = _reference(stock, images, {i: 4 for i in range(12)})
    aux = patched.token_reduction.aux
    schedule = patched.token_reduction.schedule()
    assert sorted(aux["patch_group"]) == [i for i, b in enumerate(schedule.blocks) if b.action == "merge"]
    assert_groups_match_reference(patched.token_reduction, trace, stock.num_prefix_tokens)


# ---------------------------------------------------------------------------------------------
# Identity and batch independence

@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers", "gap"])
def test_r_zero_is_the_stock_model(models, model_name):
    images = random_images(2)
    stock = models[model_name]
    with torch.no_grad():
        assert torch.equal(patched_copy(stock, "tome", r=0)(images), stock(images))
        assert torch.equal(patched_copy(stock, "tome", 1.0)(images), stock(images))


def test_r_zero_on_deit3_with_layerscale_is_the_stock_model():
    deit3 = timm_model("deit3_small_patch16_224", 5)
    images = random_images(2, seed=1)
    with torch.no_grad():
        assert torch.equal(patched_copy(deit3, "tome", r=0)(images), deit3(images))


def test_batch_independence(models):
    images = random_images(4, seed=10)
    assert max_batch_delta(patched_copy(models["cls"], "tome", r=3), images) < 1e-12


def test_training_merges_and_backpropagates(models):
    patched = patched_copy(models["cls"], "tome", r=3)
    patched.train()
    patched(random_images(2, seed=11)).sum().backward()
    assert patched.token_reduction.aux["kept"][0].shape == (2, 37 - 3)
    assert patched.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Counts and cost (docs/methods.md#tome-counts, docs/methods.md#reference-counts) on the real DeiT geometry

@pytest.mark.parametrize("model_name, gmacs", [
    ("deit_small_patch16_224", {8: 3.421, 12: 2.848, 13: 2.706, 16: 2.294}),
    ("deit_tiny_patch16_224", {8: 0.929, 12: 0.773, 13: 0.735, 16: 0.625}),
])
def test_gmacs_match_cost_model(model_name, gmacs):
    geometry = timm_geometry(model_name)
    got = {r: round(methods.build(geometry, "tome", r=r).total_macs() / 1e9, 3) for r in gmacs}
    assert got == gmacs


def test_deit_base_gmacs_and_r13_token_counts():
    # docs/methods.md#reference-counts prints 13.11 / 10.92 / 10.37 / 8.78: these values rounded to 3 decimals, then to 2
    base = [methods.build(timm_geometry("deit_base_patch16_224"), "tome", r=r).total_macs() / 1e9 for r in (8, 12, 13, 16)]
    assert [round(v, 3) for v in base] == [13.109, 10.915, 10.370, 8.775]
    tokens = methods.build(timm_geometry("deit_small_patch16_224"), "tome", r=13).schedule().tokens_out
    assert tokens == tuple(197 - 13 * (i + 1) for i in range(12))  # 184 ... 41
    assert tokens[-1] == 41


def test_merge_count_clamps_to_half_the_image_tokens():
    tokens = methods.build(timm_geometry("deit_small_patch16_224"), "tome", r=60).schedule().tokens_out
    assert tokens[:5] == (1 + 136, 1 + 76, 1 + 38, 1 + 19, 1 + 10)  # 196-60, 136-60, then halves


def test_keep_ratio_maps_to_a_constant_r():
    # final image tokens int(196 * rho^3): 0.7 -> 67 (r = 11 leaves 64, r = 10 leaves 76);
    # 0.5 -> 24 (r = 14 leaves 28, r = 15 leaves 16); 0.8 -> 100 (r = 8 leaves exactly 100)
    assert [r_for_keep_ratio(196, 12, rho) for rho in (1.0, 0.8, 0.7, 0.5)] == [0, 8, 11, 14]
    method = methods.build(timm_geometry("deit_small_patch16_224"), "tome", 0.7)
    assert set(method.merge_counts.values()) == {11} and method.layers == tuple(range(12))
    assert methods.build(timm_geometry("deit_small_patch16_224"), "tome", 0.7, r=5).merge_counts[0] == 5


def test_bad_r_names_the_value_and_the_valid_ones():
    geometry = timm_geometry("deit_small_patch16_224")
    for bad in ("-1", "x", "2.5", -3, ""):
        with pytest.raises(MethodError, match=r"option r=.*valid: an integer >= 0"):
            methods.build(geometry, "tome", r=bad)
    with pytest.raises(MethodError, match=r"r=1,2,3 gives 3 values for 2 reduction layers"):
        methods.build(geometry, "tome", layers=(0, 1), r=(1, 2, 3))
    assert methods.build(geometry, "tome", r="8").merge_counts[5] == 8
