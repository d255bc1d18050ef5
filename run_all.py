#!/usr/bin/env python
"""Measure token-reduction methods on timm ViTs: accuracy, GMACs and throughput over a grid.

    python run_all.py --methods idle,evit --ratios 0.5,0.7
    python run_all.py --methods evit --ratios 0.7 --method-opt evit.fuse=false --layers evit=3,6,9
    python run_all.py --collect results/<run>          # gather a run submitted with --no-wait

Every user error ends in one line `run_all.py: error: ...` and exit code 2, before anything is written.
Failed jobs are recorded (records/<key>.error.json), listed at the end, and give exit code 1.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
import traceback
from pathlib import Path

import methods
from bench import launch, models as bench_models  # bench.models registers the embedded model
from bench.runner import RunSummary
from bench.spec import DTYPES, EMBEDDED_DATA, METRICS, Variant, expand_grid, load_grid, save_grid

PROG = "run_all.py"
CPU_BATCH_SIZES, GPU_BATCH_SIZES = "1,64", "1,64,256"


class CliError(ValueError):
    """A flag value argparse (or our parsing of it) rejects."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2 from main, instead of usage + SystemExit
        raise CliError(message)


# ----------------------------------------------------------------------------------------------
# Flag values

def _items(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _ratios(text: str) -> list[float]:
    out = []
    for item in _items(text) or [text]:
        try:
            ratio = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"keep ratio {item!r} is not a number; valid: 0 < ratio <= 1")
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise argparse.ArgumentTypeError(f"keep ratio {item!r} is out of range; valid: 0 < ratio <= 1")
        out.append(ratio)
    return out


def _positive_ints(text: str) -> list[int]:
    out = []
    for item in _items(text) or [text]:
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{item!r} is not a positive integer; valid: 1, 2, ...")
        out.append(value)
    return out


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one positive integer")
    return values[0]


def _metrics(text: str) -> list[str]:
    items = _items(text)
    bad = [m for m in items if m not in METRICS] or ([] if items else [text])
    if bad:
        raise argparse.ArgumentTypeError(f"unknown metric {bad[0]!r}; valid: {', '.join(METRICS)}")
    return list(dict.fromkeys(items))


def _method_names(text: str) -> list[str]:
    items = _items(text)
    if not items:
        raise CliError(f"argument --methods: no method in {text!r}; valid: {', '.join(methods.available())}")
    return list(dict.fromkeys(methods.canonical_name(m) for m in items))  # MethodError names the valid ones


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default only where its help text does not already say it, and never 'None'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    grid = p.add_argument_group("grid")
    grid.add_argument("--methods", default=",".join(m for m in methods.available() if m != "none"),
                      help=f"comma list of {', '.join(methods.available())}; the unpatched baseline "
                           "'none' is always measured")
    grid.add_argument("--ratios", type=_ratios, default="0.7", help="comma list of keep ratios in (0, 1]")
    grid.add_argument("--models", type=_items, default=bench_models.EMBEDDED_MODEL,
                      help="comma list of timm ViT names")
    grid.add_argument("--metrics", type=_metrics, default=",".join(METRICS), help="comma list")
    grid.add_argument("--layers", action="append", default=[], metavar="[METHOD=]I,J,K",
                      help="reduction blocks (0-based), e.g. evit=3,6,9; without METHOD= for every method; "
                           "repeat for one method to sweep layer sets")
    grid.add_argument("--method-opt", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                      help="a method option, e.g. evit.fuse=false or idle.preset=main; repeat one option "
                           "with other values to sweep it")
    setup = p.add_argument_group("measurement")
    setup.add_argument("--data-dir", default=None,
                       help="ImageNet-style folder of class sub-folders (default: embedded Fashion-MNIST)")
    weights = setup.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="FILE", default=None, help=".pth/.pt/.safetensors weights")
    weights.add_argument("--pretrained", action="store_true", help="timm's own pretrained weights")
    setup.add_argument("--batch-size", type=_positive_int, default=256, help="accuracy batch size")
    setup.add_argument("--batch-sizes", type=_positive_ints, default=None,
                       help=f"throughput batch sizes (default: {CPU_BATCH_SIZES} on CPU, {GPU_BATCH_SIZES} on GPU)")
    setup.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    setup.add_argument("--dtype", choices=DTYPES, default="fp32")
    setup.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N images only")
    setup.add_argument("--seed", type=int, default=0)
    timing = p.add_argument_group("throughput", "timing knobs (default: the device's defaults, bench/throughput.py)")
    timing.add_argument("--warmup", type=int, default=None, help="warm-up forwards per model")
    timing.add_argument("--repeats", type=int, default=None, help="timed repeats (>= 5; median and quartiles)")
    timing.add_argument("--iters", type=int, default=None, help="forwards per repeat (default: calibrated)")
    timing.add_argument("--fused-attn", choices=("on", "off"), default=None,
                        help="timm's fused attention for both models (default: timm's setting)")
    run = p.add_argument_group("run")
    run.add_argument("--out", default=None, help="run folder (default: results/<YYYYmmdd-HHMMSS>)")
    run.add_argument("--force", action="store_true", help="recompute jobs that already have records")
    run.add_argument("--retry-failed", action="store_true", help="rerun jobs whose last attempt failed")
    launch.add_arguments(p)
    return p


# ----------------------------------------------------------------------------------------------
# Grid

def _per_method(flags: list[str], flag: str, sep: str, names: list[str], bare_ok: bool) -> list[tuple[str, str]]:
    """Split `--flag METHOD<sep>REST` values into (method, rest); bare values apply to every method."""
    out = []
    for text in flags:
        head, found, rest = text.partition(sep)
        if not bare_ok and (not found or "=" in head):
            raise CliError(f"argument {flag}: {text!r} is not METHOD.OPTION=VALUE (e.g. evit.fuse=false)")
        if not found:
            out += [(name, text) for name in names if name != "none"]
            continue
        method = methods.canonical_name(head.strip())
        if method not in names:
            raise CliError(f"argument {flag}: {text!r} names method {method!r}, which is not in --methods "
                           f"({', '.join(names)})")
        out.append((method, rest))
    return out


def variants(names: list[str], layer_flags: list[str], option_flags: list[str]) -> list[Variant]:
    """Method configurations: per method, every layer set x every combination of option values."""
    layer_sets: dict[str, list[tuple[int, ...]]] = {}
    for method, text in _per_method(layer_flags, "--layers", "=", names, bare_ok=True):
        try:
            layers = tuple(int(i) for i in _items(text))
        except ValueError:
            layers = ()
        if not layers:  # 'evit=' would silently run the method with no reduction block at all
            raise CliError(f"argument --layers: {text!r} is not a comma list of block indices (e.g. 3,6,9)")
        layer_sets.setdefault(method, []).append(layers)
    option_values: dict[str, dict[str, list[str]]] = {}
    for method, text in _per_method(option_flags, "--method-opt", ".", names, bare_ok=False):
        option, found, value = text.partition("=")
        if not found or not option.strip():
            raise CliError(f"argument --method-opt: {method}.{text!r} is not METHOD.OPTION=VALUE")
        values = option_values.setdefault(method, {}).setdefault(option.strip(), [])
        values.append(value.strip())
    out = []
    for method in names:
        opts = option_values.get(method, {})
        for layers in layer_sets.get(method, [None]):
            for combo in itertools.product(*opts.values()):
                out.append(Variant(method, layers, tuple(sorted(zip(opts, combo)))))
    return out


def _skeleton(model_name: str):
    """The model's architecture on the meta device (no memory, no weights), or None for a name timm
    does not know (pre-flight names it with suggestions)."""
    import timm

    from bench import validate

    return validate.meta_model(model_name) if timm.is_model(model_name) else None


def canonical_variants(model_names: list[str], ratios: list[float], wanted: list[Variant]) -> list[Variant]:
    """Validate every variant x ratio against every model through `methods.build` (MethodError on bad
    input) and return the variants with option values coerced (`fuse=false` == `fuse=0`) and sorted layers."""
    out = list(wanted)
    for model_name in model_names:
        model = _skeleton(model_name)
        if model is None:
            continue
        try:
            out = [_canonical(model, variant, ratios) for variant in [Variant("none"), *wanted]][1:]
        except methods.MethodError as exc:
            raise methods.MethodError(f"model {model_name}: {exc}") from None
    return out


def _canonical(model, variant: Variant, ratios: list[float]) -> Variant:
    for ratio in ratios:
        built = methods.build(model, variant.method, ratio, variant.layers, **dict(variant.options))
    options = tuple((name, built.opts[name]) for name, _ in variant.options)
    layers = tuple(built.layers) if variant.layers is not None else None
    return Variant(variant.method, layers, options)


def build_specs(args: argparse.Namespace) -> list:
    import torch

    wanted = canonical_variants(args.models, args.ratios, variants(args.methods, args.layers, args.method_opt))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_sizes = args.batch_sizes or _positive_ints(CPU_BATCH_SIZES if device == "cpu" else GPU_BATCH_SIZES)
    specs = expand_grid(
        args.models, wanted, args.ratios, args.metrics, throughput_batch_sizes=batch_sizes,
        extra=dict(throughput=_throughput_knobs(args)),
        checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
        pretrained=args.pretrained, data=str(Path(args.data_dir).resolve()) if args.data_dir else EMBEDDED_DATA,
        limit=args.limit, batch_size=args.batch_size, device=device, dtype=args.dtype, seed=args.seed,
    )
    timed = [s for s in specs if s.metric == "throughput"]
    if timed:
        from bench import throughput

        throughput.knobs(timed[0])  # ThroughputError names a bad knob before anything runs
    return specs


def _throughput_knobs(args: argparse.Namespace) -> dict:
    """Only the knobs the user set, so a default run's keys do not change with the defaults' file."""
    knobs = dict(warmup=args.warmup, repeats=args.repeats, iters=args.iters,
                 fused_attn=None if args.fused_attn is None else args.fused_attn == "on")
    return {name: value for name, value in knobs.items() if value is not None}


def merged_grid(run_dir: Path, specs: list) -> list:
    """This run's specs after those an earlier run into the same folder asked for (its pending jobs stay known)."""
    earlier = load_grid(run_dir) if (run_dir / "grid.json").exists() else []
    return list({s.key: s for s in [*earlier, *specs]}.values())


# ----------------------------------------------------------------------------------------------
# Main

def _report(run_dir: Path) -> bool:
    from bench import report

    try:
        report.write_report(run_dir)
        print(report.console_table(run_dir))
        return True
    except Exception:  # the records are safe; a report bug must not hide the run's outcome
        traceback.print_exc()
        print(f"{PROG}: the report failed; rebuild it with: python -m bench.report {run_dir}", file=sys.stderr)
        return False


def _finish(summary: RunSummary, run_dir: Path, reported: bool) -> int:
    for problem in summary.problems:
        print(f"{PROG}: invalid record (recomputed or ignored): {problem}", file=sys.stderr)
    print(f"{summary.counts()}; run folder {run_dir}")
    if summary.pending:
        print(f"{len(summary.pending)} job(s) pending; gather them with: python {PROG} --collect {run_dir}")
    if summary.failed:
        print(f"{PROG}: {len(summary.failed)} job(s) failed (rerun them with --retry-failed):", file=sys.stderr)
        for key in summary.failed:
            print(f"  {key}: {summary.errors.get(key, 'failed')}", file=sys.stderr)
        return 1
    return 0 if reported else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.methods = _method_names(args.methods)  # here, not as an argparse type: keeps MethodError's text
    return args


def main(argv: list[str] | None = None) -> int:
    from bench import validate

    try:
        args = parse(argv)
        if args.collect:
            run_dir = Path(args.collect)
            load_grid(run_dir)  # a folder without grid.json is a user error, not a traceback
        else:
            specs = build_specs(args)
            run_dir = Path(args.out) if args.out else Path("results") / time.strftime("%Y%m%d-%H%M%S")
            grid = merged_grid(run_dir, specs)
            # SLURM jobs run on other machines: this one (a login node) need not have their device.
            launcher = launch.check_arguments(specs, args)  # launch flags, before anything is written
            validate.preflight(specs, run_dir, devices_here=launcher != "slurm")
    except SystemExit as stop:  # --help
        return stop.code or 0
    except ValueError as exc:  # CliError, MethodError, ModelError, DataError, UsageError, GridError
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.collect:
            summary = launch.collect(run_dir, args)
        else:
            save_grid(run_dir, grid)
            summary = launch.dispatch(specs, run_dir, args)
    except launch.LaunchError as exc:  # e.g. no cluster answering; the grid is saved for --collect
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; finished jobs are kept, the same command continues the run",
              file=sys.stderr)
        return 130
    return _finish(summary, run_dir, _report(run_dir))


if __name__ == "__main__":
    sys.exit(main())
