"""Whole-model forwards: every fast method against the unpatched model, at batch 1 and batch 32, on DeiT-S
and on the embedded model. pytest-benchmark groups the rows by model and batch, so the unpatched row of a
group is the reference of its methods (for ratios with intervals use benchmarks/efficiency.py)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEIT_S, EMBEDDED, FAST_METHODS, images, patched

RATIO = 0.5


@pytest.mark.parametrize("batch_kind", ["small_batch", "large_batch"])
@pytest.mark.parametrize("model_name", [DEIT_S, EMBEDDED])
@pytest.mark.parametrize("method", ("none",) + FAST_METHODS)
def test_model_forward(benchmark, stock_model, sizes, model_name, batch_kind, method):
    stock = stock_model(model_name)
    model = stock if method == "none" else patched(stock, method, RATIO)
    batch = sizes[batch_kind]
    x = images(stock, batch)
    gmacs = (model.token_reduction.total_macs() if method != "none" else
             patched(stock, "none", 1.0).token_reduction.total_macs()) / 1e9
    benchmark.group = f"model {model_name} batch {batch}"
    benchmark.extra_info.update(method=method, keep=RATIO, gmacs_per_image=round(gmacs, 4))
    with torch.inference_mode():
        out = benchmark(model, x)
    assert out.shape[0] == batch and torch.isfinite(out).all()
