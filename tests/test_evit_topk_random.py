"""EViT, Top-K and random keep-K against a per-sample reference written here from docs/methods.md#evit-algorithm and docs/methods.md#top-k-algorithm
(explicit softmax attention, python sorting; not from methods/evit.py), and against the numbers of
docs/methods.md#evit-algorithm and docs/methods.md#reference-counts."""
import math

import pytest
import torch

import methods
from methods import DROPPED, FUSED, KEPT, MethodError
from random_vits import (  # noqa: F401 (models is a fixture)
    DTYPES, REFERENCE_TOL, in_dtype, models, patched_copy, random_images, timm_geometry,
)

# ---------------------------------------------------------------------------------------------
# Reference (docs/methods.md#evit-algorithm, docs/methods.md#random-keep-k-algorithm), one sample at a time. Every token carries the original patch
# it came from (-1 for a fused token) so that the selections can be compared with aux outputs.

def _cls_scores(block, tokens, kind):
    """Explicit attention of one sample. Returns the block's attention output and, per image token,
    the head-mean CLS softmax probability ("prob") or scaled pre-softmax logit ("logit")."""
    attn = block.attn
    N, H, d = tokens.shape[0], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(block.norm1(tokens)).reshape(N, 3, H, d).unbind(1)  # (N, H, d) each
    logits = torch.einsum("ihd,jhd->hij", q, k) * d ** -0.5
    probs = logits.softmax(-1)
    mixed = torch.einsum("hij,jhd->ihd", probs, v).reshape(N, H * d)
    cls_row = (probs if kind == "prob" else logits)[:, 0, :].mean(0)
    return attn.proj(mixed), cls_row


def _reference_sample(model, image, layers, keep_ratio, fuse, score, ranking=None, sample=0):
    """Logits of one image (the `sample`-th of the stream) and, per reduction layer, the original
    patches still held as themselves."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
    origin = [-2] * prefix + list(range(x.shape[0] - prefix))
    held = {}
    for i, block in enumerate(model.blocks):
        out, cls_row = _cls_scores(block, x, "logit" if score == "logit" else "prob")
        x = x + block.ls1(out)
        n_img = x.shape[0] - prefix
        left = math.ceil(keep_ratio * n_img)
        if i in layers and left < n_img:
            score_of = ranking(sample, i, n_img) if score == "random" else cls_row[prefix:].tolist()
            order = sorted(range(n_img), key=lambda j: -score_of[j])
            keep, drop = order[:left], order[left:]
            rows = list(range(prefix)) + [prefix + j for j in keep]
            new_x, new_origin = [x[r] for r in rows], [origin[r] for r in rows]
            if fuse:
                new_x.append(sum(cls_row[prefix + j] * x[prefix + j] for j in drop))
                new_origin.append(-1)
            x, origin = torch.stack(new_x), new_origin
            held[i] = sorted(o for o in origin if o >= 0)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x[None]))[0], held


def _reference(model, images, layers, keep_ratio, fuse=False, score="prob", ranking=None):
    outs = [_reference_sample(model, im, layers, keep_ratio, fuse, score, ranking, sample)
            for sample, im in enumerate(images)]
    return torch.stack([o[0] for o in outs]), [o[1] for o in outs]


def _lowbias32(h):
    """docs/methods.md#random-keep-k-algorithm's 32-bit mixer, on Python integers."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _documented_ranking(seed):
    """The documented eval ranking of the stream's `sample` at block `layer`: slot j's priority is
    h(h(h(h(h(seed) ^ layer) ^ sample) ^ j))."""
    def ranking(sample, layer, n):
        per_sample = _lowbias32(_lowbias32(_lowbias32(seed) ^ layer) ^ sample)
        return [_lowbias32(_lowbias32(per_sample ^ j)) for j in range(n)]
    return ranking


VARIANTS = {  # method, options -> reference arguments
    "evit": ("evit", {}, dict(fuse=True)),
    "evit-nofuse": ("evit", {"fuse": False}, dict(fuse=False)),
    "topk": ("topk", {}, dict(score="prob")),
    "topk-logit": ("topk", {"score": "logit"}, dict(score="logit")),
    "random": ("random", {"seed": 5}, dict(score="random", ranking=_documented_ranking(5))),
}


# ---------------------------------------------------------------------------------------------
# Equivalence with the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", ["cls", "distilled", "registers"])
@pytest.mark.parametrize("keep_ratio", [0.9, 0.7, 0.5])
def test_logits_match_reference(models, variant, model_name, keep_ratio, dtype):
    name, options, ref_args = VARIANTS[variant]
    stock = in_dtype(models[model_name], dtype)
    images = random_images(2, dtype=dtype)
    patched = patched_copy(stock, name, keep_ratio, **options)
    with torch.no_grad():
        got = patched(images)
        want, _ = _reference(stock, images, patched.token_reduction.layers, keep_ratio, **ref_args)
    assert (got - want).abs().max().item() <= REFERENCE_TOL[dtype]


@pytest.mark.parametrize("variant", ["evit", "topk-logit"])
def test_unfused_attention_path_matches_reference(models, variant):
    name, options, ref_args = VARIANTS[variant]
    images = random_images(2, seed=1)
    patched = patched_copy(models["distilled"], name, 0.6, fused_attn=False, **options)
    with torch.no_grad():
        want, _ = _reference(models["distilled"], images, patched.token_reduction.layers, 0.6, **ref_args)
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


def test_random_on_model_without_cls_token_matches_reference(models):
    images = random_images(2, seed=2)
    patched = patched_copy(models["gap"], "random", 0.6, seed=11)
    with torch.no_grad():
        want, _ = _reference(models["gap"], images, (3, 6, 9), 0.6, score="random",
                             ranking=_documented_ranking(11))
        assert (patched(images) - want).abs().max().item() <= REFERENCE_TOL[torch.float64]


@pytest.mark.parametrize("variant", VARIANTS)
def test_patch_state_matches_reference_selection(models, variant):
    name, options, ref_args = VARIANTS[variant]
    stock = models["distilled"]
    images = random_images(3, seed=3)
    patched = patched_copy(stock, name, 0.7, **options)
    patched.token_reduction.state.trace = True
    with torch.no_grad():
        patched(images)
        _, held = _reference(stock, images, (3, 6, 9), 0.7, **ref_args)
    aux = patched.token_reduction.aux
    assert sorted(aux["patch_state"]) == sorted(aux["kept"]) == [3, 6, 9]
    rest = FUSED if ref_args.get("fuse") else DROPPED
    for layer, state in aux["patch_state"].items():
        assert state.shape == (3, 36) and state.dtype == torch.int8
        for b in range(3):
            kept = torch.nonzero(state[b] == KEPT).flatten().tolist()
            assert kept == held[b][layer]
            assert set(state[b].tolist()) <= {KEPT, rest}
        # "kept": positions in the block's input; prefix first, then the kept image tokens
        assert aux["kept"][layer][:, :2].tolist() == [[0, 1]] * 3


# ---------------------------------------------------------------------------------------------
# Identity, batch independence, training

@pytest.mark.parametrize("name", ["evit", "topk", "random"])
@pytest.mark.parametrize("model_name", ["cls", "distilled"])
def test_keep_ratio_one_is_the_stock_model(models, name, model_name):
    images = random_images(2)
    stock = models[model_name]
    with torch.no_grad():
        assert torch.equal(patched_copy(stock, name, 1.0)(images), stock(images))


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_independence(models, variant):
    name, options, _ = VARIANTS[variant]
    images = random_images(4, seed=4)
    patched = patched_copy(models["cls"], name, 0.5, **options)
    with torch.no_grad():
        whole = patched(images)
        if name == "random":  # sample n of the eval stream: rank the same samples again
            patched.token_reduction.restart_stream()
        alone = torch.cat([patched(images[i:i + 1]) for i in range(4)])
    assert (whole - alone).abs().max().item() < 1e-12


def test_random_is_reproducible_per_seed_and_differs_across_seeds(models):
    images = random_images(2, seed=5)
    kept = {}
    for seed in (0, 0, 1):
        patched = patched_copy(models["cls"], "random", 0.5, seed=seed)
        patched.token_reduction.state.trace = True
        with torch.no_grad():
            patched(images)
        kept.setdefault(seed, []).append(patched.token_reduction.aux["kept"][3])
    assert torch.equal(kept[0][0], kept[0][1])
    assert not torch.equal(kept[0][0], kept[1][0])


def _random_kept(patched, images):
    with torch.no_grad():
        patched(images)
    return patched.token_reduction.aux["kept"][3]


def test_random_draws_per_sample_along_the_eval_stream(models):
    """The same image twice in a batch gets two subsets; the stream goes on across batches and
    restarts on demand, so sample n's subset does not depend on how the stream was batched."""
    image = random_images(1, seed=7)
    patched = patched_copy(models["cls"], "random", 0.5)
    patched.token_reduction.state.trace = True
    first = _random_kept(patched, image.expand(4, -1, -1, -1))
    assert len({tuple(row.tolist()) for row in first}) == 4
    later = _random_kept(patched, image.expand(4, -1, -1, -1))
    assert not torch.equal(first, later)
    patched.token_reduction.restart_stream()
    assert torch.equal(torch.cat([_random_kept(patched, image.expand(n, -1, -1, -1)) for n in (1, 3)]), first)
    # over 400 samples every patch is kept about left / n of the time (binomial sd about 10)
    num_patches = patched.token_reduction.geometry.num_patches
    expected = 400 * math.ceil(0.5 * num_patches) / num_patches
    counts = torch.zeros(num_patches)
    for row in _random_kept(patched, image.expand(400, -1, -1, -1))[:, 1:] - 1:
        counts[row] += 1
    assert expected - 50 < counts.min() and counts.max() < expected + 50


def test_random_training_draws_from_torchs_rng(models):
    patched = patched_copy(models["cls"], "random", 0.5)
    patched.train()
    images = random_images(2, seed=8)
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        patched(images)
        draws.append(patched.token_reduction.aux["kept"][3])
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert int(patched.blocks[3].random_samples_seen) == 0  # training leaves the eval stream alone
    assert "random_samples_seen" not in patched.state_dict()  # checkpoints stay the stock model's


def test_a_method_revision_changes_the_job_key(monkeypatch):
    from bench.spec import JobSpec
    spec = JobSpec("acc", "m", method="topk", keep_ratio=0.5)
    before = spec.key
    monkeypatch.setattr(methods.get_method("topk"), "revision", 1)
    assert spec.key != before and spec.key.startswith("acc-topk-0.5-")
    monkeypatch.setattr(methods.get_method("topk"), "revision", 0)
    assert spec.key == before


def test_training_gathers_and_backpropagates_through_the_fused_token(models):
    patched = patched_copy(models["cls"], "evit", 0.5)
    patched.train()
    out = patched(random_images(2, seed=6))
    out.sum().backward()
    aux = patched.token_reduction.aux  # recorded in training without tracing
    assert [aux["kept"][i].shape[1] for i in (3, 6, 9)] == [1 + 18, 1 + 10, 1 + 6]
    assert patched.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Counts and cost (docs/methods.md#evit-algorithm, docs/methods.md#reference-counts) on the real DeiT geometry

# docs/methods.md#evit-algorithm: kept image tokens after blocks 3/6/9 (fuse on; the fused token not counted)
EVIT_KEPT = {0.9: (177, 161, 146), 0.8: (157, 127, 103), 0.7: (138, 98, 70),
             0.6: (118, 72, 44), 0.5: (98, 50, 26)}
# docs/methods.md#reference-counts: DeiT-S GMACs, EViT with / without the fused token. that table is the stock cost of the scheduled
# tokens; the count with overhead adds the recomputed CLS attention row and the fused token's mat-vec.
EVIT_GMACS = {0.9: (4.022, 3.988), 0.8: (3.477, 3.444), 0.7: (3.029, 2.997),
              0.6: (2.635, 2.608), 0.5: (2.309, 2.282)}


@pytest.mark.parametrize("keep_ratio", EVIT_GMACS)
def test_evit_gmacs_on_deit_small(keep_ratio):
    geometry = timm_geometry("deit_small_patch16_224")
    fused = methods.build(geometry, "evit", keep_ratio).total_macs(include_overhead=False) / 1e9
    unfused = methods.build(geometry, "evit", keep_ratio, fuse=False).total_macs(include_overhead=False) / 1e9
    assert (round(fused, 3), round(unfused, 3)) == EVIT_GMACS[keep_ratio]
    topk = methods.build(geometry, "topk", keep_ratio)
    assert topk.total_macs() == methods.build(geometry, "evit", keep_ratio, fuse=False).total_macs()
    assert topk.total_macs(include_overhead=False) / 1e9 == pytest.approx(unfused)


@pytest.mark.parametrize("name, options", [("evit", {}), ("evit", {"fuse": False}), ("topk", {}),
                                           ("topk", {"score": "logit"}), ("random", {})])
def test_overhead_is_the_cls_row_and_the_fused_token(name, options):
    """Per reducing block: q0 K^T over the n_in tokens entering it (CLS-scored methods: N D) and,
    with fusion, the weighted sum of the current image tokens ((N - 1) D); random scores for free."""
    geometry = timm_geometry("deit_small_patch16_224")
    method = methods.build(geometry, name, 0.7, **options)
    D, blocks = geometry.dim, method.schedule().blocks
    expected = 0
    for i in (3, 6, 9):
        n_in = blocks[i].n_in
        expected += (n_in * D if method.needs_cls else 0) + ((n_in - 1) * D if method.fuses else 0)
    assert method.total_macs() - method.total_macs(include_overhead=False) == expected


def test_evit_gmacs_on_deit_base_and_tiny():
    base = methods.build(timm_geometry("deit_base_patch16_224"), "evit", 0.7)
    assert round(base.total_macs(include_overhead=False) / 1e9, 2) == 11.61
    tiny = [methods.build(timm_geometry("deit_tiny_patch16_224"), "evit", r).total_macs(include_overhead=False) / 1e9
            for r in (0.9, 0.8, 0.7, 0.6, 0.5)]
    assert [round(v, 3) for v in tiny] == [1.092, 0.942, 0.821, 0.715, 0.629]


def test_default_layers_follow_depth():
    geometry = timm_geometry("deit_small_patch16_224")
    assert methods.build(geometry, "random", 0.5).layers == (3, 6, 9)
    from dataclasses import replace
    assert methods.build(replace(geometry, depth=16), "evit", 0.5).layers == (4, 8, 12)
    assert methods.build(replace(geometry, depth=24), "topk", 0.5).layers == (6, 12, 18)


# ---------------------------------------------------------------------------------------------
# Bad input

def test_bad_options_name_the_value_and_the_valid_ones():
    geometry = timm_geometry("deit_small_patch16_224")
    with pytest.raises(MethodError, match=r"score='probs'.*prob, logit"):
        methods.build(geometry, "topk", 0.5, score="probs")
    with pytest.raises(MethodError, match=r"'fuse'.*valid: score"):
        methods.build(geometry, "topk", 0.5, fuse=True)
    with pytest.raises(MethodError, match=r"seed=-1"):
        methods.build(geometry, "random", 0.5, seed=-1)


def test_cls_scored_methods_refuse_a_model_without_cls_but_random_accepts_it(models):
    for name in ("evit", "topk"):
        with pytest.raises(MethodError, match="CLS"):
            methods.build(models["gap"], name, 0.5)
    assert methods.build(models["gap"], "random", 0.5).layers == (3, 6, 9)
