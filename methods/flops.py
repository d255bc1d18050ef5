"""Multiply-accumulate counts: the analytic model of docs/methods.md#cost-model and an fvcore cross-check.

Both count one multiply-add as one operation ("GFLOPs" in the token-reduction papers are GMACs)
and both count only matrix products: linear layers, the patch-embedding convolution, q k^T and
A v. Norms, softmax, GELU and element-wise ops count zero; fvcore's LayerNorm handle is switched
off for that reason (it would add ~0.2 % on DeiT-S). With each method's own matrix products in its
analytic overhead (IdleViT's scoring, EViT's recomputed CLS row and fused token, DynamicViT's
predictors, ToMe's matching), the two agree to the MAC for every method on every architecture
`Geometry.from_model` accepts; it refuses the ones the analytic model does not cover.

Adaptive methods (ATS) keep a different number of tokens per image: `per_image_macs` runs a traced forward
and gives each image's analytic MACs (as if it ran alone), `MacsDistribution` their mean, min and max over
an evaluation set, and `fvcore_macs(..., image=x)` the cross-check traced on that one image.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from math import prod
from typing import Iterable

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
    by_module: dict[str, int] = field(default_factory=dict)  # module name ("layers.2", "blocks.3") -> MACs


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


def fvcore_macs(model: nn.Module, input_shape, image: torch.Tensor | None = None) -> FvcoreCount:
    """Trace `model` in eval mode on one random image of `input_shape` ((C, H, W) or (B, C, H, W); the
    batch is always 1), or on `image` ((C, H, W) or (1, C, H, W)) when given: an adaptive method's count
    depends on the image. Counts its MACs with fvcore; raises FlopCountError if a matrix-product op went
    uncounted."""
    with warnings.catch_warnings():  # fvcore's import warns about torch.jit.script deprecation
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    reference = next(model.parameters())
    if image is None:
        image = torch.randn((1, *tuple(input_shape)[-3:]), generator=torch.Generator().manual_seed(0))
    image = image.reshape(1, *image.shape[-3:]).to(device=reference.device, dtype=reference.dtype)
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
            by_module = {name: int(macs) for name, macs in analysis.by_module().items()}
            unsupported = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    uncounted = sorted(op for op in unsupported if is_matmul_class(op))
    if uncounted:
        raise FlopCountError(
            f"fvcore cannot count {', '.join(uncounted)} (matrix products); register a handle for them"
        )
    return FvcoreCount(total=int(total), by_operator={k: int(v) for k, v in by_operator.items()},
                       unsupported=unsupported, by_module=by_module)


# ---------------------------------------------------------------------------------------------
# Per-image counts (adaptive methods)


@torch.no_grad()
def per_image_macs(model: nn.Module, images: torch.Tensor, include_overhead: bool = True) -> torch.Tensor:
    """(B,) int64 analytic MACs of every image of `images` (B, C, H, W) through the patched `model`, each as
    if run alone. A method whose counts do not depend on the image gives its `total_macs` for each; an
    adaptive one (ATS) runs one eval forward with tracing on and prices each image's own schedule."""
    return _per_image(model, images, (include_overhead,))[0]


def _per_image(model: nn.Module, images: torch.Tensor, overheads: tuple[bool, ...]) -> list[torch.Tensor]:
    """`per_image_macs` for each of `overheads`, from one forward."""
    method = model.token_reduction
    if not method.adaptive:
        return [torch.full((images.shape[0],), analytic_macs(method, o), dtype=torch.int64) for o in overheads]
    was_training, was_tracing = model.training, method.state.trace
    model.eval()
    method.state.trace = True
    try:
        with torch.no_grad():
            model(images)
        return [method.macs_per_image(o) for o in overheads]
    finally:
        method.state.trace = was_tracing
        model.train(was_training)


@dataclass(frozen=True)
class MacsDistribution:
    """Per-image analytic MACs over an evaluation set: the mean (the figure reported), min and max, and the
    mean without the method's own overhead."""

    mean: float
    min: int
    max: int
    images: int
    mean_no_overhead: float

    def as_gmacs(self) -> dict:
        return dict(gmacs_mean=self.mean / 1e9, gmacs_min=self.min / 1e9, gmacs_max=self.max / 1e9,
                    gmacs_images=self.images, gmacs_no_overhead_mean=self.mean_no_overhead / 1e9)


def macs_distribution(model: nn.Module, batches: Iterable[torch.Tensor]) -> MacsDistribution:
    """Mean, min and max of `per_image_macs` over every image of `batches` (an iterable of (B, C, H, W)),
    one forward per batch."""
    total = plain_total = count = 0
    low = high = None
    for images in batches:
        macs, plain = _per_image(model, images, (True, False))
        total, plain_total, count = total + int(macs.sum()), plain_total + int(plain.sum()), count + int(macs.numel())
        low = int(macs.min()) if low is None else min(low, int(macs.min()))
        high = int(macs.max()) if high is None else max(high, int(macs.max()))
    if not count:
        raise ValueError("no images to count")
    return MacsDistribution(mean=total / count, min=low, max=high, images=count, mean_no_overhead=plain_total / count)
