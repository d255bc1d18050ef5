"""Where a method's time goes: torch.profiler tables of the patched model and of the unpatched one, same
input, same thread count, side by side (docs/PERFORMANCE.md#where-the-time-goes).

    python benchmarks/profile_method.py --model deit_small_patch16_224 --method tome --ratio 0.5 --batch 1

Prints, per model, the operators sorted by self CPU time (the profiler adds a few microseconds to every
operator, so small operators look more expensive than they are; compare the two tables, not absolute
times), then the operators whose total self time differs most between the two.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from bench.models import create_model, input_size, seed_everything  # noqa: E402
from benchmarks.efficiency import cpu_name  # noqa: E402


@torch.inference_mode()
def profiled(net, x, iters: int):
    for _ in range(2):
        net(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            net(x)
    return prof.key_averages()


def self_times(averages) -> dict[str, tuple[float, int]]:
    """name -> (self CPU ms per forward summed over calls, calls)."""
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in averages}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--method", default="idle")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=18)
    p.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    stock = create_model(args.model).eval()
    model = methods.apply(copy.deepcopy(stock), args.method, args.ratio, **dict(kv.split("=", 1) for kv in args.opt))
    x = torch.randn(args.batch, *input_size(stock))
    print(f"# {args.model}, {args.method} keep {args.ratio:g}, batch {args.batch}, {cpu_name()}, "
          f"{args.threads} thread(s), {args.iters} forwards profiled, torch {torch.__version__}\n")
    tables = {}
    for name, net in ((args.method, model), ("unpatched", stock)):
        averages = profiled(net, x, args.iters)
        tables[name] = self_times(averages)
        total = sum(ms for ms, _ in tables[name].values()) / args.iters
        print(f"## {name}: {total:.2f} ms self CPU per forward\n")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    method_t, stock_t = tables[args.method], tables["unpatched"]
    print(f"## per forward: {args.method} minus unpatched, by operator (ms, calls)\n")
    deltas = sorted(((method_t.get(k, (0, 0))[0] - stock_t.get(k, (0, 0))[0]) / args.iters, k)
                    for k in set(method_t) | set(stock_t))
    for delta, key in deltas[:8] + [("...", "")] + deltas[-8:] if len(deltas) > 16 else deltas:
        if key:
            calls = (method_t.get(key, (0, 0))[1] - stock_t.get(key, (0, 0))[1]) // args.iters
            print(f"{key:55s} {delta:+9.3f} ms  {calls:+5d} calls")
        else:
            print("...")


if __name__ == "__main__":
    main()
