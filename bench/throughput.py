"""The throughput job: images/s of a patched model and of its unpatched baseline, measured together.

Protocol (harness.md §3.8): eval() + inference_mode, synthetic input made on the device at the
model's own input size, warm-up, the clock read after a device synchronize, >= 5 repeats reported
as median and quartiles, autocast for bf16/fp16, CUDA peak memory, and the baseline timed in the
same process, interleaved with the method (repeat i runs method then baseline, repeat i+1 the other
way round), so that machine-wide slowdowns hit both and the per-repeat speedup ratio cancels them.
Both models are stock timm modules with the same fused-attention setting.

Knobs come from `spec.extra`: warmup (iterations per model), repeats, iters (forwards per timed
repeat; default: calibrated so that one repeat takes about `repeat_s` seconds) and fused_attn.
"""
from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from torch import nn

import methods

from .models import autocast, create_model, input_size, seed_everything
from .spec import JobSpec

# CPU defaults keep a default run (embedded model, ~7 configs x batch sizes 1 and 64) near a minute.
DEFAULTS = {
    "cpu": dict(warmup=3, repeats=5, iters=None, repeat_s=0.15, fused_attn=None),  # no autotuning to burn
    "cuda": dict(warmup=25, repeats=7, iters=None, repeat_s=0.5, fused_attn=None),
}


class ThroughputError(ValueError):
    """A measurement knob the user set that is not valid."""


def measure(model: nn.Module, baseline: nn.Module, batch_size: int, device: str = "cpu",
            dtype: str = "fp32", warmup: int = 10, repeats: int = 5, iters: int | None = None,
            repeat_s: float = 0.15) -> dict:
    """Time `model` against `baseline` at `batch_size`, halving the batch on out-of-memory."""
    requested = batch_size
    while True:
        try:
            result = _measure_at(model, baseline, batch_size, device, dtype, warmup, repeats, iters, repeat_s)
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


@torch.inference_mode()
def _measure_at(model, baseline, batch_size, device, dtype, warmup, repeats, iters, repeat_s) -> dict:
    model.eval().to(device)
    baseline.eval().to(device)
    x = torch.randn(batch_size, *input_size(model), device=device)
    sync = _synchronizer(device)
    with autocast(device, dtype):
        for net in (model, baseline):
            for _ in range(warmup):
                net(x)
        sync()
        peak_mb = _peak_memory_mb(model, baseline, x, device)
        baseline_peak_mb = _peak_memory_mb(baseline, model, x, device)
        if iters is None:  # calibrate on the slower model so both get the same number of forwards
            one = max(_timed(net, x, 1, sync) for net in (model, baseline))
            iters = max(1, math.ceil(repeat_s / max(one, 1e-9)))
        times = {"method": [], "baseline": []}
        for i in range(repeats):
            order = (("method", model), ("baseline", baseline))
            for name, net in (order if i % 2 == 0 else order[::-1]):
                times[name].append(_timed(net, x, iters, sync))
    img_s = [batch_size * iters / t for t in times["method"]]
    baseline_img_s = [batch_size * iters / t for t in times["baseline"]]
    ratios = [m / b for m, b in zip(img_s, baseline_img_s)]
    return dict(
        batch_size=batch_size,
        img_s=median(img_s), img_s_q25=float(np.percentile(img_s, 25)), img_s_q75=float(np.percentile(img_s, 75)),
        img_s_all=img_s,
        baseline_img_s=median(baseline_img_s), baseline_img_s_all=baseline_img_s,
        speedup=median(ratios), speedup_all=ratios,
        latency_ms=1e3 * median(times["method"]) / iters,
        baseline_latency_ms=1e3 * median(times["baseline"]) / iters,
        peak_mem_mb=peak_mb, baseline_peak_mem_mb=baseline_peak_mb,
        repeats=repeats, warmup=warmup, iters=iters,
        fused_attn=fused_attn_of(model), dtype=dtype, device=str(device),
        input_shape=list(x.shape),
    )


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


def knobs(spec: JobSpec) -> dict:
    """The measurement knobs of a job: its device type's defaults, overridden by `spec.extra`."""
    defaults = DEFAULTS["cuda" if torch.device(spec.device).type == "cuda" else "cpu"]
    extra = dict(spec.extra)
    unknown = sorted(set(extra) - set(defaults) - {"workers"})  # workers: the accuracy job's knob
    if unknown:
        raise ThroughputError(f"unknown throughput setting {unknown[0]!r}; valid: {', '.join(defaults)}")
    out = dict(defaults, **{k: v for k, v in extra.items() if k in defaults})
    for name in ("warmup", "repeats", "iters"):
        value = out[name]
        minimum = 0 if name == "warmup" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ThroughputError(f"throughput {name}={value!r} is not valid; valid: an integer >= {minimum}")
    if out["fused_attn"] is not None and not isinstance(out["fused_attn"], bool):
        raise ThroughputError(f"throughput fused_attn={out['fused_attn']!r} is not valid; valid: true, false")
    if out["repeats"] < 5:
        raise ThroughputError(f"throughput repeats={out['repeats']!r} is too few for a median and "
                              "quartiles; valid: an integer >= 5")
    return out


def run(spec: JobSpec, run_dir: Path) -> dict:
    """Measure one batch size. Weights are random: the work a forward does depends on the
    architecture and the method's token counts, not on weight values, so no file or download."""
    settings = knobs(spec)
    if torch.device(spec.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(spec.seed)
    baseline = create_model(spec.model)
    model = create_model(spec.model)
    model.load_state_dict(baseline.state_dict())
    methods.apply(model, spec.method, spec.keep_ratio, spec.layers, **spec.options())
    if settings["fused_attn"] is not None:
        for net in (model, baseline):
            set_fused_attn(net, settings["fused_attn"])
    result = measure(model, baseline, spec.batch_size, spec.device, spec.dtype, warmup=settings["warmup"],
                     repeats=settings["repeats"], iters=settings["iters"], repeat_s=settings["repeat_s"])
    return dict(result, tokens_per_block=list(model.token_reduction.schedule().tokens_attn),
                tf32=bool(torch.backends.cuda.matmul.allow_tf32), threads=torch.get_num_threads())
