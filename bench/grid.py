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
from .training import recipe as recipes

CPU_BATCH_SIZES, GPU_BATCH_SIZES = (1, 64), (1, 64, 256)
Variant = tuple  # (method, layers or None, options dict): one method configuration of a grid
SEED_OPTION = "seed"  # a method option of this name is the method's randomness (random keep-K): --seeds sets it


def plan(request: Request) -> Plan:
    """The checked plan of `request`; raises a ValueError subclass (one line: the bad value, the valid
    ones) for anything a user can get wrong."""
    validate.check_given_values({"--out": request.out, "--data-dir": request.data,
                                 "--checkpoint": request.checkpoint, "--device": request.device})
    names = _method_names(request.methods)
    kinds = _kinds(request.metrics)
    _check_given_files(request)
    device = request.device or _default_device()
    variants = _variants(names, request)
    specs: list[JobSpec] = []
    for model in request.models:
        # Without --methods: every method that patches this model's family (no Swin method on a ViT).
        fitting = variants if request.methods is not None else _of_family(model, variants)
        canonical = _canonical_variants(model, fitting, request.ratios)
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


def plan_many(requests: list[Request]) -> Plan:
    """One plan of several requests into one run folder (the points of a sweep): their jobs, each once."""
    if not requests:
        raise validate.UsageError("the sweep has no points; valid: at least one [[sweep]] block with values")
    plans = [plan(request) for request in requests]
    jobs_ = in_dependency_order(unique(job for p in plans for job in p.jobs))
    first = plans[0]
    return Plan(first.run_dir, tuple(jobs_), tuple(unique([*first.grid, *jobs_])), first.origin)


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
        return jobs.defaults()  # trace jobs only when asked for by name
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
    for name in names:  # --seeds sweeps a method's own seed option (docs/protocol.md#seeds)
        if request.seeds and name != "none" and SEED_OPTION in methods.get_method(name).options:
            if SEED_OPTION in option_values.get(name, {}):
                raise validate.UsageError(f"argument --method-opt: {name}.{SEED_OPTION} cannot be combined with "
                                          "--seeds, which sets it; valid: one of the two")
            option_values.setdefault(name, {})[SEED_OPTION] = list(request.seeds)
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


def _of_family(model: str, variants: list[Variant]) -> list[Variant]:
    """The variants whose method patches `model`'s family (methods.Method.families)."""
    try:
        family = methods.model_geometry(models.skeleton(model)).family
    except (models.ModelError, methods.MethodError):
        return variants  # _canonical_variants says what is wrong with the model
    return [v for v in variants if family in methods.get_method(v[0]).families]


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
        device=device, dtype=request.dtype, seed=request.seed,
    )
    specs = []
    for kind_name in kinds:
        kind = jobs.get(kind_name)
        knobs = pairs(dict(request.throughput)) if kind_name == "throughput" else ()
        if kind_name == "trace" and request.trace_images is not None:
            knobs = (("images", request.trace_images),)
        if kind_name == "acc" and request.skip_unreadable:  # in the key: such a record covers fewer images
            knobs = (("skip_unreadable", True),)
        batch_sizes = sizes if kind_name == "throughput" else (request.batch_size,)
        if kind_name == "throughput" and dict(request.throughput).get("batch_sweep"):
            batch_sizes = (max(sizes),)  # one job sweeps 1, 2, 4, ... up to the largest size
        for batch_size in batch_sizes:
            base = JobSpec(kind=kind_name, batch_size=batch_size, extra=knobs, **common)
            # The baseline is the model as released, never finetuned: what the papers compare against.
            specs.append(kind.normalise(base))
            for method, layers, options in variants:
                if method == "none":
                    continue  # the baseline row above
                finetune = _recipe(method, request.finetune)
                for seed in _seeds(method, options, finetune, request):
                    for ratio in request.ratios:
                        specs.append(kind.normalise(replace(
                            base, method=method, keep_ratio=float(ratio), layers=layers,
                            method_options=pairs(options), finetune=finetune, seed=seed)))
    return specs


def _seeds(method: str, options: dict, finetune: tuple, request: Request) -> tuple[int, ...]:
    """The spec seeds of one (canonical) variant: with --seeds, a method with a seed option runs at the
    variant's own seed (its option, which `_variants` swept), a finetuned configuration once per seed;
    everything else, whose result no seed changes, keeps --seed so that its key does not depend on
    --seeds (docs/protocol.md#seeds)."""
    if not request.seeds:
        return (request.seed,)
    option = methods.get_method(method).options.get(SEED_OPTION)
    if option is not None:
        return (int(options.get(SEED_OPTION, option.default)),)
    return tuple(request.seeds) if finetune else (request.seed,)


def _recipe(method: str, settings) -> tuple:
    """The canonical finetune recipe of `method` for the user's settings; () off the shelf."""
    if not settings:
        return ()
    try:
        return recipes.canonical(method, dict(settings))
    except recipes.RecipeError as exc:
        raise validate.UsageError(f"{exc} (method {method})") from None


def _with_dependencies(specs: list[JobSpec]) -> list[JobSpec]:
    out, frontier = list(specs), list(specs)
    while frontier:
        frontier = [upstream for spec in frontier for upstream in jobs.dependencies(spec)]
        out += frontier
    return out
