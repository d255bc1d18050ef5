"""The FLOPs job: analytic GMACs (with and without the method's own overhead), fvcore's count of the
same forward, their relative difference, parameters, and the tokens every block processes.

The analytic count is the one reported; fvcore is the cross-check (docs/protocol.md#gmacs). A
difference above `FVCORE_TOLERANCE` means the formulas miss something this model does: the record
says so and the report flags the row.

Hierarchical models (Swin) add `stage_gmacs`, one value per stage (its PatchMerging included). An adaptive
method (ATS: a token count per image, `methods.Method.adaptive`) depends on the weights and the images:
its FLOPs job loads the weights the accuracy job would, counts every image of the eval set analytically
(`methods.flops.per_image_macs`, each image as if alone) and reports their mean as `gmacs`, with
`gmacs_min`, `gmacs_max`, `gmacs_images` and `gmacs_averaging` saying how the average was taken;
`gmacs_bound` is the static upper bound, and fvcore is checked against the analytic count of the one
image it traced.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

import methods

from .. import data
from ..models import create_model, input_size
from ..spec import JobSpec
from . import JobContext, JobKind, ReportPart, register

FVCORE_TOLERANCE = 1e-3  # relative: 0.1 %
# What an adaptive method's count depends on besides the configuration: the weights and the eval images.
ADAPTIVE_FIELDS = ("checkpoint", "pretrained", "random_weights", "data", "limit", "seed", "finetune")
ADAPTIVE_BATCH = 64  # per-image counts do not depend on the batch (tests/test_ats.py); only the speed does


def run(spec: JobSpec, context: JobContext) -> dict:
    torch.manual_seed(spec.seed)
    # Counts depend on the architecture only, so no weights are loaded: a FLOPs job needs neither the
    # checkpoint file nor a download, and a method's predictors count the same initialised or trained.
    # (An adaptive method is the exception: `_adaptive`.)
    model = create_model(spec.model).eval()
    methods.apply(model, spec.method, spec.keep_ratio, spec.layers, **spec.options())
    method = model.token_reduction
    shape = (1, *input_size(model))
    if method.adaptive:
        return _adaptive(spec, context, shape)
    fvcore = methods.flops.fvcore_macs(model, shape)
    analytic = methods.flops.analytic_macs(method, include_overhead=True)
    return _record(model, shape, fvcore, analytic, methods.flops.analytic_macs(method, include_overhead=False))


def _record(model, shape, fvcore, analytic: int, analytic_no_overhead: float) -> dict:
    method = model.token_reduction
    relative = (analytic - fvcore.total) / fvcore.total
    description = method.describe()
    out = dict(
        gmacs=analytic / 1e9,
        gmacs_no_overhead=analytic_no_overhead / 1e9,
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
        method_notes=list(description.get("notes", [])),  # what the method changed of the request (ToMe's r)
    )
    stages = method.stage_macs()
    if stages is not None:  # hierarchical models: per stage, PatchMerging included
        out["stage_gmacs"] = [macs / 1e9 for macs in stages]
    return out


def _adaptive(spec: JobSpec, context: JobContext, shape) -> dict:
    """Per-image counts over the eval set, with the weights the accuracy job would load."""
    from .accuracy import patched_model

    model = patched_model(spec, context).eval()
    method = model.token_reduction
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # what fvcore_macs traces by default
    fvcore = methods.flops.fvcore_macs(model, shape, image=image)
    analytic_image = int(methods.flops.per_image_macs(model, image)[0])
    loader = torch.utils.data.DataLoader(data.eval_dataset(spec.data, model, spec.limit),
                                         batch_size=ADAPTIVE_BATCH, shuffle=False)
    with torch.inference_mode():
        dist = methods.flops.macs_distribution(model, (images for images, _ in loader))
    out = _record(model, shape, fvcore, analytic_image, dist.mean_no_overhead)
    out.update(
        gmacs=dist.mean / 1e9, gmacs_min=dist.min / 1e9, gmacs_max=dist.max / 1e9, gmacs_images=dist.images,
        gmacs_bound=methods.flops.analytic_macs(method) / 1e9, gmacs_fvcore_image=analytic_image / 1e9,
        gmacs_averaging=(f"mean of the per-image analytic MACs over the {dist.images} eval images of {spec.data} "
                         "(each image counted alone, with its own token counts); min and max over the same "
                         "images; fvcore checked on one image against that image's analytic count"),
    )
    return out


def _is_adaptive(spec: JobSpec) -> bool:
    try:
        return bool(methods.get_method(spec.method).adaptive)
    except methods.MethodError:
        return False


@dataclass(frozen=True)
class FlopsKind(JobKind):
    """Counts depend on the configuration only, except an adaptive method's (ATS): its key keeps the
    weights and the eval data it was counted with."""

    def normalise(self, spec: JobSpec) -> JobSpec:
        out = super().normalise(spec)
        if _is_adaptive(spec):
            out = replace(out, **{name: getattr(spec, name) for name in ADAPTIVE_FIELDS})
        return out


def validate(spec: JobSpec) -> None:
    """Pre-flight of an adaptive method's FLOPs job: the accuracy job's (trained weights, readable data)."""
    if _is_adaptive(spec):
        from .accuracy import validate as validate_accuracy

        validate_accuracy(spec)


KIND = register(FlopsKind(
    name="flops", run=run, key_fields=(),
    report=ReportPart(values=("gmacs", "gmacs_no_overhead", "gmacs_fvcore", "fvcore_rel_diff", "fvcore_agrees",
                              "params_m", "tokens_per_block", "blocks", "method_notes", "stage_gmacs",
                              "gmacs_min", "gmacs_max", "gmacs_images", "gmacs_averaging")),
    depends_on=("finetune",), validate=validate,  # both matter only for an adaptive method
))
