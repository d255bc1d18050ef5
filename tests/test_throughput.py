"""The throughput protocol's structure: fields, ABBA interleaving, the speedup's CI, adaptive repeats, per-job
settings, OOM back-off. No timing asserts."""
from __future__ import annotations

from statistics import median

import numpy as np
import pytest
import timm
import torch

from bench import models
from bench.jobs import JobContext, throughput
from bench.jobs.throughput import ThroughputError
from bench.spec import JobSpec

FAST = dict(warmup=1, repeats=5, max_repeats=5, iters=1)
TINY = dict(img_size=32, patch_size=16, num_classes=4, embed_dim=32, depth=2, num_heads=2)


def tiny_pair():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY), timm.create_model("vit_tiny_patch16_224", **TINY)


def test_measure_returns_the_documented_fields():
    model, baseline = tiny_pair()
    r = throughput.measure(model, baseline, batch_size=3, **FAST)
    assert r["batch_size"] == r["requested_batch_size"] == 3
    assert r["input_shape"] == [3, 3, 32, 32]
    assert len(r["img_s_all"]) == len(r["baseline_img_s_all"]) == len(r["speedup_all"]) == 5
    assert all(v > 0 for v in r["img_s_all"] + r["baseline_img_s_all"])
    # the summary statistics are those of the per-repeat lists
    assert r["img_s"] == median(r["img_s_all"]) and r["baseline_img_s"] == median(r["baseline_img_s_all"])
    assert r["img_s_q25"] == pytest.approx(np.percentile(r["img_s_all"], 25))
    assert r["img_s_q25"] <= r["img_s"] <= r["img_s_q75"]
    assert r["spread"] == pytest.approx(r["img_s_q75"] / r["img_s_q25"]) and r["unstable"] == (r["spread"] > 1.10)
    # one ratio per repeat (baseline time / method time of its quartet); the median of ratios, not a ratio of medians
    assert r["speedup"] == pytest.approx(median(r["speedup_all"]))
    assert r["speedup_ci_low"] <= r["speedup"] <= r["speedup_ci_high"]
    # one timed repeat is `iters` batches: latency and img/s describe the same median repeat
    assert r["latency_ms"] == pytest.approx(1e3 * 3 / r["img_s"], rel=1e-9)
    assert r["peak_mem_mb"] is None and r["baseline_peak_mem_mb"] is None  # CPU
    assert (r["repeats"], r["warmup"], r["iters"], r["dtype"], r["device"]) == (5, 1, 1, "fp32", "cpu")
    assert r["fused_attn"] == r["baseline_fused_attn"] == timm.layers.use_fused_attn()


def test_method_and_baseline_alternate_in_balanced_quartets():
    """Repeat i times A B B A, repeat i+1 B A A B: a linear drift cancels within a repeat, and over
    any two repeats each side is first equally often."""
    model, baseline = tiny_pair()
    calls = []
    for name, net in (("m", model), ("b", baseline)):
        net.register_forward_hook(lambda *_, name=name: calls.append(name))
    throughput.measure(model, baseline, batch_size=2, warmup=2, repeats=6, max_repeats=6, iters=3)
    assert calls[:4] == ["m", "m", "b", "b"]  # warm-up of both before any timing (CPU: no peak-memory forward)
    timed = calls[4:]
    assert len(timed) == 6 * 4 * 3  # 6 repeats of 4 timings of 3 batches (iters given: no calibration)
    per_repeat = ["".join(timed[i:i + 12:3]) for i in range(0, len(timed), 12)]
    assert per_repeat == ["mbbm", "bmmb"] * 3
    firsts = [r[0] for r in per_repeat]
    assert firsts.count("m") == firsts.count("b")


def test_median_ci_covers_at_least_the_confidence():
    from scipy import stats

    for n in (7, 15, 30, 60):
        low, high = throughput.median_ci(list(range(n)))
        outside = int(low)  # values below the interval
        assert low == n - 1 - high  # symmetric in rank
        assert 1 - 2 * stats.binom.cdf(outside - 1, n, 0.5) >= 0.95
        # and the next narrower interval would not be
        assert 1 - 2 * stats.binom.cdf(outside, n, 0.5) < 0.95
    assert throughput.median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)  # too few for 95 %: the range


def test_repeats_continue_until_the_ci_is_narrow(monkeypatch):
    """Timings that alternate between two levels keep the CI wide: the loop runs to max_repeats. A
    steady machine stops at the minimum."""
    model, baseline = tiny_pair()
    ticks = iter(range(10**6))
    noisy = lambda net, x, iters, sync: 1.0 + 0.5 * (next(ticks) % 3 == 0)  # noqa: E731
    monkeypatch.setattr(throughput, "_timed", noisy)
    r = throughput.measure(model, baseline, batch_size=1, warmup=0, repeats=5, max_repeats=12, ci_target=0.01, iters=1)
    assert r["repeats"] == 12 and (r["speedup_ci_high"] - r["speedup_ci_low"]) / 2 > 0.01 * r["speedup"]
    monkeypatch.setattr(throughput, "_timed", lambda net, x, iters, sync: 1.0)
    r = throughput.measure(model, baseline, batch_size=1, warmup=0, repeats=5, max_repeats=12, ci_target=0.01, iters=1)
    assert r["repeats"] == 5 and r["speedup"] == r["speedup_ci_low"] == r["speedup_ci_high"] == 1.0


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
    fields = dict(kind="throughput", model=models.EMBEDDED_MODEL, batch_size=2, extra=tuple(sorted(extra.items())))
    return JobSpec(**dict(fields, **kw))


def run(spec: JobSpec, tmp_path) -> dict:
    return throughput.run(spec, JobContext(tmp_path, {}))


def test_run_measures_the_patched_model_against_the_stock_one(tmp_path):
    r = run(_spec(), tmp_path)
    for key in ("batch_size", "img_s", "img_s_q25", "img_s_q75", "img_s_all", "baseline_img_s",
                "baseline_img_s_all", "speedup", "latency_ms", "peak_mem_mb", "repeats", "warmup", "iters",
                "fused_attn", "baseline_fused_attn", "dtype", "device", "speedup_ci_low", "speedup_ci_high",
                "unstable", "spread", "threads", "cudnn_benchmark"):
        assert key in r, key
    assert r["batch_size"] == 2 and r["input_shape"] == [2, 1, 28, 28]
    assert r["tokens_per_block"] == [50] * 12


def test_run_with_a_reducing_method(tmp_path):
    r = run(_spec(method="topk", keep_ratio=0.5, batch_size=1), tmp_path)
    assert r["img_s"] > 0 and r["tokens_per_block"][-1] < 50


def test_autocast_dtype_is_recorded():
    model, baseline = tiny_pair()
    assert throughput.measure(model, baseline, batch_size=1, dtype="bf16", **FAST)["dtype"] == "bf16"


def test_fused_attention_switch_applies_to_both_models(tmp_path):
    r = run(_spec(extra=dict(fused_attn=False), batch_size=1), tmp_path)
    assert r["fused_attn"] is False and r["baseline_fused_attn"] is False
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


def test_threads_follow_the_cpus_the_job_holds_and_settings_are_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert throughput.job_cpus() == 3  # SLURM's allocation caps the affinity mask
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert throughput.job_cpus() == 4
    monkeypatch.setattr(throughput, "job_cpus", lambda: 1)
    torch.set_num_threads(2)
    torch.backends.cudnn.benchmark = False
    r = run(_spec(batch_size=1), tmp_path)
    assert r["threads"] == 1 and r["cudnn_benchmark"] is False  # CPU job: no autotuning
    assert torch.get_num_threads() == 2 and torch.backends.cudnn.benchmark is False  # restored
    torch.set_num_threads(1)


# --- compile, SDPA kernels, batch sweep -----------------------------------------------------------

def test_sdpa_kernels_are_recorded_for_both_models(tmp_path):
    r = run(_spec(method="tome", keep_ratio=0.5, batch_size=1, extra=dict(fused_attn=True)), tmp_path)
    assert r["sdpa_kernels"] and r["sdpa_kernels"] == r["baseline_sdpa_kernels"]  # ToMe's size bias included
    assert all(k.startswith("_scaled_dot_product") for k in r["sdpa_kernels"])
    explicit = run(_spec(method="evit", keep_ratio=0.5, batch_size=1, extra=dict(fused_attn=False)), tmp_path)
    assert explicit["sdpa_kernels"] == explicit["baseline_sdpa_kernels"] == ["explicit"]
    assert r["compiled"] is False


def test_compile_knob_compiles_the_method_and_its_baseline_alike(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(net, **kwargs):  # the wiring only: a real compile takes a minute (compat_matrix.py)
        compiled.append((type(net).__name__, kwargs))
        return net

    monkeypatch.setattr(throughput.torch, "compile", fake_compile)
    r = run(_spec(method="idle", keep_ratio=0.5, batch_size=1, extra=dict(compile=True)), tmp_path)
    assert r["compiled"] is True and len(compiled) == 2
    assert compiled[0][0] != compiled[1][0]  # the patched model and the stock one, same settings
    assert compiled[0][1] == compiled[1][1] == {}  # fullgraph=False (the default)


def test_sweep_sizes_and_break_even():
    assert throughput.sweep_sizes(1) == [1]
    assert throughput.sweep_sizes(6) == [1, 2, 4, 6]
    assert throughput.sweep_sizes(8) == [1, 2, 4, 8]
    points = [dict(batch_size=b, speedup_ci_low=low) for b, low in ((1, 0.8), (2, 0.99), (4, 1.02), (8, 1.3))]
    assert throughput.break_even(points) == 4
    assert throughput.break_even(points[:2]) is None


def test_batch_sweep_measures_every_size_in_one_job(tmp_path, monkeypatch):
    sizes = []
    real = throughput.measure

    def measure(model, baseline, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        result = real(model, baseline, batch_size, *args, **kwargs)
        # a fake speedup interval that rises with the batch: break-even at 4
        low = 0.9 if batch_size < 4 else 1.1
        return dict(result, speedup=low + 0.05, speedup_ci_low=low, speedup_ci_high=low + 0.1)

    monkeypatch.setattr(throughput, "measure", measure)
    r = run(_spec(method="topk", keep_ratio=0.5, batch_size=6, extra=dict(batch_sweep=True)), tmp_path)
    assert sizes == [1, 2, 4, 6]
    assert [p["batch_size"] for p in r["batch_sweep"]] == [1, 2, 4, 6]
    assert r["break_even_batch"] == 4 and r["batch_size"] == 6  # the top-level fields: the largest size
    assert set(throughput.SWEEP_FIELDS) <= set(r["batch_sweep"][0])


def test_batch_sweep_stops_at_the_first_size_out_of_memory():
    model, baseline = tiny_pair()
    original = model.forward

    def forward(x, *a, **k):
        if x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return original(x, *a, **k)

    model.forward = forward
    r = throughput.batch_sweep(model, baseline, 16, "cpu", "fp32", **FAST)
    assert [p["batch_size"] for p in r["batch_sweep"]] == [1, 2, 4, 4]  # 8 ran out, fell back to 4: stop


@pytest.mark.parametrize("extra, message", [
    (dict(compile="yes"), "compile='yes'"),
    (dict(batch_sweep=1), "batch_sweep=1"),
    (dict(compile=True, warmup=0), "warmup >= 1"),
])
def test_bad_compile_and_sweep_knobs(extra, message):
    with pytest.raises(ThroughputError, match=message):
        throughput.knobs(_spec(extra=extra))


def test_speedup_vs_batch_figure_marks_the_break_even(tmp_path):
    import pandas as pd

    from bench.report import plots

    points = [dict(batch_size=b, speedup=s, speedup_ci_low=s - 0.05, speedup_ci_high=s + 0.05)
              for b, s in ((1, 0.9), (2, 1.0), (4, 1.2), (8, 1.4))]
    tidy = pd.DataFrame([dict(kind="throughput", status="ok", model="m", method="evit", keep_ratio=0.5,
                              options={}, options_key=(), layers=(), regime="off-the-shelf", finetune=(),
                              batch_size=8, batch_sweep=points, break_even_batch=4)])
    fig = plots.speedup_vs_batch(tidy, "m")
    ax = fig.axes[0]
    from matplotlib.collections import PathCollection

    rings = [c for c in ax.collections if isinstance(c, PathCollection)]  # scatter marks, not the band
    assert [tuple(c.get_offsets()[0]) for c in rings] == [(4.0, 1.2)]
    path = plots.save_figure(fig, tmp_path / "speedup_vs_batch_m")
    assert path.stat().st_size > 1000


# --- the knobs end to end, through run_all (tiny sizes, no timing asserts) ---------------------------

TINY_RUN = ["--models", models.EMBEDDED_MODEL, "--methods", "idle", "--ratios", "0.5", "--metrics", "throughput",
            "--device", "cpu", "--repeats", "5", "--max-repeats", "5", "--iters", "1", "--warmup", "1"]


def test_compile_and_batch_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    import functools

    import bench.report
    import run_all
    from bench import records

    # Dynamo really captures both models; the eager backend skips inductor's code generation (a minute here).
    monkeypatch.setattr(throughput.torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(bench.report, "write_report",
                        functools.partial(bench.report.write_report, figures=False, pictures=False))
    out = tmp_path / "run"
    assert run_all.main([*TINY_RUN, "--batch-sizes", "1,2", "--compile", "--batch-sweep", "--out", str(out)]) == 0
    assert "2 done, 0 skipped, 0 failed" in capsys.readouterr().out  # one sweep job per method, not one per size
    done, _, problems = records.scan(out)
    assert not problems and len(done) == 2
    for record in (r.data for r in done.values()):
        m = record["metrics"]
        assert record["spec"]["extra"]["compile"] is True and record["spec"]["extra"]["batch_sweep"] is True
        assert m["compiled"] is True and m["batch_size"] == 2
        assert [p["batch_size"] for p in m["batch_sweep"]] == [1, 2]
        assert "break_even_batch" in m and m["break_even_batch"] in (None, 1, 2)
        assert m["sdpa_kernels"] and m["baseline_sdpa_kernels"]


@pytest.mark.parametrize("argv, named", [
    (["--compile", "--warmup", "0"], "warmup >= 1"),
    (["--compile=yes"], "--compile"),
    (["--batch-sweep=2"], "--batch-sweep"),
])
def test_bad_compile_and_sweep_flags_exit_2_with_one_line(tmp_path, capsys, argv, named):
    import run_all

    out = tmp_path / "run"
    assert run_all.main([*TINY_RUN[:-2], "--out", str(out), *argv]) == 2  # TINY_RUN less its --warmup 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("run_all.py: error: ") and named in err
    assert not out.exists()
