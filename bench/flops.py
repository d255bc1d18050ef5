"""The FLOPs job: analytic GMACs (with and without the method's own overhead), fvcore's count, params."""
from __future__ import annotations

from pathlib import Path

import torch

import methods

from .models import create_model, input_size
from .spec import JobSpec


def run(spec: JobSpec, run_dir: Path) -> dict:
    torch.manual_seed(spec.seed)
    # Counts depend on the architecture only, so no weights are loaded: a FLOPs job needs neither the
    # checkpoint file nor a download, and a method's predictors count the same initialised or trained.
    model = create_model(spec.model, checkpoint=None, pretrained=False).eval()
    methods.apply(model, spec.method, spec.keep_ratio, spec.layers, **spec.options())
    method = model.token_reduction
    shape = (1, *input_size(model))
    fvcore = methods.flops.fvcore_macs(model, shape)
    description = method.describe()
    return dict(
        gmacs=methods.flops.analytic_macs(method, include_overhead=True) / 1e9,
        gmacs_no_overhead=methods.flops.analytic_macs(method, include_overhead=False) / 1e9,
        gmacs_fvcore=fvcore.total / 1e9,
        fvcore_gmacs_by_operator={op: macs / 1e9 for op, macs in sorted(fvcore.by_operator.items())},
        fvcore_unsupported=dict(fvcore.unsupported),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        input_shape=list(shape),
        tokens_per_block=description["tokens_per_block"],
        schedule=description,
    )
