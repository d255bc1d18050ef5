"""The FLOPs job: analytic GMACs (with and without the method's own overhead), fvcore's count of the
same forward, their relative difference, parameters, and the tokens every block processes.

The analytic count is the one reported; fvcore is the cross-check (docs/protocol.md#gmacs). A
difference above `FVCORE_TOLERANCE` means the formulas miss something this model does: the record
says so and the report flags the row.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

import methods

from ..models import create_model, input_size
from ..spec import JobSpec
from . import JobContext, JobKind, ReportPart, register

FVCORE_TOLERANCE = 1e-3  # relative: 0.1 %


def run(spec: JobSpec, context: JobContext) -> dict:
    torch.manual_seed(spec.seed)
    # Counts depend on the architecture only, so no weights are loaded: a FLOPs job needs neither the
    # checkpoint file nor a download, and a method's predictors count the same initialised or trained.
    model = create_model(spec.model).eval()
    methods.apply(model, spec.method, spec.keep_ratio, spec.layers, **spec.options())
    method = model.token_reduction
    shape = (1, *input_size(model))
    fvcore = methods.flops.fvcore_macs(model, shape)
    analytic = methods.flops.analytic_macs(method, include_overhead=True)
    relative = (analytic - fvcore.total) / fvcore.total
    description = method.describe()
    return dict(
        gmacs=analytic / 1e9,
        gmacs_no_overhead=methods.flops.analytic_macs(method, include_overhead=False) / 1e9,
        gmacs_fvcore=fvcore.total / 1e9,
        fvcore_rel_diff=relative,
        fvcore_agrees=abs(relative) <= FVCORE_TOLERANCE,
        fvcore_gmacs_by_operator={op: macs / 1e9 for op, macs in sorted(fvcore.by_operator.items())},
        fvcore_unsupported=dict(fvcore.unsupported),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        input_shape=list(shape),
        tokens_per_block=description["tokens_per_block"],
        blocks=[asdict(block) for block in method.schedule().blocks],
        schedule=description,
    )


KIND = register(JobKind(
    name="flops", run=run, key_fields=(),
    report=ReportPart(values=("gmacs", "gmacs_no_overhead", "gmacs_fvcore", "fvcore_rel_diff", "fvcore_agrees",
                              "params_m", "tokens_per_block", "blocks")),
))
