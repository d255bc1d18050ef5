"""The throughput job: images/s of a patched model and of its unpatched baseline, measured together.

Protocol (docs/protocol.md#throughput): eval() + inference_mode, synthetic input made on the device at
the model's own input size, warm-up, the clock read after a device synchronize, autocast for
bf16/fp16, CUDA peak memory. The baseline is timed in the same process, interleaved with the method
in balanced quartets (repeat i times A B B A, repeat i+1 B A A B, A = method, B = baseline), so a
linear drift within a repeat cancels and neither side goes first more often. Each repeat gives one
speedup ratio; the reported speedup is their median, with a distribution-free confidence interval
from order statistics. Repeats continue past `repeats` until that interval is narrower than
`ci_target` (relative half-width) or `max_repeats` is reached. The unpatched model measured against
a second copy of itself (the `none` job of every grid) is the null comparison: its interval is the
run's noise floor.

Knobs come from `spec.extra`: warmup, repeats (the minimum), max_repeats, ci_target, iters (forwards
per timing; default calibrated to about `repeat_s` seconds), fused_attn, compile (both models through
`torch.compile`, fullgraph=False) and batch_sweep (measure batch 1, 2, 4, ... up to the job's batch size
and find the break-even batch, docs/protocol.md#latency-batch-break-even). The record names the SDPA
kernels each model actually ran (`sdpa_kernels`, read from the profiler after the timing).
"""
from __future__ import annotations

import gc
import math
import os
import time
from contextlib import contextmanager
from statistics import median

import numpy as np
import torch
from scipy import stats as sps
from torch import nn

import methods

from ..models import autocast, create_model, input_size, seed_everything
from ..spec import JobSpec
from . import JobContext, JobKind, ReportPart, register

_SHARED = dict(fused_attn=None, compile=False, batch_sweep=False)
DEFAULTS = {
    "cpu": dict(warmup=3, repeats=5, max_repeats=15, ci_target=0.02, iters=None, repeat_s=0.1, **_SHARED),
    "cuda": dict(warmup=25, repeats=7, max_repeats=30, ci_target=0.01, iters=None, repeat_s=0.25, **_SHARED),
}
TIMING_KNOBS = ("warmup", "repeats", "max_repeats", "ci_target", "iters", "repeat_s")
UNSTABLE_SPREAD = 1.10  # q75 / q25 of the method's img/s above this: the machine was not quiet
CONFIDENCE = 0.95


class ThroughputError(ValueError):
    """A measurement knob the user set that is not valid."""


def median_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free CI of the median from order statistics: with n sorted values, the interval
    from x[l] to x[n-1-l] covers the median with probability 1 - 2 P(Bin(n, 1/2) <= l - 1). `l` is the
    largest that keeps this at or above `confidence`; with too few values it is 0, the whole range."""
    x = np.sort(np.asarray(values, dtype=float))
    n, tail = len(x), (1 - confidence) / 2
    k = int(sps.binom.ppf(tail, n, 0.5))  # the smallest k with P(X <= k) >= tail
    low = k if sps.binom.cdf(k, n, 0.5) > tail else k + 1  # values below the interval: P(X <= low-1) <= tail
    low = min(max(low, 0), (n - 1) // 2)
    return float(x[low]), float(x[n - 1 - low])


def measure(model: nn.Module, baseline: nn.Module, batch_size: int, device: str = "cpu",
            dtype: str = "fp32", warmup: int = 10, repeats: int = 5, max_repeats: int | None = None,
            ci_target: float = 0.0, iters: int | None = None, repeat_s: float = 0.1) -> dict:
    """Time `model` against `baseline` at `batch_size`, halving the batch on out-of-memory."""
    requested = batch_size
    while True:
        try:
            result = _measure_at(model, baseline, batch_size, device, dtype, warmup, repeats,
                                 max(repeats, max_repeats or repeats), ci_target, iters, repeat_s)
            return dict(result, requested_batch_size=requested)
        except Exception as exc:
            if not is_out_of_memory(exc) or batch_size == 1:
                raise
        # Out of the except block: the exception's traceback holds the failed forward's frames (input,
        # activations); only once it is gone can the allocator give that memory back.
        batch_size //= 2
        _free_memory(device)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def quartet(i: int) -> tuple[str, ...]:
    """The order of repeat i: A B B A, then B A A B, alternately (A = method, B = baseline)."""
    return ("method", "baseline", "baseline", "method") if i % 2 == 0 else ("baseline", "method", "method", "baseline")


@torch.inference_mode()
def _measure_at(model, baseline, batch_size, device, dtype, warmup, repeats, max_repeats, ci_target,
                iters, repeat_s) -> dict:
    model.eval().to(device)
    baseline.eval().to(device)
    nets = {"method": model, "baseline": baseline}
    x = torch.randn(batch_size, *input_size(model), device=device)
    sync = _synchronizer(device)
    with autocast(device, dtype):
        for net in nets.values():
            for _ in range(warmup):
                net(x)
        sync()
        peak_mb = _peak_memory_mb(model, baseline, x, device)
        baseline_peak_mb = _peak_memory_mb(baseline, model, x, device)
        if iters is None:  # calibrate on the slower model so both get the same number of forwards
            one = max(_timed(net, x, 1, sync) for net in nets.values())
            iters = max(1, math.ceil(repeat_s / max(one, 1e-9)))
        times = {"method": [], "baseline": []}  # one entry per repeat: the sum of its two timings
        ratios = []
        while len(ratios) < max_repeats:
            spent = {"method": 0.0, "baseline": 0.0}
            for name in quartet(len(ratios)):
                spent[name] += _timed(nets[name], x, iters, sync)
            for name in spent:
                times[name].append(spent[name] / 2)
            ratios.append(spent["baseline"] / spent["method"])
            if len(ratios) >= repeats and _narrow(ratios, ci_target):
                break
    img_s = [batch_size * iters / t for t in times["method"]]
    baseline_img_s = [batch_size * iters / t for t in times["baseline"]]
    low, high = median_ci(ratios)
    q25, q75 = float(np.percentile(img_s, 25)), float(np.percentile(img_s, 75))
    return dict(
        batch_size=batch_size,
        img_s=median(img_s), img_s_q25=q25, img_s_q75=q75, img_s_all=img_s,
        baseline_img_s=median(baseline_img_s), baseline_img_s_all=baseline_img_s,
        speedup=median(ratios), speedup_ci_low=low, speedup_ci_high=high, speedup_all=ratios,
        spread=q75 / q25, unstable=q75 / q25 > UNSTABLE_SPREAD,
        latency_ms=1e3 * median(times["method"]) / iters,
        baseline_latency_ms=1e3 * median(times["baseline"]) / iters,
        peak_mem_mb=peak_mb, baseline_peak_mem_mb=baseline_peak_mb,
        repeats=len(ratios), warmup=warmup, iters=iters, order="ABBA/BAAB",
        fused_attn=fused_attn_of(model), baseline_fused_attn=fused_attn_of(baseline),
        dtype=dtype, device=str(device), input_shape=list(x.shape),
    )


def _narrow(ratios: list[float], target: float) -> bool:
    low, high = median_ci(ratios)
    return (high - low) / 2 <= target * median(ratios)


def _timed(net: nn.Module, x: torch.Tensor, iters: int, sync) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        net(x)
    sync()
    return time.perf_counter() - start


def _synchronizer(device: str):
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None  # CPU ops have finished when the call returns


def _peak_memory_mb(net: nn.Module, other: nn.Module, x: torch.Tensor, device: str) -> float | None:
    """CUDA peak of one forward of `net`: its weights, the input and activations; the other model's
    resident weights, which the allocator's peak also counts, are taken out. None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    net(x)
    torch.cuda.synchronize(device)
    other_bytes = sum(t.numel() * t.element_size() for t in (*other.parameters(), *other.buffers()))
    return (torch.cuda.max_memory_allocated(device) - other_bytes) / 2**20


def _free_memory(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def fused_attn_of(model: nn.Module) -> bool | None:
    """Whether the model's attention modules take the fused SDPA path (timm's per-module switch)."""
    flags = {bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")}
    if len(flags) == 1:
        return flags.pop()
    from timm.layers import use_fused_attn

    return bool(use_fused_attn()) if not flags else None  # None: mixed


def set_fused_attn(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = bool(enabled)


def job_cpus() -> int:
    """CPUs this job holds: its affinity mask, capped by SLURM's allocation when SLURM set one."""
    held = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(held, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else held


@contextmanager
def job_settings(device: str, threads: int):
    """Per-job torch settings, restored afterwards: the thread count and cuDNN autotuning."""
    old_threads, old_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = torch.device(device).type == "cuda"
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_benchmark


def knobs(spec: JobSpec) -> dict:
    """The measurement knobs of a job: its device type's defaults, overridden by `spec.extra`."""
    defaults = DEFAULTS["cuda" if torch.device(spec.device).type == "cuda" else "cpu"]
    extra = dict(spec.extra)
    unknown = sorted(set(extra) - set(defaults))
    if unknown:
        raise ThroughputError(f"unknown throughput setting {unknown[0]!r}; valid: {', '.join(defaults)}")
    out = dict(defaults, **extra)
    for name in ("warmup", "repeats", "max_repeats", "iters"):
        value = out[name]
        minimum = 0 if name == "warmup" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ThroughputError(f"throughput {name}={value!r} is not valid; valid: an integer >= {minimum}")
    if out["fused_attn"] is not None and not isinstance(out["fused_attn"], bool):
        raise ThroughputError(f"throughput fused_attn={out['fused_attn']!r} is not valid; valid: true, false")
    for name in ("compile", "batch_sweep"):
        if not isinstance(out[name], bool):
            raise ThroughputError(f"throughput {name}={out[name]!r} is not valid; valid: true, false")
    if out["compile"] and out["warmup"] < 1:  # else the calibration forward would time the compilation
        raise ThroughputError("throughput compile=True needs warmup >= 1 (the first forward compiles)")
    if out["repeats"] < 5:
        raise ThroughputError(f"throughput repeats={out['repeats']!r} is too few for a median and "
                              "quartiles; valid: an integer >= 5")
    out["max_repeats"] = max(out["max_repeats"], out["repeats"])
    return out


def break_even(points: list[dict]) -> int | None:
    """The smallest batch size whose speedup interval lies above 1 (the method beats the unpatched
    model), or None when no measured batch does."""
    wins = [p["batch_size"] for p in points if p["speedup_ci_low"] > 1.0]
    return min(wins) if wins else None


def sweep_sizes(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    sizes = [1 << i for i in range(limit.bit_length()) if 1 << i < limit]
    return sizes + [limit]


SWEEP_FIELDS = ("batch_size", "speedup", "speedup_ci_low", "speedup_ci_high", "img_s", "baseline_img_s",
                "latency_ms", "baseline_latency_ms", "repeats", "iters", "spread")


def batch_sweep(model: nn.Module, baseline: nn.Module, limit: int, device: str, dtype: str, **timing) -> dict:
    """`measure` at every size of `sweep_sizes(limit)`, smallest first, in this process; it stops at the
    first size that ran out of memory (measured at the halved size it fell back to). The result is the
    largest size's measurement with the whole curve (`batch_sweep`) and its `break_even_batch`."""
    points, result = [], None
    for size in sweep_sizes(limit):
        result = measure(model, baseline, size, device, dtype, **timing)
        points.append({k: result[k] for k in SWEEP_FIELDS})
        if result["batch_size"] < size:
            break
    return dict(result, batch_sweep=points, break_even_batch=break_even(points))


@torch.inference_mode()
def kernels_of(net: nn.Module, batch_size: int, device: str, dtype: str) -> list[str]:
    """The SDPA kernels one forward of `net` runs at this batch size (methods.attention.sdpa_kernels)."""
    from methods.attention import sdpa_kernels

    x = torch.randn(batch_size, *input_size(net), device=device)
    with autocast(device, dtype):
        return sdpa_kernels(net, x)


def run(spec: JobSpec, context: JobContext) -> dict:
    """Measure one batch size (or, with batch_sweep, every size up to it). Weights are random: the work a
    forward does depends on the architecture and the method's token counts, not on weight values, so no
    file or download."""
    settings = knobs(spec)
    threads = job_cpus()
    with job_settings(spec.device, threads):
        seed_everything(spec.seed)
        baseline = create_model(spec.model)
        model = create_model(spec.model)
        model.load_state_dict(baseline.state_dict())
        methods.apply(model, spec.method, spec.keep_ratio, spec.layers, **spec.options())
        schedule = model.token_reduction.schedule()
        if settings["fused_attn"] is not None:
            for net in (model, baseline):
                set_fused_attn(net, settings["fused_attn"])
        if settings["compile"]:  # both alike, so the speedup compares like with like
            model, baseline = torch.compile(model), torch.compile(baseline)
        timing = {k: settings[k] for k in TIMING_KNOBS}
        if settings["batch_sweep"]:
            result = batch_sweep(model, baseline, spec.batch_size, spec.device, spec.dtype, **timing)
        else:
            result = measure(model, baseline, spec.batch_size, spec.device, spec.dtype, **timing)
        kernels = {f"{prefix}sdpa_kernels": kernels_of(net, result["batch_size"], spec.device, spec.dtype)
                   for prefix, net in (("", model), ("baseline_", baseline))}
        cudnn_benchmark = torch.backends.cudnn.benchmark
    return dict(result, **kernels, compiled=settings["compile"], tokens_per_block=list(schedule.tokens_attn),
                tf32=bool(torch.backends.cuda.matmul.allow_tf32), threads=threads, cudnn_benchmark=cudnn_benchmark)


def validate(spec: JobSpec) -> None:
    knobs(spec)


KIND = register(JobKind(
    name="throughput", run=run, key_fields=("batch_size", "device", "dtype", "seed", "extra"),
    report=ReportPart(renames=dict(device="tp_device", dtype="tp_dtype", batch_size="tp_batch_size"),
                      conditions=("tp_device", "tp_dtype", "tp_batch_size"),
                      values=("batch_size_used", "device_name", "img_s", "img_s_q25", "img_s_q75", "baseline_img_s",
                              "speedup", "speedup_ci_low", "speedup_ci_high", "unstable", "spread", "latency_ms",
                              "peak_mem_mb", "repeats", "threads", "compiled", "break_even_batch")),
    holds_device=True, validate=validate,
))
