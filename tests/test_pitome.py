"""PiToMe against a per-sample reference written here from docs/methods.md#pitome (explicit softmax attention,
the energy score as a plain mean over each token's row, python sorting and matching; not from
methods/pitome.py), and its counts and GMACs on the DeiT geometry."""
import math

import pytest
import torch

import methods
from methods import MethodError
from methods.pitome import final_image_tokens, ratio_for_keep_ratio
from random_vits import (  # noqa: F401 (models is a fixture)
    DTYPES, assert_groups_match_reference, REFERENCE_TOL, in_dtype, max_batch_delta, models, patched_copy,
    random_images, timm_geometry, timm_model,
)


# ---------------------------------------------------------------------------------------------
# Reference, one sample at a time; every token carries its size and the original patches it holds.

def _attention(block, tokens, sizes, prop_attn):
    attn = block.attn
    N, H, d = tokens.shape[0], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(block.norm1(tokens)).reshape(N, 3, H, d).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)  # per head: the norm acts on the last dimension
    logits = torch.einsum("ihd,jhd->hij", q, k) * d ** -0.5
    if prop_attn:
        logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()[None, None, :]
    mixed = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v).reshape(N, H * d)
    return attn.proj(attn.norm(mixed)), k.mean(1)


def _pitome_merge(x, keys, sizes, groups, k, prefix, margin, alpha):
    """Energy-protected bipartite merge of k image tokens of one sample."""
    image = list(range(prefix, len(x)))
    unit = keys[prefix:] / keys[prefix:].norm(dim=-1, keepdim=True)
    sim = unit @ unit.T
    shifted = sim - margin
    f = torch.where(sim >= margin, shifted, alpha * (shifted.exp() - 1))
    energy = [float(f[i].sum()) / len(image) for i in range(len(image))]
    order = sorted(range(len(image)), key=lambda i: -energy[i])
    set_a, set_b, protected = order[0:2 * k:2], order[1:2 * k:2], order[2 * k:]
    members = {t: [t] for t in protected + set_b}
    for a in set_a:
        members[max(set_b, key=lambda b: float(sim[a, b]))].append(a)
    out = list(range(prefix)) + [prefix + t for t in protected + set_b]
    groups_by = {t: [t] for t in range(prefix)} | {prefix + t: [prefix + m for m in members[t]]
                                                    for t in protected + set_b}
    new_x, new_sizes, new_groups = [], [], []
    for t in out:
        total = sum(sizes[m] for m in groups_by[t])
        new_x.append(sum(sizes[m] * x[m] for m in groups_by[t]) / total)
        new_sizes.append(total)
        new_groups.append(sorted(p for m in groups_by[t] for p in groups[m]))
    return torch.stack(new_x), new_sizes, new_groups


def _reference_sample(model, image, ratio, margin=0.9, alpha=1.0, prop_attn=False):
    prefix, depth = model.num_prefix_tokens, len(model.blocks)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
    sizes = [1.0] * len(x)
    groups = [[]] * prefix + [[p] for p in range(len(x) - prefix)]
    trace = {}
    for i, block in enumerate(model.blocks):
        out, keys = _attention(block, x, sizes, prop_attn)
        x = x + block.ls1(out)
        n = len(x) - prefix
        k = min(math.floor(n - n * ratio), n // 2)
        if k > 0:
            x, sizes, groups = _pitome_merge(x, keys, sizes, groups, k, prefix, margin * (1 - i / depth), alpha)
            trace[i] = groups
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x[None]))[0], trace


def _reference(model, images, ratio, **options):
    outs = [_reference_sample(model, im, ratio, **options) for im in images]
    return torch.stack([o[0] for o in outs]), [o[1] for o in outs]


# ---------------------------------------------------------------------------------------------
# Equivalence with the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers", "gap"])
@pytest.mark.parametrize("ratio", [0.9, 0.8, 0.6])  # 0.6: up to 14 of 36 merged in a layer
def test_logits_match_reference(models, model_name, ratio, dtype):
    stock = in_dtype(models[model_name], dtype)
    images = random_images(2, seed=int(ratio * 10), dtype=dtype)
    with torch.no_grad():
        got = patched_copy(stock, "pitome", ratio=ratio)(images)
        want, _ = _reference(stock, images, ratio)
    assert (got - want).abs().max().item() <= REFERENCE_TOL[dtype]


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_both_attention_paths_options_and_margin(models, fused_attn, prop_attn):
    images = random_images(2, seed=7)
    options = dict(ratio=0.85, margin=0.5, alpha=2.0, prop_attn=prop_attn)
    patched = patched_copy(models["distilled"], "pitome", fused_attn=fused_attn, **options)
    with torch.no_grad():
        want, _ = _reference(models["distilled"], images, 0.85, margin=0.5, alpha=2.0, prop_attn=prop_attn)
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


def test_layerscale_qk_norm_model_with_some_layers_matches_reference():
    deit3 = timm_model("deit3_small_patch16_224", 4)
    images = random_images(2, seed=8)
    patched = patched_copy(deit3, "pitome", layers=range(2, 10), ratio=0.8)
    with torch.no_grad():
        outs = []
        for image in images:  # the reference reduces in every block: give it blocks 2..9 only
            x = deit3.norm_pre(deit3.patch_drop(deit3._pos_embed(deit3.patch_embed(image[None]))))[0]
            sizes, groups = [1.0] * len(x), [[]] + [[p] for p in range(len(x) - 1)]
            for i, block in enumerate(deit3.blocks):
                out, keys = _attention(block, x, sizes, False)
                x = x + block.ls1(out)
                n = len(x) - 1
                k = min(math.floor(n - n * 0.8), n // 2) if 2 <= i < 10 else 0
                if k:
                    x, sizes, groups = _pitome_merge(x, keys, sizes, groups, k, 1, 0.9 * (1 - i / 12), 1.0)
                x = x + block.ls2(block.mlp(block.norm2(x)))
            outs.append(deit3.forward_head(deit3.norm(x[None]))[0])
        assert (patched(images) - torch.stack(outs)).abs().max().item() <= REFERENCE_TOL[torch.float64]


@pytest.mark.parametrize("model_name", ["distilled", "registers", "gap"])
def test_aux_outputs_match_reference_groups(models, model_name):
    stock = models[model_name]
    images = random_images(3, seed=9)
    patched = patched_copy(stock, "pitome", ratio=0.85)
    patched.token_reduction.state.trace = True
    with torch.no_grad():
        patched(images)
        _, trace = _reference(stock, images, 0.85)
    aux, schedule = patched.token_reduction.aux, patched.token_reduction.schedule()
    merging = [i for i, b in enumerate(schedule.blocks) if b.action == "merge"]
    assert sorted(aux["patch_group"]) == sorted(aux["patch_state"]) == sorted(aux["kept"]) == merging
    assert_groups_match_reference(patched.token_reduction, trace, stock.num_prefix_tokens)


# ---------------------------------------------------------------------------------------------
# Identity, batch independence, training

@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers", "gap"])
def test_keep_ratio_one_is_the_stock_model(models, model_name):
    images = random_images(2)
    stock = models[model_name]
    with torch.no_grad():
        assert torch.equal(patched_copy(stock, "pitome", 1.0)(images), stock(images))
        assert torch.equal(patched_copy(stock, "pitome", 0.5, ratio=1.0)(images), stock(images))
        assert torch.equal(patched_copy(stock, "pitome", 1.0, prop_attn=True)(images), stock(images))


def test_keep_ratio_one_on_deit3_with_layerscale_is_the_stock_model():
    deit3 = timm_model("deit3_small_patch16_224", 5)
    images = random_images(2, seed=1)
    with torch.no_grad():
        assert torch.equal(patched_copy(deit3, "pitome", 1.0)(images), deit3(images))


def test_batch_independence(models):
    images = random_images(4, seed=10)
    assert max_batch_delta(patched_copy(models["cls"], "pitome", 0.6, prop_attn=True), images) < 1e-12


def test_training_merges_and_backpropagates(models):
    patched = patched_copy(models["cls"], "pitome", ratio=0.9)
    patched.train()
    patched(random_images(2, seed=11)).sum().backward()
    assert patched.token_reduction.aux["kept"][0].shape == (2, 37 - 3)  # floor(36 - 32.4) = 3
    assert patched.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Counts and cost on the real DeiT geometry

def test_keep_ratio_maps_to_a_per_layer_ratio():
    # final image tokens int(196 * rho^3): 0.7 -> 67, 0.5 -> 24; ratio 1 merges nothing
    assert ratio_for_keep_ratio(196, 12, 1.0) == 1.0
    for keep, target in ((0.9, 142), (0.7, 67), (0.5, 24)):
        ratio = ratio_for_keep_ratio(196, 12, keep)
        assert abs(final_image_tokens(196, 12, ratio) - target) <= 1
    method = methods.build(timm_geometry("deit_small_patch16_224"), "pitome", 0.7)
    assert method.layers == tuple(range(12)) and method.schedule().tokens_out[-1] == 1 + 67
    assert methods.build(timm_geometry("deit_small_patch16_224"), "pitome", 0.7, ratio=0.9).ratio == 0.9


def test_merge_count_is_the_official_floor():
    tokens = methods.build(timm_geometry("deit_small_patch16_224"), "pitome", ratio=0.9).schedule().tokens_out
    counts = [196]
    for _ in range(12):
        counts.append(counts[-1] - math.floor(counts[-1] - counts[-1] * 0.9))
    assert tokens == tuple(1 + c for c in counts[1:])


@pytest.mark.parametrize("keep_ratio, gmacs", [(0.9, (3.913, 3.891)), (0.7, (2.763, 2.749)), (0.5, (1.840, 1.832))])
def test_gmacs_on_deit_small(keep_ratio, gmacs):
    method = methods.build(timm_geometry("deit_small_patch16_224"), "pitome", keep_ratio)
    assert (round(method.total_macs() / 1e9, 3), round(method.total_macs(include_overhead=False) / 1e9, 3)) == gmacs


def test_overhead_is_the_energy_similarity_matrix():
    g = timm_geometry("deit_small_patch16_224")
    method = methods.build(g, "pitome", 0.7)
    expected = sum((b.n_in - 1) ** 2 * g.head_dim for b in method.schedule().blocks if b.action == "merge")
    assert method.total_macs() - method.total_macs(include_overhead=False) == expected


def test_bad_options_name_the_value_and_the_valid_ones():
    geometry = timm_geometry("deit_small_patch16_224")
    with pytest.raises(MethodError, match=r"ratio=0.4 is out of range; valid: 0.5 <= ratio <= 1"):
        methods.build(geometry, "pitome", ratio=0.4)
    with pytest.raises(MethodError, match=r"alpha=0.0 is not positive"):
        methods.build(geometry, "pitome", alpha=0)
    with pytest.raises(MethodError, match=r"option margin='x' is not a float"):
        methods.build(geometry, "pitome", margin="x")
