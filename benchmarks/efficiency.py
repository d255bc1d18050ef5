"""Efficiency of token-reduction methods: speedup over the unpatched model divided by the GMAC ratio.

    python benchmarks/efficiency.py --model deit_small_patch16_224 --batch-sizes 32,1 --ratios 0.7,0.5
    python benchmarks/efficiency.py --model tokenbench_vit_fmnist --batch-sizes 64
    python benchmarks/efficiency.py --methods idle --ratios 0.5 --against straightforward

Every cell times the patched model against a second model with the throughput job's own protocol
(`bench.jobs.throughput.measure`: both in this process, interleaved ABBA/BAAB quartets, the median of
the per-repeat ratios with an order-statistics interval), so machine drift cancels. GMACs are the
analytic counts with the method's overhead (`total_macs()`), so efficiency 1.0 means every saved
multiply-accumulate turned into time (docs/PERFORMANCE.md).

`--against stock` (default): the unpatched model. `--against straightforward`: the same method with its
blocks swapped to the straightforward implementations of benchmarks/straightforward.py, so the speedup is
what the fast paths buy. `--package NAME` patches with another copy of the methods package (a checkout of
the code before a change, put on PYTHONPATH), for before/after figures. `--oracle` times the method's
oracle instead (benchmarks/oracle.py: stock blocks on its token schedule, selection for free) with the
overhead-free GMACs: what the schedule alone can give on this machine.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.jobs.throughput import measure, set_fused_attn  # noqa: E402
from bench.models import create_model, seed_everything  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: the platform's own description
        pass
    return platform.processor() or platform.machine()


def build_pair(model_name: str, method: str, ratio: float, against: str, package: str = "methods",
               fused_attn: bool | None = None, options: dict | None = None, oracle: bool = False):
    """(patched model, the model it is timed against, GMACs of each per image)."""
    methods = importlib.import_module(package)
    seed_everything(0)
    stock = create_model(model_name).eval()
    if fused_attn is not None:
        set_fused_attn(stock, fused_attn)
    model = methods.apply(copy.deepcopy(stock), method, ratio, **(options or {}))
    gmacs = model.token_reduction.total_macs() / 1e9
    if oracle:
        from benchmarks.oracle import make_oracle

        gmacs = model.token_reduction.total_macs(include_overhead=False) / 1e9
        model = make_oracle(model)
    if against == "stock":
        other, other_gmacs = stock, methods.build(stock, "none").total_macs() / 1e9
    elif against == "straightforward":
        from benchmarks.straightforward import make_straightforward

        other = make_straightforward(methods.apply(copy.deepcopy(stock), method, ratio, **(options or {})))
        other_gmacs = other.token_reduction.total_macs() / 1e9
        if method == "idle":  # the straightforward path scores with keys of every token (official)
            other_gmacs = methods.build(stock, "idle", ratio, **dict(options or {}, cheap_score=False)).total_macs() / 1e9
    else:
        raise SystemExit(f"--against {against!r}: valid: stock, straightforward")
    return model, other, gmacs, other_gmacs


def run_cell(model_name, method, ratio, batch, args) -> dict:
    options = dict(kv.split("=", 1) for kv in args.opt) if args.opt else {}
    fused = None if args.fused_attn is None else args.fused_attn == "on"
    model, other, gmacs, other_gmacs = build_pair(model_name, method, ratio, args.against, args.package, fused,
                                                  options, args.oracle)
    if args.compile:
        model, other = torch.compile(model), torch.compile(other)
    result = measure(model, other, batch, warmup=args.warmup, repeats=args.repeats, max_repeats=args.max_repeats,
                     ci_target=args.ci_target, iters=args.iters, repeat_s=args.repeat_s)
    ideal = other_gmacs / gmacs
    return dict(model=model_name, method=method, ratio=ratio, batch=result["batch_size"], against=args.against,
                oracle=args.oracle,
                gmacs=gmacs, other_gmacs=other_gmacs, speedup=result["speedup"],
                ci_low=result["speedup_ci_low"], ci_high=result["speedup_ci_high"],
                efficiency=result["speedup"] / ideal, eff_low=result["speedup_ci_low"] / ideal,
                eff_high=result["speedup_ci_high"] / ideal, repeats=result["repeats"], iters=result["iters"],
                spread=result["spread"], latency_ms=result["latency_ms"],
                other_latency_ms=result["baseline_latency_ms"], threads=torch.get_num_threads(),
                compiled=bool(args.compile), package=args.package, cpu=cpu_name())


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--methods", default="idle,evit,topk,random,tome")
    p.add_argument("--ratios", default="0.7,0.5")
    p.add_argument("--batch-sizes", default="32")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: steadiest on a shared machine)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-repeats", type=int, default=9)
    p.add_argument("--ci-target", type=float, default=0.01)
    p.add_argument("--iters", type=int, default=None, help="forwards per timing (default: calibrated)")
    p.add_argument("--repeat-s", type=float, default=0.3, help="seconds per timing when calibrating")
    p.add_argument("--against", default="stock", choices=("stock", "straightforward"))
    p.add_argument("--package", default="methods", help="the methods package that patches (default: methods)")
    p.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE", help="a method option")
    p.add_argument("--fused-attn", choices=("on", "off"), default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile both models (fullgraph=False)")
    p.add_argument("--oracle", action="store_true", help="time the method's oracle (benchmarks/oracle.py)")
    p.add_argument("--json", default=None, help="append one JSON line per cell to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    rows = []
    print(f"# {cpu_name()}, {args.threads} thread(s), torch {torch.__version__}, against {args.against}"
          f"{', oracle' if args.oracle else ''}{', compiled' if args.compile else ''}")
    print("| model | method | keep | batch | GMACs | speedup [CI] | efficiency [CI] | repeats | spread |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in map(int, args.batch_sizes.split(",")):
        for ratio in map(float, args.ratios.split(",")):
            for method in args.methods.split(","):
                row = run_cell(args.model, method, ratio, batch, args)
                rows.append(row)
                print(f"| {args.model} | {method} | {ratio:g} | {row['batch']} | {row['gmacs']:.3f} / "
                      f"{row['other_gmacs']:.3f} | {row['speedup']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] "
                      f"| {row['efficiency']:.3f} [{row['eff_low']:.3f}, {row['eff_high']:.3f}] | {row['repeats']} "
                      f"| {row['spread']:.3f} |", flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
