"""Compatibility matrix: method x {eager, torch.compile} x {SDPA math, SDPA flash / memory-efficient, explicit
attention}. Every cell says whether the patched model runs, whether its logits match the eager model with
the default attention, which attention kernels it actually ran, and its speedup over the unpatched model
run the same way (interleaved timing, bench.jobs.throughput.measure).

    python benchmarks/compat_matrix.py --model tokenbench_vit_fmnist --batch 64 --out compat.md

Attention settings: `math` forces SDPA's math backend (torch.nn.attention.sdpa_kernel), `flash` allows
only the flash and memory-efficient backends (on CPU: the flash kernel for CPU; where neither applies SDPA
raises, and the cell says so), `explicit` sets timm's `fused_attn=False` (matmul + softmax). Both models
of a cell get the same setting and, under `compile`, both are compiled (fullgraph=False, inductor).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from bench.jobs.throughput import measure, set_fused_attn  # noqa: E402
from bench.models import create_model, input_size, seed_everything  # noqa: E402
from benchmarks.efficiency import cpu_name  # noqa: E402
from methods.attention import sdpa_kernels  # noqa: E402

ATTENTION = {
    "math": (True, [SDPBackend.MATH]),
    "flash": (True, [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]),
    "explicit": (False, None),
}
MATCH_TOL = 1e-4  # fp32 logits; kernels differ by ~1e-6, another token choice by far more


def attention_context(setting: str):
    backends = ATTENTION[setting][1]
    return sdpa_kernel(backends) if backends else nullcontext()


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"


@torch.inference_mode()
def cell(stock, method, ratio, setting, mode, x, reference, timing) -> dict:
    fused, _ = ATTENTION[setting]
    base = copy.deepcopy(stock)
    set_fused_attn(base, fused)
    model = base if method == "none" else methods.apply(copy.deepcopy(base), method, ratio)
    out = dict(method=method, attention=setting, mode=mode)
    torch._dynamo.reset()
    if mode == "compile":
        model, base = torch.compile(model), torch.compile(base)
    try:
        with attention_context(setting):
            start = time.perf_counter()
            logits = model(x)
            out["first_call_s"] = time.perf_counter() - start
            kernels = sdpa_kernels(model, x)
            # inductor lowers SDPA into its own generated kernels: no aten SDPA op is left to see
            out["kernels"] = ["inductor"] if mode == "compile" and kernels == ["explicit"] else kernels
            result = measure(model, base, x.shape[0], **timing)
    except Exception as exc:  # a cell that does not run is a result of the matrix, not a crash of it
        return dict(out, runs=False, error=first_line(exc))
    delta = float((logits - reference).abs().max())
    return dict(out, runs=True, max_delta=delta, matches=delta <= MATCH_TOL, speedup=result["speedup"],
                ci_low=result["speedup_ci_low"], ci_high=result["speedup_ci_high"], repeats=result["repeats"])


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| method | attention | mode | runs | max abs Δ logits vs eager | matches | kernels "
             "| speedup [CI] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["runs"]:
            lines.append(f"| {r['method']} | {r['attention']} | {r['mode']} | yes | {r['max_delta']:.1e} | "
                         f"{'yes' if r['matches'] else 'NO'} | {', '.join(r['kernels'])} | "
                         f"{r['speedup']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
        else:
            lines.append(f"| {r['method']} | {r['attention']} | {r['mode']} | no: {r['error']} | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tokenbench_vit_fmnist")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--methods", default="none,idle,evit,topk,random,tome,dynamicvit")
    p.add_argument("--attention", default="math,flash,explicit")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="write the Markdown table here")
    p.add_argument("--json", default=None, help="append one JSON line per cell")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    stock = create_model(args.model).eval()
    x = torch.randn(args.batch, *input_size(stock), generator=torch.Generator().manual_seed(0))
    timing = dict(warmup=2, repeats=args.repeats, max_repeats=args.repeats, iters=args.iters, repeat_s=0.2)
    rows = []
    for method in args.methods.split(","):
        with torch.inference_mode():  # the reference: eager, timm's default attention (fused SDPA)
            ref_model = stock if method == "none" else methods.apply(copy.deepcopy(stock), method, args.ratio)
            reference = ref_model(x)
        for setting in args.attention.split(","):
            for mode in args.modes.split(","):
                row = cell(stock, method, args.ratio, setting, mode, x, reference, timing)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(dict(row, model=args.model, batch=args.batch)) + "\n")
    header = (f"{args.model}, batch {args.batch}, keep {args.ratio:g}, fp32, {cpu_name()}, {args.threads} "
              f"thread(s), torch {torch.__version__}")
    text = markdown(rows, header)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
