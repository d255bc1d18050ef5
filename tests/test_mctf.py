"""MCTF (training-free) against a per-sample reference written here from docs/methods.md#mctf (explicit
softmax attention with the log-size bias, the three criteria per pair, python loops for the bidirectional
matching and the pooling; not from methods/mctf.py), and its counts and GMACs on the DeiT geometry."""
import math

import pytest
import torch

import methods
from methods import MethodError
from random_vits import (  # noqa: F401 (models is a fixture)
    DTYPES, assert_groups_match_reference, REFERENCE_TOL, in_dtype, max_batch_delta, models, patched_copy,
    random_images, timm_geometry, timm_model,
)

DEFAULTS = dict(tau_sim=1.0, tau_info=20.0, tau_size=40.0, bidirection=True, pooling="attention", prop_attn=True)


# ---------------------------------------------------------------------------------------------
# Reference, one sample at a time. Every token carries its size and the original patches it holds.

def _attention(block, tokens, sizes, prop_attn):
    """Explicit attention of one sample -> (attention output (N, C), probabilities (H, N, N))."""
    attn = block.attn
    N, H, d = tokens.shape[0], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(block.norm1(tokens)).reshape(N, 3, H, d).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = torch.einsum("ihd,jhd->hij", q, k) * d ** -0.5
    if prop_attn:
        logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()[None, None, :]
    probs = logits.softmax(-1)
    mixed = torch.einsum("hij,jhd->ihd", probs, v).reshape(N, H * d)
    return attn.proj(attn.norm(mixed)), probs


def _fuse(x, probs, sizes, groups, r, prefix, o):
    """Multi-criteria bidirectional fusion of r tokens of one sample."""
    N = len(x)
    received = probs.mean(dim=(0, 1))
    inv_a = [1 / float(a) for a in received]
    inv_s = [1 / s for s in sizes]
    u = [v / max(inv_a) for v in inv_a]
    w = [v / max(inv_s) for v in inv_s]
    unit = x / x.norm(dim=-1, keepdim=True)

    def score(i, j):
        if i < prefix or j < prefix:
            return -math.inf
        value = 1.0
        if o["tau_sim"]:
            value *= max((float(unit[i] @ unit[j]) + 1) / 2, 0.0) ** (1 / o["tau_sim"])
        if o["tau_info"]:
            value *= (u[i] * u[j]) ** (1 / o["tau_info"])
        if o["tau_size"]:
            value *= (w[i] * w[j]) ** (1 / o["tau_size"])
        return value

    set_a, set_b = list(range(0, N, 2)), list(range(1, N, 2))
    r1, r2 = (r // 2, r - r // 2) if o["bidirection"] else (r, 0)
    best = {a: max(((score(a, b), b) for b in set_b), key=lambda t: t[0]) for a in set_a}
    ranked = sorted(set_a, key=lambda a: -best[a][0])
    src_a, unm_a = ranked[:r1], ranked[r1:]
    if prefix:
        unm_a = sorted(unm_a)
    owner = {a: best[a][1] for a in src_a}
    if o["bidirection"]:
        best2 = {b: max(((score(a, b), a) for a in unm_a), key=lambda t: t[0]) for b in set_b}
        ranked_b = sorted(set_b, key=lambda b: -best2[b][0])
        owner.update({b: best2[b][1] for b in ranked_b[:r2]})
        unm_b = ranked_b[r2:]
    else:
        unm_b = set_b
    order = unm_a + unm_b
    order = sorted(t for t in order if t < prefix) + [t for t in order if t >= prefix]

    def final(t):
        while t in owner:
            t = owner[t]
        return t

    members = {t: [m for m in range(N) if final(m) == t] for t in order}
    weight = [float(received[m]) * sizes[m] if o["pooling"] == "attention" else sizes[m] for m in range(N)]
    new_x = [sum(weight[m] * x[m] for m in members[t]) / sum(weight[m] for m in members[t]) for t in order]
    new_sizes = [sum(sizes[m] for m in members[t]) for t in order]
    new_groups = [sorted(p for m in members[t] for p in groups[m]) for t in order]
    return torch.stack(new_x), new_sizes, new_groups


def _reference_sample(model, image, r_per_block, o):
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
    sizes = [1.0] * len(x)
    groups = [[]] * prefix + [[p] for p in range(len(x) - prefix)]
    trace = {}
    for i, block in enumerate(model.blocks):
        out, probs = _attention(block, x, sizes, o["prop_attn"])
        x = x + block.ls1(out)
        x = x + block.ls2(block.mlp(block.norm2(x)))
        r = min(r_per_block.get(i, 0), (len(x) - prefix) // 2)
        if r > 0:
            x, sizes, groups = _fuse(x, probs, sizes, groups, r, prefix, o)
            trace[i] = groups
    return model.forward_head(model.norm(x[None]))[0], trace


def _reference(model, images, r_per_block, **options):
    o = dict(DEFAULTS, **options)
    outs = [_reference_sample(model, im, r_per_block, o) for im in images]
    return torch.stack([out[0] for out in outs]), [out[1] for out in outs]


def _every_block_but_the_first(r):
    return {i: r for i in range(1, 12)}


# ---------------------------------------------------------------------------------------------
# Equivalence with the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers", "gap"])
@pytest.mark.parametrize("r", [1, 3, 6])  # 6 runs into the clamp to half the image tokens
def test_logits_match_reference(models, model_name, r, dtype):
    stock = in_dtype(models[model_name], dtype)
    images = random_images(2, seed=r, dtype=dtype)
    with torch.no_grad():
        got = patched_copy(stock, "mctf", r=r)(images)
        want, _ = _reference(stock, images, _every_block_but_the_first(r))
    assert (got - want).abs().max().item() <= REFERENCE_TOL[dtype]


@pytest.mark.parametrize("options", [
    dict(bidirection=False), dict(pooling="size"), dict(tau_sim=0.0), dict(tau_info=0.0, tau_size=0.0),
    dict(tau_sim=2.0, tau_info=5.0, tau_size=3.0), dict(prop_attn=False),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("fused_attn", [True, False])
def test_options_and_attention_paths_match_reference(models, options, fused_attn):
    images = random_images(2, seed=7)
    patched = patched_copy(models["distilled"], "mctf", fused_attn=fused_attn, r=4, **options)
    with torch.no_grad():
        want, _ = _reference(models["distilled"], images, _every_block_but_the_first(4), **options)
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


def test_layerscale_model_with_per_layer_r_matches_reference():
    deit3 = timm_model("deit3_small_patch16_224", 4)
    images = random_images(2, seed=8)
    r = (0, 4, 0, 3, 6, 2)
    patched = patched_copy(deit3, "mctf", layers=range(2, 10), r=",".join(map(str, r)))
    with torch.no_grad():
        want, _ = _reference(deit3, images, dict(zip(range(2, 8), r)))
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


@pytest.mark.parametrize("model_name", ["distilled", "registers", "gap"])
def test_aux_outputs_match_reference_groups(models, model_name):
    stock = models[model_name]
    images = random_images(3, seed=9)
    patched = patched_copy(stock, "mctf", r=4)
    patched.token_reduction.state.trace = True
    with torch.no_grad():
        patched(images)
        _, trace = _reference(stock, images, _every_block_but_the_first(4))
    aux, schedule = patched.token_reduction.aux, patched.token_reduction.schedule()
    assert sorted(aux["patch_group"]) == [i for i, b in enumerate(schedule.blocks) if b.action == "merge"]
    assert_groups_match_reference(patched.token_reduction, trace, stock.num_prefix_tokens)


# ---------------------------------------------------------------------------------------------
# Identity, batch independence, training

@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers", "gap"])
def test_r_zero_and_keep_ratio_one_are_the_stock_model(models, model_name):
    images = random_images(2)
    stock = models[model_name]
    with torch.no_grad():
        assert torch.equal(patched_copy(stock, "mctf", r=0)(images), stock(images))
        assert torch.equal(patched_copy(stock, "mctf", 1.0, pooling="size")(images), stock(images))


def test_batch_independence(models):
    images = random_images(4, seed=10)
    assert max_batch_delta(patched_copy(models["cls"], "mctf", r=3), images) < 1e-12


def test_training_fuses_and_backpropagates(models):
    patched = patched_copy(models["cls"], "mctf", r=3)
    patched.train()
    patched(random_images(2, seed=11)).sum().backward()
    assert patched.token_reduction.aux["kept"][1].shape == (2, 37 - 3)
    assert patched.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Counts and cost on the real DeiT geometry

def test_counts_follow_the_final_token_count():
    g = timm_geometry("deit_small_patch16_224")
    method = methods.build(g, "mctf", 0.7)
    assert method.layers == tuple(range(1, 12)) and set(method.merge_counts.values()) == {12}
    # fused at the END of blocks 1..11: block 1 still runs on 197 tokens; int(196 * 0.343) = 67, 196 - 11 * 12 = 64
    blocks = method.schedule().blocks
    assert (blocks[1].n_attn, blocks[1].n_mlp, blocks[1].n_out) == (197, 197, 185)
    assert method.schedule().tokens_out[-1] == 1 + 64
    official = methods.build(g, "mctf", r=16).schedule().tokens_out
    assert official == (197,) + tuple(197 - 16 * i for i in range(1, 12))


@pytest.mark.parametrize("keep_ratio, gmacs", [(0.9, (4.068, 4.036)), (0.7, (3.295, 3.274)), (0.5, (2.868, 2.851))])
def test_gmacs_on_deit_small(keep_ratio, gmacs):
    method = methods.build(timm_geometry("deit_small_patch16_224"), "mctf", keep_ratio)
    assert (round(method.total_macs() / 1e9, 3), round(method.total_macs(include_overhead=False) / 1e9, 3)) == gmacs


def test_overhead_is_the_similarity_of_the_block_outputs():
    g = timm_geometry("deit_small_patch16_224")
    method = methods.build(g, "mctf", 0.7)
    expected = sum(math.ceil(b.n_in / 2) * (b.n_in // 2) * g.dim
                   for b in method.schedule().blocks if b.action == "merge")
    assert method.total_macs() - method.total_macs(include_overhead=False) == expected


def test_bad_options_name_the_value_and_the_valid_ones():
    geometry = timm_geometry("deit_small_patch16_224")
    with pytest.raises(MethodError, match=r"tau_info=-1.0 is negative"):
        methods.build(geometry, "mctf", tau_info=-1)
    with pytest.raises(MethodError, match=r"pooling='max'.*attention, size"):
        methods.build(geometry, "mctf", pooling="max")
    with pytest.raises(MethodError, match=r"r=1,2,3 gives 3 values for 2 reduction layers"):
        methods.build(geometry, "mctf", layers=(0, 1), r=(1, 2, 3))
