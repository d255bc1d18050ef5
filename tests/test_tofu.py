"""ToFu against a per-sample reference written here from docs/methods.md#tofu (explicit softmax attention with
the log-size bias, python loops for the bipartite matching, pruning and MLERP; not from methods/tofu.py),
and its counts and GMACs on the DeiT geometry."""
import pytest
import torch

import methods
from methods import MethodError
from random_vits import (  # noqa: F401 (models is a fixture)
    DTYPES, assert_groups_match_reference, REFERENCE_TOL, in_dtype, max_batch_delta, models, patched_copy,
    random_images, timm_geometry,
)


# ---------------------------------------------------------------------------------------------
# Reference, one sample at a time. Every token carries its size and the original patches it holds.

def _attention(block, tokens, sizes, prop_attn):
    attn = block.attn
    N, H, d = tokens.shape[0], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(block.norm1(tokens)).reshape(N, 3, H, d).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = torch.einsum("ihd,jhd->hij", q, k) * d ** -0.5
    if prop_attn:
        logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()[None, None, :]
    mixed = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v).reshape(N, H * d)
    return attn.proj(attn.norm(mixed)), k.mean(1)


def bipartite_match(keys, r, prefix):
    """ToMe's matching on one sample: (output order, {output token: its sources}) as positions."""
    metric = keys / keys.norm(dim=-1, keepdim=True)
    set_a, set_b = range(0, len(keys), 2), range(1, len(keys), 2)
    best = {a: (-float("inf"), None) if a < prefix else
            max(((float(metric[a] @ metric[b]), b) for b in set_b if b >= prefix), key=lambda t: t[0])
            for a in set_a}
    ranked = sorted(set_a, key=lambda a: -best[a][0])
    sources, unmerged = ranked[:r], ranked[r:]
    if prefix:
        unmerged = sorted(unmerged)
    order = list(range(prefix)) + [a for a in unmerged if a >= prefix] + [b for b in set_b if b >= prefix]
    merged_into = {t: [] for t in order}
    for a in sources:
        merged_into[best[a][1]].append(a)
    return order, merged_into


def _reference_sample(model, image, r, merge_from, prop_attn=True):
    """Logits and, per reducing block, (patches held by each output token, patches dropped so far)."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
    sizes = [1.0] * len(x)
    groups = [[]] * prefix + [[p] for p in range(len(x) - prefix)]
    dropped, trace = set(), {}
    for i, block in enumerate(model.blocks):
        out, keys = _attention(block, x, sizes, prop_attn)
        x = x + block.ls1(out)
        rr = min(r, (len(x) - prefix) // 2)
        if rr > 0:
            order, merged_into = bipartite_match(keys, rr, prefix)
            new_x, new_sizes, new_groups = [], [], []
            for t in order:
                if i < merge_from:  # prune: the sources are gone, t is unchanged
                    new_x.append(x[t])
                    new_sizes.append(sizes[t])
                    new_groups.append(groups[t])
                    dropped.update(p for a in merged_into[t] for p in groups[a])
                    continue
                members = [t] + merged_into[t]
                total = sum(sizes[m] for m in members)
                mean = sum(sizes[m] * x[m] for m in members) / total
                new_x.append(mean / mean.norm() * max(x[m].norm() for m in members))
                new_sizes.append(total)
                new_groups.append(sorted(p for m in members for p in groups[m]))
            x, sizes, groups = torch.stack(new_x), new_sizes, new_groups
            trace[i] = (groups, set(dropped))
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x[None]))[0], trace


def _reference(model, images, r, merge_from, prop_attn=True):
    outs = [_reference_sample(model, im, r, merge_from, prop_attn) for im in images]
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
        got = patched_copy(stock, "tofu", r=r)(images)
        want, _ = _reference(stock, images, r, merge_from=7)
    assert (got - want).abs().max().item() <= REFERENCE_TOL[dtype]


@pytest.mark.parametrize("merge_from", [0, 3, 12])  # MLERP only, a late switch, pruning only
@pytest.mark.parametrize("fused_attn, prop_attn", [(True, True), (False, True), (True, False)])
def test_switch_layer_attention_paths_and_proportional_attention(models, merge_from, fused_attn, prop_attn):
    images = random_images(2, seed=7)
    patched = patched_copy(models["distilled"], "tofu", fused_attn=fused_attn, r=2, merge_from=merge_from,
                           prop_attn=prop_attn)
    with torch.no_grad():
        want, _ = _reference(models["distilled"], images, 2, merge_from, prop_attn)
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


def test_mlerp_keeps_the_largest_norm_and_the_mean_direction(models):
    """One merging block on its own: every output token's norm is the largest norm among its members."""
    patched = patched_copy(models["cls"], "tofu", r=4, merge_from=0)
    x = torch.randn(2, 37, 192, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    metric = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    method = patched.token_reduction
    method.state.trace = True
    out = method.merge(x, metric, 4, 0, training=False)
    group = method.aux["patch_group"][0]  # original patch p (position p + 1) -> output token
    for b in range(2):
        for t in range(1, 33):
            members = [p + 1 for p in range(36) if group[b, p] == t]
            norm = max(x[b, m].norm() for m in members)
            mean = x[b, members].mean(0)
            assert torch.allclose(out[b, t].norm(), norm, rtol=1e-13)
            assert torch.allclose(out[b, t] / norm, mean / mean.norm(), atol=1e-13)


@pytest.mark.parametrize("model_name", ["distilled", "registers"])
def test_aux_outputs_match_reference(models, model_name):
    stock = models[model_name]
    images = random_images(3, seed=9)
    patched = patched_copy(stock, "tofu", r=3, merge_from=5)
    patched.token_reduction.state.trace = True
    with torch.no_grad():
        patched(images)
        _, trace = _reference(stock, images, 3, merge_from=5)
    aux = patched.token_reduction.aux
    assert sorted(aux["patch_group"]) == sorted(trace[0]) == list(range(12))
    assert_groups_match_reference(patched.token_reduction, trace, stock.num_prefix_tokens, with_dropped=True)


# ---------------------------------------------------------------------------------------------
# Identity, batch independence, training

@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers", "gap"])
def test_r_zero_and_keep_ratio_one_are_the_stock_model(models, model_name):
    images = random_images(2)
    stock = models[model_name]
    with torch.no_grad():
        assert torch.equal(patched_copy(stock, "tofu", r=0)(images), stock(images))
        assert torch.equal(patched_copy(stock, "tofu", 1.0, merge_from=0)(images), stock(images))


def test_batch_independence(models):
    images = random_images(4, seed=10)
    assert max_batch_delta(patched_copy(models["cls"], "tofu", r=3, merge_from=4), images) < 1e-12


def test_training_backpropagates_through_both_kinds_of_block(models):
    patched = patched_copy(models["cls"], "tofu", r=3, merge_from=6)
    patched.train()
    patched(random_images(2, seed=11)).sum().backward()
    assert patched.token_reduction.aux["kept"][0].shape == (2, 37 - 3)
    assert patched.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Counts and cost: ToMe's

def test_counts_and_cost_are_tomes():
    g = timm_geometry("deit_small_patch16_224")
    for keep in (0.9, 0.7, 0.5):
        tofu, tome = methods.build(g, "tofu", keep), methods.build(g, "tome", keep)
        assert tofu.schedule() == tome.schedule() and tofu.merge_counts == tome.merge_counts
        assert tofu.total_macs() == tome.total_macs()
    assert round(methods.build(g, "tofu", 0.7).total_macs() / 1e9, 3) == 2.990
    assert methods.build(g, "tofu", 0.7).merge_from == 7
    assert methods.build(g, "tofu", 0.7, merge_from=3).describe()["merge_from"] == 3


def test_bad_options_name_the_value_and_the_valid_ones():
    geometry = timm_geometry("deit_small_patch16_224")
    with pytest.raises(MethodError, match=r"merge_from=13 is outside the blocks; valid: 0..12"):
        methods.build(geometry, "tofu", merge_from=13)
    with pytest.raises(MethodError, match=r"option r=.*valid: an integer >= 0"):
        methods.build(geometry, "tofu", r=-1)
