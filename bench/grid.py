"""Planning: a `Request` becomes a checked `Plan` of job specs, with nothing written yet.

`plan(request)` is the one place that
- expands the grid: per model, every method variant (layer sets x option values) x keep ratio x kind,
  the unpatched baseline once per model and conditions, throughput once per batch size;
- canonicalises every configuration, so that equal ones get equal keys however they were spelled
  (`--layers idle=3,...,11` is the default layer set: no layers; `evit.fuse=true` is the default: no
  option), by building each method once per model x variant x ratio on the model's meta skeleton;
- adds the jobs each job depends on (a finetune job before the accuracy job of its checkpoint);
- validates the whole grid (`bench.validate.preflight`) before anything is written.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path

import methods

from . import data, jobs, models, provenance, records, validate
from .dispatch import resolve_launcher
from .dispatch.runner import in_dependency_order, unique
from .request import Request
from .spec import EMBEDDED_DATA, JobSpec, Plan, pairs

CPU_BATCH_SIZES, GPU_BATCH_SIZES = (1, 64), (1, 64, 256)
Variant = tuple  # (method, layers or None, options dict): one method configuration of a grid


def plan(request: Request) -> Plan:
    """The checked plan of `request`; raises a ValueError subclass (one line: the bad value, the valid
    ones) for anything a user can get wrong."""
    names = _method_names(request.methods)
    kinds = _kinds(request.metrics)
    _check_given_files(request)
    device = request.device or _default_device()
    variants = _variants(names, request)
    specs: list[JobSpec] = []
    for model in request.models:
        canonical = _canonical_variants(model, variants, request.ratios)
        specs += _expand(model, canonical, request, kinds, device)
    specs = in_dependency_order(unique(_with_dependencies(specs)))
    run_dir = Path(request.out) if request.out else Path("results") / time.strftime("%Y%m%d-%H%M%S")
    devices_here = resolve_launcher(request.dispatch.launcher) != "slurm"  # a login node need not have the GPUs
    if devices_here:  # the device asked for, even where no job reads it (FLOPs are counted on the CPU)
        validate.check_device(device)
        validate.check_dtype_runs(device, request.dtype)
    validate.preflight(specs, run_dir, devices_here=devices_here)
    earlier = records.load_grid(run_dir) if (run_dir / records.GRID_FILE).exists() else []
    grid = unique([*earlier, *specs])
    return Plan(run_dir, tuple(specs), tuple(grid), provenance.checkout())


def _check_given_files(request: Request) -> None:
    """A checkpoint or data folder the user named is checked even where no job of the grid reads it
    (a FLOPs-only grid): a mistyped path is a mistake to say, not to ignore."""
    try:
        for model in request.models:
            if request.checkpoint:
                models.check_checkpoint(model, request.checkpoint)
        if request.data:
            data.check_data(request.data)
    except ValueError as exc:  # ModelError, DataError: their message names the file
        raise validate.UsageError(str(exc)) from None


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _method_names(given) -> list[str]:
    if given is None:
        return [m for m in methods.available() if m != "none"]
    if not given:
        raise validate.UsageError(f"no method given; valid: {', '.join(methods.available())}")
    try:
        return list(dict.fromkeys(methods.canonical_name(m) for m in given))
    except methods.MethodError as exc:
        raise validate.UsageError(str(exc)) from None


def _kinds(given) -> list[str]:
    valid = jobs.measuring()
    if given is None:
        return valid
    bad = [kind for kind in given if kind not in valid] or ([] if given else ["(none)"])
    if bad:
        raise validate.UsageError(f"unknown metric {bad[0]!r}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(given))


def _variants(names: list[str], request: Request) -> list[Variant]:
    """Method configurations as given: per method, every layer set x every combination of option values."""
    layer_sets: dict[str, list[tuple[int, ...]]] = {}
    for method, layers in request.layer_sets:
        targets = [n for n in names if n != "none"] if method is None else [_in_grid(method, names, "--layers")]
        for name in targets:
            layer_sets.setdefault(name, []).append(tuple(layers))
    option_values: dict[str, dict[str, list]] = {}
    for method, option, value in request.method_options:
        name = _in_grid(method, names, "--method-opt")
        values = option_values.setdefault(name, {}).setdefault(option, [])
        if value not in values:
            values.append(value)
    out = []
    for name in names:
        opts = option_values.get(name, {})
        for layers in layer_sets.get(name, [None]):
            for combo in itertools.product(*opts.values()):
                out.append((name, layers, dict(zip(opts, combo))))
    return out


def _in_grid(method: str, names: list[str], flag: str) -> str:
    try:
        name = methods.canonical_name(method)
    except methods.MethodError as exc:
        raise validate.UsageError(f"argument {flag}: {exc}") from None
    if name not in names:
        raise validate.UsageError(f"argument {flag}: method {name!r} is not in --methods ({', '.join(names)})")
    return name


def _canonical_variants(model: str, variants: list[Variant], ratios) -> list[Variant]:
    """Every variant checked against the model at every ratio through `methods.build` (once each), in
    its canonical spelling: default layers as None, options equal to their defaults left out."""
    try:
        skeleton = models.skeleton(model)
    except models.ModelError as exc:
        raise validate.UsageError(str(exc)) from None
    out = []
    for name, layers, options in variants:
        try:
            for ratio in ratios:
                built = methods.build(skeleton, name, ratio, layers, **options)
            canonical = methods.canonical_config(name, built.geometry.depth, layers, **options)
        except methods.MethodError as exc:  # the model matters here (depth, CLS token, blocks): name it
            raise validate.UsageError(f"model {model}: {exc}") from None
        out.append((name, canonical.layers, canonical.options))
    return out


def _expand(model: str, variants: list[Variant], request: Request, kinds: list[str], device: str) -> list[JobSpec]:
    """Per kind (and throughput batch size): the baseline, then every variant x keep ratio."""
    sizes = request.batch_sizes or (CPU_BATCH_SIZES if device == "cpu" else GPU_BATCH_SIZES)
    common = dict(
        model=model, checkpoint=str(Path(request.checkpoint).resolve()) if request.checkpoint else None,
        pretrained=request.pretrained, random_weights=request.random_weights,
        data=str(Path(request.data).resolve()) if request.data else EMBEDDED_DATA, limit=request.limit,
        device=device, dtype=request.dtype, seed=request.seed, finetune=pairs(dict(request.finetune)),
    )
    specs = []
    for kind_name in kinds:
        kind = jobs.get(kind_name)
        knobs = pairs(dict(request.throughput)) if kind_name == "throughput" else ()
        for batch_size in (sizes if kind_name == "throughput" else (request.batch_size,)):
            base = JobSpec(kind=kind_name, batch_size=batch_size, extra=knobs, **common)
            # The baseline is the model as released, never finetuned: what the papers compare against.
            specs.append(kind.normalise(replace(base, finetune=())))
            for method, layers, options in variants:
                if method == "none":
                    continue  # the baseline row above
                for ratio in request.ratios:
                    specs.append(kind.normalise(replace(base, method=method, keep_ratio=float(ratio),
                                                        layers=layers, method_options=pairs(options))))
    return specs


def _with_dependencies(specs: list[JobSpec]) -> list[JobSpec]:
    out, frontier = list(specs), list(specs)
    while frontier:
        frontier = [upstream for spec in frontier for upstream in jobs.dependencies(spec)]
        out += frontier
    return out
