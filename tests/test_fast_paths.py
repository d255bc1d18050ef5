"""The fast paths of docs/PERFORMANCE.md against the straightforward forwards they replaced
(benchmarks/straightforward.py): the same logits (<= 1e-5 in fp32); IdleViT's cheap scoring against the
official one on real images and on exact ties, the default scoring and its count; graph capture by
torch.compile without graph breaks or host synchronisation."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import methods
from bench.data import load_fashion_mnist
from bench.models import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_model
from benchmarks.straightforward import make_straightforward
from methods.attention import batch_rows, head_sum, project_qkv, replace_rows, take_rows
from random_vits import in_dtype, models, random_images  # noqa: F401 (models is a fixture)

FAST_TOL = 1e-5  # fp32, max |delta logits| of a fast path against the straightforward one (measured <= 7.2e-7)
CASES = [("idle", {}), ("idle", {"cheap_score": False}), ("evit", {}), ("evit", {"fuse": False}),
         ("topk", {}), ("topk", {"score": "logit"}), ("random", {}), ("tome", {}), ("tome", {"prop_attn": False})]


def straightforward(stock, method, ratio, options):
    """The straightforward model: IdleViT's official scoring is part of it (keys of every token)."""
    options = dict(options, cheap_score=False) if method == "idle" else options
    return make_straightforward(methods.apply(copy.deepcopy(stock), method, ratio, **options))


@pytest.mark.parametrize("ratio", [0.7, 0.5])
@pytest.mark.parametrize("model_name, method, options", [
    (model, method, options) for model in ("cls", "distilled", "registers", "gap") for method, options in CASES
    if model != "gap" or not methods.get_method(method).needs_cls])  # no CLS: only random and ToMe
def test_fast_path_gives_the_straightforward_logits(models, model_name, method, options, ratio):
    stock = in_dtype(models[model_name], torch.float32)
    fast = methods.apply(copy.deepcopy(stock), method, ratio, **options)
    slow = straightforward(stock, method, ratio, options)
    x = random_images(4, seed=5, dtype=torch.float32)
    with torch.inference_mode():
        delta = (fast(x) - slow(x)).abs().max().item()
    assert delta <= FAST_TOL, f"max |delta logits| = {delta:.3g}"


def test_row_helpers_are_gather_and_scatter():
    gen = torch.Generator().manual_seed(0)
    x, new = torch.randn(3, 7, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    idx = torch.stack([torch.randperm(7, generator=gen)[:4] for _ in range(3)])
    rows = batch_rows(idx, 7)
    expanded = idx.unsqueeze(-1).expand(-1, -1, 5)
    assert torch.equal(take_rows(x, rows, 4), x.gather(1, expanded))
    before = x.clone()
    assert torch.equal(replace_rows(x, rows, new), x.scatter(1, expanded, new))
    assert torch.equal(x, before)  # out of place
    k = torch.randn(3, 6, 7, 4, generator=gen)
    assert torch.allclose(head_sum(k), k.sum(1), atol=1e-6)


# --- IdleViT scoring --------------------------------------------------------------------------

def fashion_images(count: int) -> torch.Tensor:
    images, _ = load_fashion_mnist("test")
    return ((images[:count].float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]).unsqueeze(1)


def kept_sets(model, x):
    model.token_reduction.state.trace = True
    with torch.inference_mode():
        logits = model(x)
    return logits, {b: k.sort(dim=1).values for b, k in model.token_reduction.aux["kept"].items()}


@pytest.mark.parametrize("ratio", [0.7, 0.5])
def test_cheap_scoring_keeps_the_official_tokens_on_real_images(ratio):
    """Ties at rounding level could in principle move a token across the K-th place. Measured on the
    trained embedded model: the first 2,000 Fashion-MNIST test images at keep 0.9, 0.7 and 0.5 give the
    same kept set at all 9 idle layers (0 of 54,000 decisions differ; the official path at batch 1
    against batch 64 also differs in 0), and equal logits. This checks 256 of those images."""
    stock = create_model("tokenbench_vit_fmnist", pretrained=True).eval()
    x = fashion_images(256)
    official_logits, official = kept_sets(methods.apply(copy.deepcopy(stock), "idle", ratio, cheap_score=False), x)
    cheap_logits, cheap = kept_sets(methods.apply(copy.deepcopy(stock), "idle", ratio), x)
    for block in official:
        assert torch.equal(official[block], cheap[block]), f"block {block}"
    assert (official_logits - cheap_logits).abs().max() <= FAST_TOL


def test_exact_ties_may_pick_other_tokens_but_give_the_same_logits():
    """Identical tokens (no position embedding, flat images) tie exactly under both scorings, and which
    of them fill the last places is up to rounding (measured: 1 to 4 of 4 images differ per layer). The
    logits do not depend on it: the block attends over the same multiset of tokens."""
    torch.manual_seed(0)
    stock = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    with torch.no_grad():
        stock.pos_embed.zero_()
    x = torch.ones(4, 3, 64, 64) * torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    for ratio in (0.7, 0.5):
        official_logits, _ = kept_sets(methods.apply(copy.deepcopy(stock), "idle", ratio, cheap_score=False), x)
        cheap_logits, _ = kept_sets(methods.apply(copy.deepcopy(stock), "idle", ratio), x)
        assert (official_logits - cheap_logits).abs().max() <= FAST_TOL


def test_default_scoring_is_cheap_where_exact_and_official_with_key_norm():
    deit = methods.apply(timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64), "idle", 0.5)
    assert deit.token_reduction.describe()["scoring"] == "cheap"
    geometry = deit.token_reduction.geometry
    assert deit.token_reduction.total_macs() == methods.build(geometry, "idle", 0.5, cheap_score=True).total_macs()

    torch.manual_seed(0)
    stock = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=8, num_heads=3, qk_norm=True,
                              num_classes=5).eval()
    model = methods.apply(copy.deepcopy(stock), "idle", 0.5)
    assert model.token_reduction.describe()["scoring"] == "official"
    official = methods.build(model.token_reduction.geometry, "idle", 0.5, cheap_score=False)
    assert model.token_reduction.total_macs() == official.total_macs() > methods.build(
        official.geometry, "idle", 0.5).total_macs()  # a geometry alone assumes no k_norm: cheap
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert (model(x) - straightforward(stock, "idle", 0.5, {})(x)).abs().max() <= FAST_TOL


# --- torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["none", "idle", "evit", "topk", "random", "tome"])
def test_dynamo_captures_the_whole_forward_in_one_graph(method):
    """Static shapes, indices made on the device, no Python loop over the batch and no host sync: the
    patched model is one graph for torch.compile (dynamo only; benchmarks/compat_matrix.py compiles)."""
    torch.manual_seed(0)
    stock = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    model = methods.apply(copy.deepcopy(stock), method, 0.5) if method != "none" else stock
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


def test_tome_matching_and_merge_need_no_host_sync():
    """fullgraph=True refuses anything that reads a tensor's value on the host (.item(), nonzero,
    data-dependent branches): the matching and merge trace as one graph."""
    torch.manual_seed(0)
    stock = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    model = methods.apply(copy.deepcopy(stock), "tome", 0.5)
    method, block = model.token_reduction, model.blocks[0]
    x = torch.randn(2, 17, 192)
    _, k, _ = project_qkv(block.attn, block.norm1(x))

    def merge(x, k):
        method.state.carry.clear()
        return method.merge(x, head_sum(k), 4, 0, False)

    torch._dynamo.reset()
    with torch.inference_mode():
        compiled = torch.compile(merge, backend="eager", fullgraph=True)(x, k)
        assert torch.equal(compiled, merge(x, k))
