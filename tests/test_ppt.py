"""PPT against a per-sample reference written here from docs/methods.md#ppt (explicit softmax attention with
the log-size bias, the CLS-times-value-norm scores, the variance test, python sorting for pruning and ToMe's
matching from tests/test_tome.py for pooling; not from methods/ppt.py), and its counts and GMACs."""
import math

import pytest
import torch

import methods
from methods import MethodError
from random_vits import (  # noqa: F401 (models is a fixture)
    DTYPES, assert_groups_match_reference, REFERENCE_TOL, in_dtype, max_batch_delta, models, patched_copy,
    random_images, timm_geometry,
)
from test_tome import _bipartite_merge


# ---------------------------------------------------------------------------------------------
# Reference, one sample at a time. Every token carries its size and the original patches it holds.

def _attention(block, tokens, sizes, prop_attn):
    """-> (attention output (N, C), head-mean keys (N, d), scaled values (N, H d), CLS probabilities (H, N))."""
    attn = block.attn
    N, H, d = tokens.shape[0], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(block.norm1(tokens)).reshape(N, 3, H, d).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = torch.einsum("ihd,jhd->hij", q, k) * d ** -0.5
    if prop_attn:
        logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()[None, None, :]
    probs = logits.softmax(-1)
    mixed = torch.einsum("hij,jhd->ihd", probs, v).reshape(N, H * d)
    return attn.proj(attn.norm(mixed)), k.mean(1), v.reshape(N, H * d), probs[:, 0, :]


def _reference_sample(model, image, layers, r, threshold, prop_attn=True):
    """Logits, per reduction layer (patches held by each output token, patches dropped so far), and
    the decision ("pool" or "prune") and score variance of every reduction layer."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
    sizes = [1.0] * len(x)
    groups = [[]] * prefix + [[p] for p in range(len(x) - prefix)]
    dropped, trace, decisions = set(), {}, {}
    for i, block in enumerate(model.blocks):
        out, keys, values, cls_probs = _attention(block, x, sizes, prop_attn)
        x = x + block.ls1(out)
        n = len(x) - prefix
        rr = min(r, n // 2) if i in layers else 0
        if rr > 0:
            raw = [float(cls_probs[:, prefix + j].sum()) * float(values[prefix + j].norm()) for j in range(n)]
            score = [s / sum(raw) for s in raw]
            mean = sum(score) / n
            variance = sum((s - mean) ** 2 for s in score) / (n - 1)
            if variance < threshold:
                x, sizes, groups = _bipartite_merge(x, keys, sizes, groups, rr, prefix)
                decisions[i] = ("pool", variance)
            else:
                best = sorted(range(n), key=lambda j: -score[j])[:n - rr]
                rows = list(range(prefix)) + [prefix + j for j in best]
                dropped.update(p for j in range(n) if j not in best for p in groups[prefix + j])
                x, sizes, groups = x[rows], [sizes[t] for t in rows], [groups[t] for t in rows]
                decisions[i] = ("prune", variance)
            trace[i] = (groups, set(dropped))
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x[None]))[0], trace, decisions


def _reference(model, images, layers, r, threshold, prop_attn=True):
    outs = [_reference_sample(model, im, layers, r, threshold, prop_attn) for im in images]
    return torch.stack([o[0] for o in outs]), [o[1] for o in outs], [o[2] for o in outs]


@torch.no_grad()
def _mixed_threshold(model, images, r):
    """A threshold between the two images' score variances at block 3, so that one pools and one prunes."""
    _, _, decisions = _reference(model, images, (3,), r, 0.0)
    low, high = sorted(d[3][1] for d in decisions)
    return math.sqrt(low * high)


# ---------------------------------------------------------------------------------------------
# Equivalence with the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers"])
@pytest.mark.parametrize("r, threshold", [(4, 0.0), (6, 1.0), (12, "mixed")])  # prune / pool / per image
def test_logits_match_reference(models, model_name, r, threshold, dtype):
    stock = in_dtype(models[model_name], dtype)
    images = random_images(2, seed=r, dtype=dtype)
    if threshold == "mixed":
        threshold = _mixed_threshold(models[model_name], random_images(2, seed=r), r)
    with torch.no_grad():
        got = patched_copy(stock, "ppt", r=r, threshold=threshold)(images)
        want, _, decisions = _reference(stock, images, (3, 6, 9), r, threshold)
    assert (got - want).abs().max().item() <= REFERENCE_TOL[dtype]
    kinds = {kind for d in decisions for kind, _ in d.values()}
    assert kinds == ({"prune"} if threshold == 0 else {"pool"} if threshold == 1 else {"pool", "prune"})


@pytest.mark.parametrize("fused_attn, prop_attn", [(True, True), (False, True), (True, False)])
def test_attention_paths_and_proportional_attention(models, fused_attn, prop_attn):
    images = random_images(2, seed=7)
    threshold = _mixed_threshold(models["distilled"], images, 8)
    patched = patched_copy(models["distilled"], "ppt", fused_attn=fused_attn, r=8, threshold=threshold,
                           prop_attn=prop_attn, layers=(2, 3, 5, 8))
    with torch.no_grad():
        want, _, _ = _reference(models["distilled"], images, (2, 3, 5, 8), 8, threshold, prop_attn)
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


@pytest.mark.parametrize("model_name", ["distilled", "registers"])
def test_aux_outputs_match_reference(models, model_name):
    stock = models[model_name]
    images = random_images(3, seed=9)
    threshold = _mixed_threshold(stock, images[:2], 6)
    patched = patched_copy(stock, "ppt", r=6, threshold=threshold)
    patched.token_reduction.state.trace = True
    with torch.no_grad():
        patched(images)
        _, trace, _ = _reference(stock, images, (3, 6, 9), 6, threshold)
    aux = patched.token_reduction.aux
    assert sorted(aux["patch_group"]) == sorted(aux["patch_state"]) == [3, 6, 9]
    assert_groups_match_reference(patched.token_reduction, trace, stock.num_prefix_tokens, with_dropped=True)


# ---------------------------------------------------------------------------------------------
# Identity, batch independence, training

@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers"])
def test_r_zero_and_keep_ratio_one_are_the_stock_model(models, model_name):
    images = random_images(2)
    stock = models[model_name]
    with torch.no_grad():
        assert torch.equal(patched_copy(stock, "ppt", r=0)(images), stock(images))
        assert torch.equal(patched_copy(stock, "ppt", 1.0, threshold=1.0)(images), stock(images))


@pytest.mark.parametrize("threshold", [0.0, 1.0, "mixed"])
def test_batch_independence(models, threshold):
    images = random_images(4, seed=10)
    if threshold == "mixed":
        threshold = _mixed_threshold(models["cls"], images[:2], 6)
    assert max_batch_delta(patched_copy(models["cls"], "ppt", r=6, threshold=threshold), images) < 1e-12


def test_training_reduces_and_backpropagates(models):
    patched = patched_copy(models["cls"], "ppt", r=6, threshold=1.0)
    patched.train()
    patched(random_images(2, seed=11)).sum().backward()
    assert patched.token_reduction.aux["kept"][3].shape == (2, 37 - 6)
    assert patched.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Counts and cost on the real DeiT geometry

def test_counts_and_the_official_setting():
    g = timm_geometry("deit_small_patch16_224")
    method = methods.build(g, "ppt", 0.7)
    assert method.layers == (3, 6, 9) and set(method.merge_counts.values()) == {43}  # 196 - 3 * 43 = 67
    assert method.schedule().tokens_out[-1] == 1 + 67
    official = methods.build(g, "ppt", r=50)  # README: r_tokens 50 at 3, 6, 9; the last one clamps to 96 // 2
    assert official.schedule().tokens_out == (197,) * 3 + (147,) * 3 + (97,) * 3 + (49,) * 3
    assert round(official.total_macs() / 1e9, 4) == 2.9423  # the README prints 2.944 (torchprofile)


@pytest.mark.parametrize("keep_ratio, gmacs", [(0.9, (3.986, 3.984)), (0.7, (3.158, 3.157)), (0.5, (2.300, 2.299))])
def test_gmacs_on_deit_small(keep_ratio, gmacs):
    method = methods.build(timm_geometry("deit_small_patch16_224"), "ppt", keep_ratio)
    assert (round(method.total_macs() / 1e9, 3), round(method.total_macs(include_overhead=False) / 1e9, 3)) == gmacs


def test_overhead_is_the_cls_row_and_the_matching():
    g = timm_geometry("deit_small_patch16_224")
    method = methods.build(g, "ppt", 0.7)
    expected = sum(b.n_in * g.attn_dim + math.ceil(b.n_in / 2) * (b.n_in // 2) * g.head_dim
                   for b in method.schedule().blocks if b.action == "prune")
    assert method.total_macs() - method.total_macs(include_overhead=False) == expected


def test_bad_options_and_a_model_without_cls(models):
    geometry = timm_geometry("deit_small_patch16_224")
    with pytest.raises(MethodError, match=r"threshold=-1.0 is negative"):
        methods.build(geometry, "ppt", threshold=-1)
    with pytest.raises(MethodError, match=r"option r=.*valid: an integer >= 0"):
        methods.build(geometry, "ppt", r="x")
    with pytest.raises(MethodError, match="CLS"):
        methods.build(models["gap"], "ppt", 0.5)
