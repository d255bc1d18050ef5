"""Zero-TPrune against a per-sample reference written here from docs/methods.md#zero-tprune (explicit softmax
attention, the weighted PageRank as repeated per-head mat-vecs, python sorting for the importance partition
and the redundancy ranking; not from methods/zerotprune.py), and its counts and GMACs."""
import math

import pytest
import torch

import methods
from methods import DROPPED, KEPT, MethodError
from random_vits import (  # noqa: F401 (models is a fixture)
    DTYPES, REFERENCE_TOL, in_dtype, max_batch_delta, models, patched_copy, random_images, timm_geometry, timm_model,
)


# ---------------------------------------------------------------------------------------------
# Reference, one sample at a time. Every token carries the original patch it came from.

def _attention(block, tokens):
    """-> (attention output (N, C), head-mean keys (N, d), probabilities (H, N, N))."""
    attn = block.attn
    N, H, d = tokens.shape[0], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(block.norm1(tokens)).reshape(N, 3, H, d).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = (torch.einsum("ihd,jhd->hij", q, k) * d ** -0.5).softmax(-1)
    mixed = torch.einsum("hij,jhd->ihd", probs, v).reshape(N, H * d)
    return attn.proj(attn.norm(mixed)), k.mean(1), probs


def weighted_page_rank(probs, iterations):
    """Per head s <- P^T s from s = 1/N (importance flows from a query to the keys it attends to),
    then the mean over heads."""
    heads, N, _ = probs.shape
    per_head = []
    for h in range(heads):
        s = torch.full((N,), 1.0 / N, dtype=probs.dtype)
        for _ in range(iterations):
            s = probs[h].T @ s
        per_head.append(s)
    return torch.stack(per_head).mean(0)


def _reference_sample(model, image, r_per_block, iterations=30):
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
    origin = [-1] * prefix + list(range(len(x) - prefix))
    held = {}
    for i, block in enumerate(model.blocks):
        out, keys, probs = _attention(block, x)
        x = x + block.ls1(out)
        n = len(x) - prefix
        r = min(r_per_block.get(i, 0), n // 2)
        if r > 0:
            importance = weighted_page_rank(probs, iterations)[prefix:].tolist()
            ranked = sorted(range(n), key=lambda j: -importance[j])
            targets, sources = ranked[:math.ceil(n / 2)], ranked[math.ceil(n / 2):]
            unit = keys[prefix:] / keys[prefix:].norm(dim=-1, keepdim=True)
            redundancy = {a: max(float(unit[a] @ unit[b]) for b in targets) for a in sources}
            pruned = set(sorted(sources, key=lambda a: -redundancy[a])[:r])
            rows = list(range(prefix)) + [prefix + j for j in range(n) if j not in pruned]
            x, origin = x[rows], [origin[t] for t in rows]
            held[i] = sorted(o for o in origin if o >= 0)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x[None]))[0], held


def _reference(model, images, r_per_block, iterations=30):
    outs = [_reference_sample(model, im, r_per_block, iterations) for im in images]
    return torch.stack([o[0] for o in outs]), [o[1] for o in outs]


def _every_block(r):
    return {i: r for i in range(12)}


# ---------------------------------------------------------------------------------------------
# Equivalence with the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers", "gap"])
@pytest.mark.parametrize("r", [1, 3, 5])  # 5 runs into the clamp to half the image tokens
def test_logits_match_reference(models, model_name, r, dtype):
    stock = in_dtype(models[model_name], dtype)
    images = random_images(2, seed=r, dtype=dtype)
    with torch.no_grad():
        got = patched_copy(stock, "zerotprune", r=r)(images)
        want, _ = _reference(stock, images, _every_block(r))
    assert (got - want).abs().max().item() <= REFERENCE_TOL[dtype]


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("iterations", [1, 5])
def test_attention_paths_and_iterations(models, fused_attn, iterations):
    images = random_images(2, seed=7)
    patched = patched_copy(models["distilled"], "zerotprune", fused_attn=fused_attn, r=2, iterations=iterations)
    with torch.no_grad():
        want, _ = _reference(models["distilled"], images, _every_block(2), iterations)
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


def test_layerscale_model_with_per_layer_r_matches_reference():
    deit3 = timm_model("deit3_small_patch16_224", 4)
    images = random_images(2, seed=8)
    r = (0, 4, 0, 3, 6, 2)
    patched = patched_copy(deit3, "zerotprune", layers=range(2, 10), r=",".join(map(str, r)))
    with torch.no_grad():
        want, _ = _reference(deit3, images, dict(zip(range(2, 8), r)))
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


def test_page_rank_is_a_probability_distribution(models):
    method = methods.build(models["cls"], "zerotprune", 0.5)
    probs = torch.rand(2, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).softmax(-1)
    importance = method.importance(probs)
    assert torch.allclose(importance.sum(-1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(importance[0], weighted_page_rank(probs[0], 30), rtol=1e-14)


@pytest.mark.parametrize("model_name", ["distilled", "registers", "gap"])
def test_aux_outputs_match_reference_selection(models, model_name):
    stock = models[model_name]
    images = random_images(3, seed=9)
    patched = patched_copy(stock, "zerotprune", r=3)
    patched.token_reduction.state.trace = True
    with torch.no_grad():
        patched(images)
        _, held = _reference(stock, images, _every_block(3))
    aux, schedule = patched.token_reduction.aux, patched.token_reduction.schedule()
    assert sorted(aux["patch_state"]) == sorted(aux["kept"]) == list(range(12))
    prefix = stock.num_prefix_tokens
    for layer, state in aux["patch_state"].items():
        assert aux["kept"][layer].shape == (3, schedule.blocks[layer].n_out)
        assert aux["kept"][layer][:, :prefix].tolist() == [list(range(prefix))] * 3
        for b in range(3):
            assert torch.nonzero(state[b] == KEPT).flatten().tolist() == held[b][layer]
            assert set(state[b].tolist()) <= {KEPT, DROPPED}
            group = aux["patch_group"][layer][b].tolist()
            assert [p for p in range(36) if group[p] >= 0] == held[b][layer]  # kept in input order
            assert [group[p] for p in held[b][layer]] == list(range(prefix, schedule.blocks[layer].n_out))


# ---------------------------------------------------------------------------------------------
# Identity, batch independence, training

@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers", "gap"])
def test_r_zero_and_keep_ratio_one_are_the_stock_model(models, model_name):
    images = random_images(2)
    stock = models[model_name]
    with torch.no_grad():
        assert torch.equal(patched_copy(stock, "zerotprune", r=0)(images), stock(images))
        assert torch.equal(patched_copy(stock, "zerotprune", 1.0, iterations=3)(images), stock(images))


def test_batch_independence(models):
    images = random_images(4, seed=10)
    assert max_batch_delta(patched_copy(models["cls"], "zerotprune", r=3), images) < 1e-12


def test_training_prunes_and_backpropagates(models):
    patched = patched_copy(models["cls"], "zerotprune", r=3)
    patched.train()
    patched(random_images(2, seed=11)).sum().backward()
    assert patched.token_reduction.aux["kept"][0].shape == (2, 37 - 3)
    assert patched.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Counts and cost on the real DeiT geometry

def test_counts_are_tomes():
    g = timm_geometry("deit_small_patch16_224")
    for keep in (0.9, 0.7, 0.5):
        ztp, tome = methods.build(g, "zerotprune", keep), methods.build(g, "tome", keep)
        assert ztp.schedule().tokens_out == tome.schedule().tokens_out
        assert ztp.prune_counts == tome.merge_counts


@pytest.mark.parametrize("keep_ratio, gmacs", [(0.9, (4.074, 4.001)), (0.7, (3.033, 2.986)), (0.5, (2.602, 2.562))])
def test_gmacs_on_deit_small(keep_ratio, gmacs):
    method = methods.build(timm_geometry("deit_small_patch16_224"), "zerotprune", keep_ratio)
    assert (round(method.total_macs() / 1e9, 3), round(method.total_macs(include_overhead=False) / 1e9, 3)) == gmacs


@pytest.mark.parametrize("iterations", [1, 30])
def test_overhead_is_the_page_rank_and_the_similarities(iterations):
    g = timm_geometry("deit_small_patch16_224")
    method = methods.build(g, "zerotprune", 0.7, iterations=iterations)
    expected = sum(iterations * g.num_heads * b.n_in ** 2
                   + ((b.n_in - 1) // 2) * math.ceil((b.n_in - 1) / 2) * g.head_dim
                   for b in method.schedule().blocks if b.action == "prune")
    assert method.total_macs() - method.total_macs(include_overhead=False) == expected


def test_bad_options_name_the_value_and_the_valid_ones():
    geometry = timm_geometry("deit_small_patch16_224")
    with pytest.raises(MethodError, match=r"iterations=0 is not valid; valid: >= 1"):
        methods.build(geometry, "zerotprune", iterations=0)
    with pytest.raises(MethodError, match=r"option iterations=1.5 is not a int"):
        methods.build(geometry, "zerotprune", iterations=1.5)
    assert methods.get_method("zero-tprune") is methods.get_method("zerotprune")
