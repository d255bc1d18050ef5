"""Each method's own work in its first reducing block, without the block's attention and MLP: scoring,
selection and the gather / write-back (IdleViT), CLS row + top-k + gather (+ fused token) (EViT, Top-K),
the ranking + gather (random), bipartite matching + merge (ToMe)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEIT_S, EMBEDDED, FAST_METHODS, images, patched
from methods.attention import batch_rows, head_sum, project_qkv, replace_rows, take_rows
from methods.base import rel_ceil
from methods.idle import select_tokens
from benchmarks.test_bench_block import block_input

RATIO = 0.5


def idle_ops(block, x):
    layer = block.idle_layer
    x_norm = block.norm1(x)
    scores, _ = block._scores(x_norm)
    idx = select_tokens(scores, layer.keep, layer.num_prefix)
    rows = batch_rows(idx, x.shape[1])
    selected = take_rows(x, rows, idx.shape[1]) + take_rows(x_norm, rows, idx.shape[1])
    return replace_rows(x, rows, selected)


def pruning_ops(block, x, q, k):
    method, index = block.token_reduction, block.token_reduction_index
    left = rel_ceil(x.shape[1] - method.geometry.num_prefix, method.keep_ratio)
    return method.keep_top(x, method.token_scores(block.attn, q, k, index), left, index, False)


def tome_ops(block, x, k):
    method, index = block.token_reduction, block.token_reduction_index
    method.state.carry.clear()
    r = min(method.merge_counts[index], (x.shape[1] - method.geometry.num_prefix) // 2)
    return method.merge(x, head_sum(k), r, index, False)


@pytest.mark.parametrize("model_name", [DEIT_S, EMBEDDED])
@pytest.mark.parametrize("method", FAST_METHODS)
def test_method_ops(benchmark, stock_model, sizes, model_name, method):
    stock = stock_model(model_name)
    model = patched(stock, method, RATIO)
    index = model.token_reduction.layers[0]
    block = model.blocks[index]
    x = block_input(model, index, images(stock, sizes["large_batch"]))
    with torch.inference_mode():
        q, k, _ = project_qkv(block.attn, block.norm1(x))
    run = {"idle": lambda: idle_ops(block, x), "tome": lambda: tome_ops(block, x, k)}.get(
        method, lambda: pruning_ops(block, x, q, k))
    benchmark.group = f"ops {model_name} keep {RATIO} batch {x.shape[0]}"
    benchmark.extra_info.update(block=index, tokens_in=x.shape[1])
    with torch.inference_mode():
        out = benchmark(run)
    assert out.shape[0] == x.shape[0]
