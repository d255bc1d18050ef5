"""pytest-benchmark suite of the fast paths (docs/PERFORMANCE.md#benchmark-suite).

    pytest benchmarks/ --benchmark-only                  # measure (minutes)
    pytest benchmarks/ -o addopts="" --benchmark-disable # run every benchmark once at tiny sizes (CI)

Kept out of the default test run (pyproject: testpaths = ["tests"], addopts --benchmark-skip). With
--benchmark-disable, or TOKENBENCH_BENCH_TINY=1, the models and batches shrink so the suite takes seconds and
only checks that every benchmark still runs. One intra-op thread unless TOKENBENCH_BENCH_THREADS says
otherwise: on a shared machine a second thread mostly measures the neighbours.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import methods
from bench.models import create_model

torch.set_num_threads(int(os.environ.get("TOKENBENCH_BENCH_THREADS", "1")))

DEIT_S, EMBEDDED = "deit_small_patch16_224", "tokenbench_vit_fmnist"
FAST_METHODS = ("idle", "evit", "topk", "random", "tome")


def tiny(config) -> bool:
    return bool(config.getoption("benchmark_disable", False)) or os.environ.get("TOKENBENCH_BENCH_TINY") == "1"


@pytest.fixture(scope="session")
def sizes(pytestconfig) -> dict:
    """Batch sizes and the DeiT-S image size: the real ones, or tiny ones when benchmarks are disabled."""
    if tiny(pytestconfig):
        return dict(small_batch=1, large_batch=2, deit_img=48)
    return dict(small_batch=1, large_batch=32, deit_img=224)


_MODELS: dict = {}


@pytest.fixture(scope="session")
def stock_model(sizes):
    """stock_model(name) -> an eval-mode stock model with random weights (cached; callers copy it)."""
    def get(name: str) -> torch.nn.Module:
        key = (name, sizes["deit_img"])
        if key not in _MODELS:
            torch.manual_seed(0)
            kwargs = dict(img_size=sizes["deit_img"]) if name == DEIT_S else {}
            _MODELS[key] = create_model(name, **kwargs).eval()
        return _MODELS[key]
    return get


def patched(stock: torch.nn.Module, method: str, ratio: float, **options) -> torch.nn.Module:
    return methods.apply(copy.deepcopy(stock), method, ratio, **options).eval()


def images(model: torch.nn.Module, batch: int) -> torch.Tensor:
    from bench.models import input_size

    return torch.randn(batch, *input_size(model), generator=torch.Generator().manual_seed(0))
