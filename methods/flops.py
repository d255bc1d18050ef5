"""Multiply-accumulate counts: the analytic model of docs/methods.md#cost-model and an fvcore cross-check.

Both count one multiply-add as one operation ("GFLOPs" in the token-reduction papers are GMACs)
and both count only matrix products: linear layers, the patch-embedding convolution, q k^T and
A v. Norms, softmax, GELU and element-wise ops count zero; fvcore's LayerNorm handle is switched
off for that reason (it would add ~0.2 % on DeiT-S). With each method's own matrix products in its
analytic overhead (IdleViT's scoring, EViT's recomputed CLS row and fused token, DynamicViT's
predictors, ToMe's matching), the two agree to the MAC for every method on every architecture
`Geometry.from_model` accepts; it refuses the ones the analytic model does not cover.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from .base import Method

# fvcore's default handles for these count element-wise work that the analytic model leaves out.
# They are replaced by a zero count: fvcore's `set_op_handle(op, None)` does not override a default.
_UNCOUNTED_NORMS = ("aten::layer_norm", "aten::group_norm", "aten::batch_norm", "aten::instance_norm")
# Fused attention: torch.jit traces the public op on every device; the private kernels are covered
# in case a trace records them instead.
_SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)
# An unsupported op whose name contains one of these would silently drop real matrix work.
_MATMUL_CLASS = ("matmul", "mm", "mv", "dot", "linear", "einsum", "conv", "attention")


class FlopCountError(RuntimeError):
    """fvcore met a matrix-product op it cannot count, so its total would be wrong."""


@dataclass(frozen=True)
class FvcoreCount:
    total: int  # MACs for one image
    by_operator: dict[str, int]  # fvcore's operator names ("linear", "matmul", "conv", ...) -> MACs
    unsupported: dict[str, int]  # op -> times seen; only element-wise / indexing ops (checked)


def analytic_macs(method: Method, include_overhead: bool = True) -> int:
    """MACs of one image through the configured method (e.g. `model.token_reduction`).

    include_overhead=False leaves out the method's own machinery (DynamicViT predictors, IdleViT's
    full-N key projection and CLS scoring, ToMe's matching): only what stock blocks on the selected
    tokens cost, which is how some papers report their figures.
    """
    return int(method.total_macs(include_overhead=include_overhead))


def sdpa_macs(inputs, outputs) -> int:
    """fvcore handle for scaled_dot_product_attention: q k^T and A v, B*H*Nq*Nk*(d + dv) MACs."""
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    *batch, n_query, head_dim = q_shape
    return prod(batch) * n_query * k_shape[-2] * (head_dim + v_shape[-1])


def _not_counted(inputs, outputs) -> int:
    return 0


def is_matmul_class(op: str) -> bool:
    return any(key in op.split("::")[-1] for key in _MATMUL_CLASS)


def fvcore_macs(model: nn.Module, input_shape) -> FvcoreCount:
    """Trace `model` in eval mode on one random image of `input_shape` ((C, H, W) or (B, C, H, W); the
    batch is always 1) and count its MACs with fvcore. Raises FlopCountError if a matrix-product op
    went uncounted."""
    with warnings.catch_warnings():  # fvcore's import warns about torch.jit.script deprecation
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    reference = next(model.parameters())
    image = torch.randn((1, *tuple(input_shape)[-3:]), generator=torch.Generator().manual_seed(0))
    image = image.to(device=reference.device, dtype=reference.dtype)
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, image)
        analysis.set_op_handle(**{op: sdpa_macs for op in _SDPA_OPS}, **{op: _not_counted for op in _UNCOUNTED_NORMS})
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total = analysis.total()
            by_operator = dict(analysis.by_operator())
            unsupported = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    uncounted = sorted(op for op in unsupported if is_matmul_class(op))
    if uncounted:
        raise FlopCountError(
            f"fvcore cannot count {', '.join(uncounted)} (matrix products); register a handle for them"
        )
    return FvcoreCount(total=int(total), by_operator={k: int(v) for k, v in by_operator.items()},
                       unsupported=unsupported)
