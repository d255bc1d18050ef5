"""One reducing block: the method's fast block, its straightforward block (benchmarks/straightforward.py)
and the stock block, on the same input (what reaches the method's first reducing block)."""
from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.conftest import DEIT_S, EMBEDDED, FAST_METHODS, images, patched
from benchmarks.straightforward import make_straightforward

RATIO = 0.5


def block_input(model: torch.nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """The tokens entering block `index` of `model` for images x."""
    seen = {}
    handle = model.blocks[index].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.inference_mode():
        model(x)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("model_name", [DEIT_S, EMBEDDED])
@pytest.mark.parametrize("variant", ["fast", "straightforward", "stock"])
@pytest.mark.parametrize("method", FAST_METHODS)
def test_reducing_block(benchmark, stock_model, sizes, model_name, method, variant):
    stock = stock_model(model_name)
    options = {"cheap_score": False} if method == "idle" and variant == "straightforward" else {}
    model = patched(stock, method, RATIO, **options)
    index = model.token_reduction.layers[0]
    x = block_input(model, index, images(stock, sizes["large_batch"]))
    if variant == "straightforward":
        make_straightforward(model)
    block = copy.deepcopy(stock.blocks[index]) if variant == "stock" else model.blocks[index]
    benchmark.group = f"block {model_name} {method} keep {RATIO} batch {x.shape[0]}"
    benchmark.extra_info.update(block=index, tokens_in=x.shape[1])
    with torch.inference_mode():
        out = benchmark(block, x)
    assert out.shape[0] == x.shape[0] and out.shape[-1] == x.shape[-1]
