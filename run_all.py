#!/usr/bin/env python
"""Measure token-reduction methods on timm ViTs: accuracy, GMACs and throughput over a grid.

    python run_all.py --methods idle,evit --ratios 0.5,0.7
    python run_all.py --methods evit --ratios 0.7 --method-opt evit.fuse=false --layers evit=3,6,9
    python run_all.py --collect results/<run>          # gather a run submitted with --no-wait

This file only parses: argv becomes a typed `bench.request.Request`, then `bench.grid.plan` checks and
expands it, `bench.dispatch` runs it and `bench.report` writes the tables. Every user error ends in one
line `run_all.py: error: ...` and exit code 2, before anything is written. Failed jobs are recorded
(records/<key>.error.json), listed at the end, and give exit code 1.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from bench.request import DEFAULT_ARRAY_PARALLELISM, DEFAULT_TIME, LAUNCHERS, DispatchOptions, Request
from bench.spec import DTYPES, EMBEDDED_MODEL

PROG = "run_all.py"


class CliError(ValueError):
    """A flag value argparse (or our parsing of it) rejects."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2 from main, instead of usage + SystemExit
        raise CliError(message)


# ----------------------------------------------------------------------------------------------
# Flag values

def _items(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in str(text).split(",") if item.strip())


def _ratios(text: str) -> tuple[float, ...]:
    out = []
    for item in _items(text) or (text,):
        try:
            ratio = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"keep ratio {item!r} is not a number; valid: 0 < ratio <= 1")
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise argparse.ArgumentTypeError(f"keep ratio {item!r} is out of range; valid: 0 < ratio <= 1")
        out.append(ratio)
    return tuple(out)


def _positive_ints(text: str) -> tuple[int, ...]:
    out = []
    for item in _items(text) or (text,):
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{item!r} is not a positive integer; valid: 1, 2, ...")
        out.append(value)
    return tuple(out)


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one positive integer")
    return values[0]


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0; valid: 0, 1, 2, ...")
    return value


def _seed_list(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2), each once, in the order given."""
    out = []
    for item in _items(text) or (text,):
        if not item.isdigit():
            raise argparse.ArgumentTypeError(f"seed {item!r} is not an integer >= 0; valid: e.g. 0,1,2")
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number; valid: e.g. 1, 2.5")
    return value


def _setting(text: str) -> tuple[str, str]:
    """'NAME=VALUE' -> (name, value); the recipe checks both."""
    name, found, value = text.partition("=")
    if not (found and name.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. lr=1e-4)")
    return name.strip(), value.strip()


def _layer_set(text: str) -> tuple[str | None, tuple[int, ...]]:
    """'[METHOD=]I,J,K' -> (method or None for every method, block indices)."""
    head, found, rest = text.rpartition("=") if "=" in text else ("", False, text)
    try:
        layers = tuple(int(i) for i in _items(rest))
    except ValueError:
        layers = ()
    if not layers:  # 'evit=' would silently run the method with no reduction block at all
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of block indices (e.g. 3,6,9 or evit=3,6,9)")
    return (head.strip() or None) if found else None, layers


def _method_option(text: str) -> tuple[str, str, str]:
    """'METHOD.OPTION=VALUE' -> (method, option, value); values are checked by the method."""
    target, found, value = text.partition("=")
    method, dot, option = target.partition(".")
    if not (found and dot and method.strip() and option.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not METHOD.OPTION=VALUE (e.g. evit.fuse=false)")
    return method.strip(), option.strip(), value.strip()


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
    grid.add_argument("--methods", type=_items, default=None,
                      help="comma list of method names (default: every registered method; see methods/); the "
                           "unpatched baseline 'none' is always measured")
    grid.add_argument("--ratios", type=_ratios, default=(0.7,), help="comma list of keep ratios in (0, 1]")
    grid.add_argument("--models", type=_items, default=(EMBEDDED_MODEL,), help=f"comma list of timm ViT names (default: {EMBEDDED_MODEL})")
    grid.add_argument("--metrics", type=_items, default=None,
                      help="comma list of job kinds to measure: acc, flops, throughput (the default set) and trace "
                           "(decision traces for the agreement report)")
    grid.add_argument("--layers", type=_layer_set, action="append", default=[], metavar="[METHOD=]I,J,K",
                      help="reduction blocks (0-based), e.g. evit=3,6,9; without METHOD= for every method; "
                           "repeat for one method to sweep layer sets")
    grid.add_argument("--method-opt", type=_method_option, action="append", default=[],
                      metavar="METHOD.OPTION=VALUE", help="a method option, e.g. evit.fuse=false or "
                      "idle.preset=main; repeat one option with other values to sweep it")
    setup = p.add_argument_group("measurement")
    setup.add_argument("--data-dir", default=None,
                       help="ImageNet-style folder of class sub-folders (default: embedded Fashion-MNIST)")
    weights = setup.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="FILE", default=None, help=".pth/.pt/.safetensors weights")
    weights.add_argument("--pretrained", action="store_true", help="timm's own pretrained weights")
    weights.add_argument("--random-weights", action="store_true",
                         help="evaluate an untrained model on purpose (otherwise refused: its accuracy means nothing)")
    setup.add_argument("--skip-unreadable", action="store_true",
                       help="accuracy: leave out images that cannot be decoded (the record lists them) "
                            "instead of failing the job")
    setup.add_argument("--batch-size", type=_positive_int, default=256, help="accuracy batch size")
    setup.add_argument("--batch-sizes", type=_positive_ints, default=None,
                       help="throughput batch sizes (default: 1,64 on CPU, 1,64,256 on GPU)")
    setup.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    setup.add_argument("--dtype", choices=DTYPES, default="fp32")
    setup.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N images only")
    setup.add_argument("--seed", type=_non_negative_int, default=0)
    setup.add_argument("--seeds", type=_seed_list, default=None, metavar="S,S,...",
                       help="run every seed-dependent configuration (a method with a seed option, e.g. random; "
                            "a finetuned one) once per seed; the others keep --seed (docs/protocol.md#seeds)")
    setup.add_argument("--trace-images", type=_positive_int, default=None,
                       help="trace jobs (--metrics trace): trace the first N eval images (default 1000, "
                            "within --limit)")
    timing = p.add_argument_group("throughput", "timing knobs (default: the device's defaults, "
                                  "bench/jobs/throughput.py)")
    timing.add_argument("--warmup", type=_non_negative_int, default=None, help="warm-up forwards per model")
    timing.add_argument("--repeats", type=_positive_int, default=None,
                        help="timed repeats at least (>= 5; more until the speedup's CI is narrow)")
    timing.add_argument("--max-repeats", type=_positive_int, default=None, help="timed repeats at most")
    timing.add_argument("--iters", type=_positive_int, default=None, help="forwards per timing (default: calibrated)")
    timing.add_argument("--fused-attn", choices=("on", "off"), default=None,
                        help="timm's fused attention for both models (default: timm's setting)")
    timing.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the patched model and its baseline alike (fullgraph=False)")
    timing.add_argument("--batch-sweep", action="store_true", default=None,
                        help="time batch 1, 2, 4, ... up to the largest --batch-sizes and report the smallest "
                             "batch at which each method beats the unpatched model")
    tune = p.add_argument_group("finetuning", "finetune every method configuration before its accuracy job "
                                "(docs/methods.md#training-summary); the baseline stays the released model")
    tune.add_argument("--finetune-epochs", type=_positive_float, default=None,
                      help="epochs of finetuning (fractions allowed); without it everything is off the shelf")
    tune.add_argument("--finetune-opt", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                      help="a recipe setting, e.g. lr=1e-4, distill=kl, cut_weight=10 (bench/training/recipe.py)")
    tune.add_argument("--train-dir", default=None,
                      help="ImageNet-style training folder (default: the embedded Fashion-MNIST training subset)")
    run = p.add_argument_group("run")
    run.add_argument("--sweep", metavar="FILE", default=None,
                     help="an ablation sweep (TOML or YAML, see sweeps/): its points are crossed with these flags")
    run.add_argument("--out", default=None, help="run folder (default: results/<YYYYmmdd-HHMMSS>)")
    run.add_argument("--force", action="store_true", help="recompute jobs that already have records")
    run.add_argument("--retry-failed", action="store_true", help="rerun jobs whose last attempt failed")
    _dispatch_arguments(p)
    return p


def _dispatch_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("dispatch", "Where jobs run. local/slurm jobs write their records straight "
                                 "into the run folder: it must be on a filesystem they share.")
    group.add_argument("--launcher", choices=LAUNCHERS, default=None,
                       help="inline: in this process (the default); local: one submitit subprocess per free "
                            "GPU, one job at a time on CPU; slurm: job arrays through sbatch; auto: slurm if "
                            "sbatch is on PATH, else local if a GPU is visible, else inline. With --collect "
                            "the default is the launcher the run was submitted with")
    group.add_argument("--time", default=DEFAULT_TIME,
                       help="time limit per job, local and slurm: minutes or SLURM's [D-]HH:MM:SS")
    group.add_argument("--no-wait", action="store_true",
                       help="slurm: return once the jobs are queued; gather them later with --collect RUN_DIR")
    group.add_argument("--collect", metavar="RUN_DIR", default=None,
                       help="gather a submitted run (grid.json + records) and say what is still pending or "
                            "was lost; with --retry-failed resubmit the failed and lost jobs")
    slurm = p.add_argument_group("slurm", "SLURM settings of every job (sbatch options)")
    for flag in ("--partition", "--account", "--qos", "--constraint"):
        slurm.add_argument(flag, default=None)
    slurm.add_argument("--gpus-per-node", type=_non_negative_int, default=None,
                       help="GPUs per job (default: 1 for jobs on a cuda device, else none)")
    slurm.add_argument("--cpus-per-task", type=_positive_int, default=None)
    slurm.add_argument("--mem", default=None, help="memory per job in SLURM syntax, e.g. 32G")
    slurm.add_argument("--exclusive", action="store_true", help="every job gets a whole node")
    slurm.add_argument("--no-throughput-exclusive", dest="throughput_exclusive", action="store_false",
                       help="let timing jobs share their node (by default each gets a whole node, so that "
                            "nothing else runs beside a timing)")
    slurm.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                       help="shell line run before each job, e.g. 'module load cuda; source venv/bin/activate' "
                            "(repeatable)")
    slurm.add_argument("--finetune-gpus", type=_positive_int, default=1,
                       help="GPUs of each finetune job, one data-parallel process each (DDP), local and slurm")
    slurm.add_argument("--array-parallelism", type=_positive_int, default=DEFAULT_ARRAY_PARALLELISM,
                       help="at most this many tasks of one array run at once")
    slurm.add_argument("--max-array-size", type=_positive_int, default=None,
                       help="jobs per array at most (default: MaxArraySize of 'scontrol show config', else 1000)")


# Flags that shape the grid: meaningless with --collect, which takes the grid from the run folder.
_GRID_FLAGS = ("methods", "ratios", "models", "metrics", "layers", "method_opt", "data_dir", "checkpoint",
               "pretrained", "random_weights", "skip_unreadable", "batch_size", "batch_sizes", "device", "dtype", "limit", "seed",
               "seeds", "trace_images", "warmup", "repeats", "max_repeats", "iters", "fused_attn", "compile",
               "batch_sweep", "out", "finetune_epochs", "finetune_opt", "sweep",
               "train_dir")


def parse(argv: list[str] | None = None) -> tuple[Request, str | None]:
    """argv -> (the typed request, the run folder of --collect or None). Raises CliError / LaunchError."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.collect is not None:
        if not args.collect.strip():
            raise CliError("argument --collect: an empty folder name; valid: a run folder written by run_all.py")
        defaults = vars(parser.parse_args([]))
        given = [f"--{name.replace('_', '-')}" for name in _GRID_FLAGS if vars(args)[name] != defaults[name]]
        if given:
            raise CliError(f"argument --collect: {given[0]} cannot be combined with it; the grid comes from "
                           f"{args.collect}/grid.json (valid with --collect: --retry-failed, --launcher and the "
                           "dispatch flags)")
    options = DispatchOptions(
        launcher=args.launcher, time=args.time, no_wait=args.no_wait, force=args.force,
        retry_failed=args.retry_failed, partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        mem=args.mem, exclusive=args.exclusive, throughput_exclusive=args.throughput_exclusive,
        slurm_setup=tuple(args.slurm_setup), array_parallelism=args.array_parallelism,
        max_array_size=args.max_array_size, finetune_gpus=args.finetune_gpus,
    )
    knobs = dict(warmup=args.warmup, repeats=args.repeats, max_repeats=args.max_repeats, iters=args.iters,
                 fused_attn=None if args.fused_attn is None else args.fused_attn == "on",
                 compile=args.compile, batch_sweep=args.batch_sweep)
    finetune = {}
    if args.finetune_epochs is not None or args.finetune_opt or args.train_dir:
        if args.finetune_epochs is None:
            raise CliError("argument --finetune-opt/--train-dir: finetuning needs --finetune-epochs N")
        finetune = dict(args.finetune_opt, epochs=args.finetune_epochs)
        if args.train_dir:
            finetune["train_data"] = str(Path(args.train_dir).resolve())
    request = Request(
        models=args.models, methods=args.methods, ratios=args.ratios, metrics=args.metrics,
        layer_sets=tuple(args.layers), method_options=tuple(args.method_opt), data=args.data_dir,
        checkpoint=args.checkpoint, pretrained=args.pretrained, random_weights=args.random_weights,
        skip_unreadable=args.skip_unreadable,
        batch_size=args.batch_size, batch_sizes=args.batch_sizes, device=args.device, dtype=args.dtype,
        limit=args.limit, seed=args.seed, seeds=args.seeds, trace_images=args.trace_images,
        # only the knobs the user set, so a default run's keys do not change with the defaults' file
        throughput=tuple((k, v) for k, v in knobs.items() if v is not None),
        finetune=tuple(sorted(finetune.items())), dispatch=options, sweep=args.sweep,
        # one folder for every point of a sweep, named once
        out=args.out if args.out is not None or not args.sweep else time.strftime("results/%Y%m%d-%H%M%S"),
    )
    return request, args.collect


# ----------------------------------------------------------------------------------------------
# Main

def _finish(summary, run_dir: Path, reported: bool) -> int:
    for problem in summary.problems:
        print(f"{PROG}: invalid record (recomputed or ignored): {problem}", file=sys.stderr)
    print(f"{summary.counts()}; run folder {run_dir}")
    if summary.pending:
        print(f"{len(summary.pending)} job(s) pending; gather them with: python {PROG} --collect {run_dir}")
    for key, reason in summary.blocked.items():
        print(f"{PROG}: {key} not run: {reason}", file=sys.stderr)
    if summary.failed:
        print(f"{PROG}: {len(summary.failed)} job(s) failed (rerun them with --retry-failed):", file=sys.stderr)
        for key in summary.failed:
            print(f"  {key}: {summary.errors.get(key, 'failed')}", file=sys.stderr)
        return 1
    return 0 if reported and not summary.blocked else 1


def main(argv: list[str] | None = None) -> int:
    try:
        request, collect_dir = parse(argv)
        from bench import dispatch, grid, report  # here: Ctrl-C during these imports is one line too

        if collect_dir is not None:
            run_dir = Path(collect_dir)
            summary = dispatch.collect(run_dir, request.dispatch)
        elif request.sweep is not None:
            from bench import sweep

            plan = grid.plan_many(sweep.expand(request.sweep, request))
        else:
            plan = grid.plan(request)
            run_dir = Path(plan.run_dir)
            summary = dispatch.dispatch(plan, request.dispatch)
    except SystemExit as stop:  # --help
        return stop.code or 0
    except KeyboardInterrupt as stop:
        advice = getattr(stop, "advice", "finished jobs are kept; the same command continues the run")
        print(f"\n{PROG}: interrupted; {advice}", file=sys.stderr)
        return 130
    except ValueError as exc:  # CliError, LaunchError, UsageError, GridError, MethodError, ...
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the run folder's disk (full, read-only): finished records are kept
        print(f"{PROG}: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        reported = report.write_after_run(run_dir, PROG)
    except KeyboardInterrupt:  # the records are written; only the report is missing
        print(f"\n{PROG}: interrupted while writing the report; rebuild it with: python -m bench.report {run_dir}",
              file=sys.stderr)
        return 130
    return _finish(summary, run_dir, reported)


if __name__ == "__main__":
    sys.exit(main())
