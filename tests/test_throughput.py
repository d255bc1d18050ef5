"""The throughput protocol's structure: fields, interleaving, arithmetic, OOM back-off. No timing asserts."""
from __future__ import annotations

from statistics import median

import numpy as np
import pytest
import timm
import torch

from bench import models, throughput
from bench.spec import JobSpec
from bench.throughput import ThroughputError

FAST = dict(warmup=1, repeats=5, iters=1)
TINY = dict(img_size=32, patch_size=16, num_classes=4, embed_dim=32, depth=2, num_heads=2)


def tiny_pair():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY), timm.create_model("vit_tiny_patch16_224", **TINY)


def test_measure_returns_the_documented_fields():
    model, baseline = tiny_pair()
    r = throughput.measure(model, baseline, batch_size=3, **FAST)
    assert r["batch_size"] == r["requested_batch_size"] == 3
    assert r["input_shape"] == [3, 3, 32, 32]
    assert len(r["img_s_all"]) == len(r["baseline_img_s_all"]) == 5
    assert all(v > 0 for v in r["img_s_all"] + r["baseline_img_s_all"])
    # the summary statistics are those of the per-repeat lists
    assert r["img_s"] == median(r["img_s_all"]) and r["baseline_img_s"] == median(r["baseline_img_s_all"])
    assert r["img_s_q25"] == pytest.approx(np.percentile(r["img_s_all"], 25))
    assert r["img_s_q25"] <= r["img_s"] <= r["img_s_q75"]
    ratios = [m / b for m, b in zip(r["img_s_all"], r["baseline_img_s_all"])]
    assert r["speedup"] == pytest.approx(median(ratios))  # median of ratios, not ratio of medians
    # one timed repeat is `iters` batches: latency and img/s describe the same median repeat
    assert r["latency_ms"] == pytest.approx(1e3 * 3 / r["img_s"], rel=1e-9)
    assert r["peak_mem_mb"] is None and r["baseline_peak_mem_mb"] is None  # CPU
    assert (r["repeats"], r["warmup"], r["iters"], r["dtype"], r["device"]) == (5, 1, 1, "fp32", "cpu")
    assert r["fused_attn"] == timm.layers.use_fused_attn()


def test_method_and_baseline_are_interleaved_alternating_order():
    model, baseline = tiny_pair()
    calls = []
    for name, net in (("m", model), ("b", baseline)):
        net.register_forward_hook(lambda *_, name=name: calls.append(name))
    throughput.measure(model, baseline, batch_size=2, warmup=2, repeats=5, iters=3)
    assert len(calls) == 2 + 2 + 5 * 2 * 3  # warm-up, then 5 repeats of 3 batches per model (CPU: no
    timed = calls[4:]                       # peak-memory forward, iters given: no calibration)
    per_repeat = ["".join(timed[i:i + 6]) for i in range(0, len(timed), 6)]
    assert per_repeat == ["mmmbbb", "bbbmmm", "mmmbbb", "bbbmmm", "mmmbbb"]
    assert calls[:4] == ["m", "m", "b", "b"]  # warm-up of both before any timing


def test_iterations_are_calibrated_when_not_given():
    model, baseline = tiny_pair()
    r = throughput.measure(model, baseline, batch_size=2, warmup=1, repeats=5, iters=None, repeat_s=0.0)
    assert r["iters"] == 1  # a zero time budget still runs one batch per repeat


def _fail_once(net, exc: BaseException, above: int = 0):
    """Make `net`'s forward raise `exc` the first time it sees a batch larger than `above`."""
    original, state = net.forward, {"raised": False}

    def forward(x, *args, **kwargs):
        if not state["raised"] and x.shape[0] > above:
            state["raised"] = True
            raise exc
        return original(x, *args, **kwargs)

    net.forward = forward
    return state


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate; out of memory"),
])
def test_out_of_memory_halves_the_batch_and_records_it(exc):
    model, baseline = tiny_pair()
    state = _fail_once(model, exc)
    r = throughput.measure(model, baseline, batch_size=8, **FAST)
    assert state["raised"] and r["batch_size"] == 4 and r["requested_batch_size"] == 8
    assert r["input_shape"][0] == 4


def test_out_of_memory_frees_the_failed_forwards_tensors_before_retrying(monkeypatch):
    """The memory of the forward that ran out must be releasable when the smaller batch starts: the
    exception (and with it the failed frames' tensors) must be gone before `_free_memory`."""
    import weakref

    model, baseline = tiny_pair()
    original, held = model.forward, {}

    def forward(x, *args, **kwargs):
        if not held:
            activations = torch.empty(1000)  # a local of the failing frame, as real activations are
            held["ref"] = weakref.ref(activations)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(x, *args, **kwargs)

    model.forward = forward
    alive_at_free = []
    monkeypatch.setattr(throughput, "_free_memory", lambda device: alive_at_free.append(held["ref"]() is not None))
    assert throughput.measure(model, baseline, batch_size=8, **FAST)["batch_size"] == 4
    assert alive_at_free == [False]


def test_out_of_memory_keeps_halving_down_to_one_then_gives_up():
    model, baseline = tiny_pair()
    original = model.forward

    def forward(x, *a, **k):
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return original(x, *a, **k)

    model.forward = forward
    assert throughput.measure(model, baseline, batch_size=6, **FAST)["batch_size"] == 1  # 6 -> 3 -> 1
    model.forward = lambda x, *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("out of memory"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        throughput.measure(model, baseline, batch_size=2, **FAST)


def test_other_errors_are_not_retried():
    model, baseline = tiny_pair()
    _fail_once(model, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        throughput.measure(model, baseline, batch_size=4, **FAST)


def _spec(**kw) -> JobSpec:
    extra = dict(FAST, **kw.pop("extra", {}))
    fields = dict(metric="throughput", model=models.EMBEDDED_MODEL, batch_size=2, extra=tuple(sorted(extra.items())))
    return JobSpec(**dict(fields, **kw))


def test_run_measures_the_patched_model_against_the_stock_one(tmp_path):
    r = throughput.run(_spec(), tmp_path)
    for key in ("batch_size", "img_s", "img_s_q25", "img_s_q75", "img_s_all", "baseline_img_s",
                "baseline_img_s_all", "speedup", "latency_ms", "peak_mem_mb", "repeats", "warmup", "iters",
                "fused_attn", "dtype", "device"):
        assert key in r, key
    assert r["batch_size"] == 2 and r["input_shape"] == [2, 1, 28, 28]
    assert r["tokens_per_block"] == [50] * 12


def test_run_with_a_reducing_method(tmp_path):
    import methods

    method = next(m for m in ("topk", "evit", "random") if m in methods.available())
    r = throughput.run(_spec(method=method, keep_ratio=0.5, batch_size=1), tmp_path)
    assert r["img_s"] > 0 and r["tokens_per_block"][-1] < 50


def test_autocast_dtype_is_recorded():
    model, baseline = tiny_pair()
    assert throughput.measure(model, baseline, batch_size=1, dtype="bf16", **FAST)["dtype"] == "bf16"


def test_fused_attention_switch_applies_to_both_models(tmp_path):
    assert throughput.run(_spec(extra=dict(fused_attn=False), batch_size=1), tmp_path)["fused_attn"] is False
    model, baseline = tiny_pair()
    for net in (model, baseline):
        throughput.set_fused_attn(net, True)
    assert all(block.attn.fused_attn for net in (model, baseline) for block in net.blocks)
    assert throughput.fused_attn_of(model) is True


@pytest.mark.parametrize("extra, message", [
    (dict(repats=5), "unknown throughput setting 'repats'"),
    (dict(repeats=3), "repeats=3"),
    (dict(iters=0), "iters=0"),
    (dict(warmup=-1), "warmup=-1"),
    (dict(fused_attn="maybe"), "fused_attn='maybe'"),
])
def test_bad_knobs_are_one_line_errors(extra, message):
    with pytest.raises(ThroughputError, match=message.replace("(", r"\(")):
        throughput.knobs(_spec(extra=extra))
