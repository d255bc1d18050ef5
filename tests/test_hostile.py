"""The hostile suite, part 1: bad input through `run_all.main`. Every case must give exit code 2, ONE line
on stderr naming the bad value (`run_all.py: error: ...`), no traceback, and write nothing: neither the
run folder nor any file it points at changes. Faults, the report CLI and real processes are in
test_hostile_faults.py.

`{F}` in a case is a module-wide folder of hostile files (text "checkpoints", empty data folders, broken
run folders); `{out}` the run folder, which must not exist afterwards.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import run_all
from tests.test_bad_input import save_embedded_checkpoint, tree
from tests.test_slurm import PROBLEM as SLURM_PROBLEM

FLOPS = ["--metrics", "flops", "--methods", "evit"]
ACC = ["--metrics", "acc", "--methods", "evit", "--checkpoint", "{F}/w.pth", "--limit", "8"]


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("hostile")
    texts = {"notes.txt": b"not a folder\n", "ck-text.pth": b"my notes\n", "ck-empty.pth": b"",
             "ck-html.pth": b"<!DOCTYPE html><html>404</html>\n", "ck-bin.pth": bytes(range(7, 250)),
             "ck-lfs.pth": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n",
             "flat/img0.png": b"\x89PNG", "grid-garbage/grid.json": b"\x00garbage",
             "grid-v1/grid.json": b'{"schema": 1, "specs": []}\n',
             "grid-bad-spec/grid.json": json.dumps({"schema": 2, "specs": [{"kind": "acc"}]}).encode(),
             "grid-list/grid.json": b"[1, 2]\n"}
    for name, content in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    for folder in ("empty-dir", "ck-dir.pth", "grid-none", "no-images/c0", "no-images/c1"):
        (root / folder).mkdir(parents=True)
    for count, name in ((20, "twenty"), (1000, "imagenet"), (3, "three")):
        for i in range(count):
            (root / name / f"c{i:04d}").mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(root / name / "c0000" / "a.png")
    torch.save({"epoch": 3, "lr": 0.1}, root / "ck-nodict.pth")
    save_embedded_checkpoint(root / "w.pth")
    save_embedded_checkpoint(root / "ck-narrow.pth", embed_dim=32)
    return root


C = pytest.param
NO_SBATCH = shutil.which("sbatch") is None
NEEDS_SLURM = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"),  # as tests/test_slurm.py
               pytest.mark.skipif(SLURM_PROBLEM is not None, reason=str(SLURM_PROBLEM))]
CASES = [
    # grid: methods, models, metrics
    C(FLOPS[:2] + ["--methods", "evitt"], ["'evitt'", "valid:"], id="method-unknown"),
    C(FLOPS[:2] + ["--methods", ""], ["no method", "valid:"], id="methods-empty"),
    C(FLOPS[:2] + ["--methods", ",,"], ["no method"], id="methods-commas"),
    C(FLOPS[:2] + ["--methods", "evit,EVIT2"], ["'EVIT2'"], id="method-unknown-second"),
    C(FLOPS[:2] + ["--methods", "tome;evit"], ["'tome;evit'"], id="methods-semicolon"),
    C(FLOPS + ["--models", "vit_tiny_patch16_22"], ["'vit_tiny_patch16_22'", "vit_tiny_patch16_224"], id="model-typo"),
    C(FLOPS + ["--models", ""], ["no jobs"], id="models-empty"),
    C(FLOPS + ["--models", "tokenbench_vit_fmnist,nope"], ["'nope'"], id="model-unknown-second"),
    C(FLOPS + ["--models", "resnet18"], ["resnet18"], id="model-not-a-vit"),
    C(FLOPS[:2] + ["--methods", "idle", "--models", "vit_base_patch16_gap_224"], ["CLS"], id="cls-method-no-cls"),
    C(["--metrics", "flop", "--methods", "evit"], ["'flop'", "acc, flops, throughput"], id="metric-unknown"),
    C(["--metrics", "", "--methods", "evit"], ["metric", "valid:"], id="metrics-empty"),
    C(["--metrics", "acc,finetune", "--methods", "evit"], ["'finetune'"], id="metric-not-measuring"),
    # grid: ratios
    *[C(FLOPS + ["--ratios", r], [f"'{r}'", "0 < ratio <= 1"], id=f"ratio-{name}") for name, r in (
        ("zero", "0"), ("negative", "-0.5"), ("above-one", "1.5"), ("nan", "nan"), ("inf", "inf"),
        ("word", "seven"), ("underflow", "1e-400"), ("hex", "0x1"), ("percent", "70%"), ("two", "2"))],
    C(FLOPS + ["--ratios", "0.7,1.01"], ["'1.01'"], id="ratio-second-bad"),
    C(FLOPS + ["--ratios", ""], ["''", "not a number"], id="ratio-empty"),
    C(FLOPS + ["--ratios"], ["--ratios", "expected one argument"], id="ratio-missing-value"),
    # grid: layers
    C(FLOPS + ["--layers", "evit=3,12"], ["layer 12", "0..11"], id="layer-beyond-depth"),
    C(FLOPS + ["--layers", "evit=-1"], ["layer -1", "0..11"], id="layer-negative"),
    C(FLOPS + ["--layers", "evit=3,3"], ["layer 3", "more than once"], id="layer-twice"),
    C(FLOPS + ["--layers", "evit=3,x"], ["'evit=3,x'"], id="layer-not-int"),
    C(FLOPS + ["--layers", "evit="], ["'evit='"], id="layers-empty"),
    C(FLOPS + ["--layers", "3,6,99"], ["layer 99"], id="layers-all-methods-beyond"),
    C(FLOPS + ["--layers", "tome=3"], ["'tome'", "not in --methods"], id="layers-method-not-in-grid"),
    C(FLOPS + ["--layers", "nomethod=3"], ["'nomethod'", "valid:"], id="layers-unknown-method"),
    C(FLOPS + ["--layers", "evit=1.5"], ["'evit=1.5'"], id="layer-float"),
    # grid: method options
    C(FLOPS + ["--method-opt", "evit.fusee=true"], ["'fusee'", "valid:", "fuse"], id="opt-unknown"),
    C(FLOPS + ["--method-opt", "evit.fuse=maybe"], ["fuse='maybe'", "valid: true, false"], id="opt-bool"),
    C(FLOPS + ["--method-opt", "evit.fuse=true", "--method-opt", "evit.fuse=2"], ["fuse='2'"], id="opt-sweep-bad"),
    C(FLOPS + ["--method-opt", "evit"], ["'evit'", "METHOD.OPTION=VALUE"], id="opt-no-dot"),
    C(FLOPS + ["--method-opt", "evit.fuse"], ["'evit.fuse'"], id="opt-no-value"),
    C(FLOPS + ["--method-opt", ".fuse=true"], ["'.fuse=true'"], id="opt-no-method"),
    C(FLOPS + ["--method-opt", "nomethod.x=1"], ["'nomethod'"], id="opt-unknown-method"),
    C(FLOPS + ["--method-opt", "tome.r=3"], ["'tome'", "not in --methods"], id="opt-method-not-in-grid"),
    *[C(["--metrics", "flops", "--methods", opt.split(".")[0], "--method-opt", opt], [expected, "valid:"],
        id=f"opt-{opt.replace('=', '-')}") for opt, expected in (
        ("tome.r=-1", "r='-1'"), ("tome.r=abc", "r='abc'"), ("tome.r=1.5", "r='1.5'"),
        ("tome.r=1,2,3,4,5,6,7,8,9,10,11,12,13", "13 values"), ("tome.prop_attn=yes please", "prop_attn"),
        ("random.seed=-1", "seed=-1"), ("random.seed=abc", "seed='abc'"), ("random.seed=", "seed=''"),
        ("idle.preset=foo", "preset='foo'"), ("idle.layers_per_stage=0", "layers_per_stage=0"),
        ("idle.layers_per_stage=x", "layers_per_stage='x'"), ("idle.cheap_score=2", "cheap_score='2'"),
        ("topk.score=foo", "score='foo'"), ("dynamicvit.x=1", "'x'"), ("evit.fuse=", "fuse=''"))],
    # measurement flags
    *[C(FLOPS + [flag, value], [f"'{value}'", "valid:"], id=f"{flag[2:]}-{value or 'empty'}") for flag, value in (
        ("--batch-size", "0"), ("--batch-size", "-4"), ("--batch-size", "abc"), ("--batch-size", "1.5"),
        ("--batch-size", ""), ("--limit", "0"), ("--limit", "abc"), ("--limit", "1e3"), ("--seed", "abc"),
        ("--seed", "-3"), ("--seed", "0.5"))],
    *[C(["--metrics", "throughput", "--methods", "evit", flag, value], [f"'{bad}'"], id=f"{flag[2:]}-{value}")
      for flag, value, bad in (("--batch-sizes", "1,0", "0"), ("--batch-sizes", "x", "x"),
                               ("--batch-sizes", "64,-1", "-1"), ("--warmup", "-1", "-1"), ("--repeats", "0", "0"),
                               ("--max-repeats", "0", "0"), ("--iters", "0", "0"), ("--iters", "many", "many"),
                               ("--fused-attn", "maybe", "maybe"))],
    C(["--metrics", "throughput", "--methods", "evit", "--repeats", "3"], ["repeats=3", ">= 5"], id="repeats-too-few"),
    C(FLOPS + ["--dtype", "fp8"], ["'fp8'", "fp32"], id="dtype-unknown"),
    C(FLOPS + ["--dtype", "FP32"], ["'FP32'", "fp32"], id="dtype-case"),
    C(FLOPS + ["--dtype", ""], ["''", "fp32"], id="dtype-empty"),
    C(FLOPS + ["--device", "gpu"], ["'gpu'", "valid: cpu"], id="device-unknown"),
    C(FLOPS + ["--device", "tpu"], ["'tpu'"], id="device-tpu"),
    C(FLOPS + ["--device", "cuda:abc"], ["'cuda:abc'"], id="device-bad-index"),
    C(FLOPS + ["--device", ""], ["--device ''", "empty"], id="device-empty"),
    C(FLOPS + ["--device", "mps"], ["'mps'", "not available"], id="device-mps"),
    # files and folders
    C(FLOPS + ["--checkpoint", "{F}/missing.pth"], ["missing.pth", "does not exist"], id="checkpoint-missing"),
    C(FLOPS + ["--checkpoint", "{F}/ck-dir.pth"], ["ck-dir.pth", "is a folder"], id="checkpoint-folder"),
    C(FLOPS + ["--checkpoint", "{F}/ck-text.pth"], ["ck-text.pth", "a text file"], id="checkpoint-text"),
    C(FLOPS + ["--checkpoint", "{F}/ck-empty.pth"], ["ck-empty.pth", "empty"], id="checkpoint-empty"),
    C(FLOPS + ["--checkpoint", "{F}/ck-html.pth"], ["ck-html.pth", "HTML page"], id="checkpoint-html"),
    C(FLOPS + ["--checkpoint", "{F}/ck-lfs.pth"], ["ck-lfs.pth", "Git LFS pointer"], id="checkpoint-lfs"),
    C(FLOPS + ["--checkpoint", "{F}/ck-bin.pth"], ["ck-bin.pth", "binary"], id="checkpoint-binary"),
    C(FLOPS + ["--checkpoint", "{F}/ck-nodict.pth"], ["ck-nodict.pth", "no state dict"], id="checkpoint-no-tensors"),
    C(FLOPS + ["--checkpoint", "{F}/ck-narrow.pth"], ["ck-narrow.pth", "mismatched shapes"], id="checkpoint-shapes"),
    C(FLOPS + ["--checkpoint", ""], ["--checkpoint ''", "empty"], id="checkpoint-empty-name"),
    C(FLOPS + ["--checkpoint", "{F}/w.pth", "--pretrained"], ["--pretrained", "not allowed"], id="checkpoint-and-pretrained"),
    C(FLOPS + ["--pretrained", "--random-weights"], ["--random-weights"], id="pretrained-and-random"),
    C(ACC + ["--data-dir", "{F}/missing"], ["missing", "does not exist"], id="data-missing"),
    C(ACC + ["--data-dir", "{F}/notes.txt"], ["notes.txt", "is a file"], id="data-is-a-file"),
    C(ACC + ["--data-dir", "{F}/empty-dir"], ["empty-dir", "empty"], id="data-empty"),
    C(ACC + ["--data-dir", "{F}/flat"], ["flat", "class"], id="data-flat"),
    C(ACC + ["--data-dir", "{F}/no-images"], ["no-images", "no images"], id="data-no-images"),
    C(ACC + ["--data-dir", "{F}/twenty"], ["20 classes", "predicts 10"], id="data-classes-mismatch"),
    C(ACC + ["--data-dir", "{F}/three"], ["3 classes", "predicts 10"], id="data-too-few-classes"),
    C(ACC + ["--data-dir", ""], ["--data-dir ''", "empty"], id="data-empty-name"),
    C(FLOPS + ["--data-dir", "{F}/missing"], ["missing"], id="data-missing-flops-grid"),
    C(["--metrics", "acc", "--methods", "evit", "--models", "deit_tiny_patch16_224", "--data-dir", "{F}/imagenet"],
      ["no trained weights", "--random-weights"], id="random-weights-not-opted-in"),
    C(["--metrics", "acc", "--methods", "evit", "--models", "deit_tiny_patch16_224", "--random-weights",
       "--data-dir", "{F}/twenty"], ["20 classes", "predicts 1000"], id="random-weights-classes-mismatch"),
    C(FLOPS + ["--out", "{F}/notes.txt"], ["notes.txt", "is a file"], id="out-is-a-file"),
    C(FLOPS + ["--out", "{F}/notes.txt/run"], ["notes.txt", "valid:"], id="out-under-a-file"),
    C(FLOPS + ["--out", "/dev/null/run"], ["/dev/null/run"], id="out-under-dev-null"),
    C(FLOPS + ["--out", "{F}/" + "x" * 300], ["300 bytes", "at most 255"], id="out-300-characters"),
    C(FLOPS + ["--out", "{F}/" + "é" * 128 + "/run"], ["256 bytes"], id="out-long-utf8-name"),
    C(FLOPS + ["--out", ""], ["--out ''", "empty"], id="out-empty"),
    C(FLOPS + ["--out", "   "], ["--out '   '", "empty"], id="out-blank"),
    C(FLOPS + ["--out", "{F}/grid-v1"], ["version-1 grid"], id="out-version-1-run"),
    C(FLOPS + ["--out", "{F}/grid-garbage"], ["grid.json", "unreadable"], id="out-garbage-grid"),
    C(FLOPS + ["--out", "{F}/grid-list"], ["grid.json"], id="out-grid-not-a-dict"),
    # dispatch flags (item 7: checked before anything is written)
    *[C(FLOPS + [flag, value], [f"'{value}'"], id=f"{flag[2:]}-{value or 'empty'}") for flag, value in (
        ("--max-array-size", "-1"), ("--max-array-size", "0"), ("--max-array-size", "abc"),
        ("--array-parallelism", "0"), ("--array-parallelism", "-2"), ("--gpus-per-node", "-1"),
        ("--gpus-per-node", "abc"), ("--cpus-per-task", "0"), ("--mem", "lots"), ("--mem", ""),
        ("--mem", "32 G"), ("--mem", "1.5G"), ("--partition", "a b"), ("--partition", ""), ("--account", " "),
        ("--qos", "x y"), ("--constraint", ""))],
    *[C(FLOPS + ["--launcher", launcher, "--time", value], [f"'{value}'", "[D-]HH:MM:SS"], id=f"time-{value or 'empty'}")
      for launcher, value in (("local", "xx"), ("local", "0"), ("local", "-5"), ("local", "1h"),
                              ("slurm", "1:2:3:4"), ("slurm", ""), ("local", "1-"))],
    C(FLOPS + ["--launcher", "foo"], ["'foo'", "inline"], id="launcher-unknown"),
    C(FLOPS + ["--no-wait"], ["--no-wait", "--launcher slurm"], id="no-wait-inline"),
    C(FLOPS + ["--launcher", "local", "--no-wait"], ["--no-wait", "local"], id="no-wait-local"),
    C(FLOPS + ["--launcher", "slurm", "--partition", "no-such-partition"], ["'no-such-partition'", "valid:"],
      id="partition-not-on-the-cluster", marks=NEEDS_SLURM),
    C(FLOPS + ["--launcher", "slurm", "--partition", "no-such-partition"], ["--launcher slurm", "not on PATH",
                                                                           "valid here: --launcher local"],
      id="slurm-not-installed", marks=pytest.mark.skipif(not NO_SBATCH, reason="SLURM is installed here")),
    # --collect
    C(["--collect", ""], ["--collect", "empty"], id="collect-empty"),
    C(["--collect", "{F}/missing-run"], ["missing-run", "no grid.json"], id="collect-missing"),
    C(["--collect", "{F}/grid-none"], ["grid-none", "no grid.json"], id="collect-no-grid"),
    C(["--collect", "{F}/grid-garbage"], ["grid.json", "unreadable"], id="collect-garbage-grid"),
    C(["--collect", "{F}/grid-v1"], ["version-1 grid"], id="collect-version-1"),
    C(["--collect", "{F}/grid-bad-spec"], ["grid.json", "bad job spec"], id="collect-bad-spec"),
    C(["--collect", "{F}/notes.txt"], ["notes.txt"], id="collect-a-file"),
    C(["--collect", "{F}/grid-none", "--methods", "evit"], ["--methods", "cannot be combined"], id="collect-and-methods"),
    C(["--collect", "{F}/grid-none", "--out", "{out}"], ["--out", "cannot be combined"], id="collect-and-out"),
    C(["--collect", "{F}/grid-none", "--skip-unreadable"], ["--skip-unreadable"], id="collect-and-skip"),
    # argv itself
    C(["--frobnicate"], ["--frobnicate"], id="unknown-flag"),
    C(FLOPS + ["positional"], ["positional"], id="positional-argument"),
    C(FLOPS + ["--mem", "-1G"], ["--mem", "expected one argument"], id="value-looks-like-a-flag"),
]


def _fill(argv: list[str], files: Path, out: Path) -> list[str]:
    return [arg.replace("{F}", str(files)).replace("{out}", str(out)) for arg in argv]


@pytest.mark.parametrize("argv, expected", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(hostile_files, tmp_path, capsys, argv, expected):
    out = tmp_path / "run"
    argv = _fill(argv, hostile_files, out)
    if "--collect" not in argv and "--out" not in argv:
        argv += ["--out", str(out)]
    before = tree(hostile_files)
    rc = run_all.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured.err
    assert "Traceback" not in captured.err and len(lines) == 1, lines
    assert lines[0].startswith("run_all.py: error: "), lines[0]
    for text in _fill(expected, hostile_files, out):
        assert text in lines[0], (text, lines[0])
    assert captured.out == ""
    assert not out.exists() and tree(hostile_files) == before


@pytest.mark.parametrize("env, argv, expected", [
    (dict(CUDA_VISIBLE_DEVICES="abc"), ["--launcher", "local"], ["CUDA_VISIBLE_DEVICES='abc'"]),
    (dict(CUDA_VISIBLE_DEVICES="0,x"), ["--launcher", "local"], ["CUDA_VISIBLE_DEVICES='0,x'"]),
    (dict(PATH="/nonexistent"), ["--launcher", "slurm"], ["sbatch and srun not on PATH"]),
], ids=["cuda-visible-devices-abc", "cuda-visible-devices-mixed", "slurm-without-sbatch"])
def test_bad_environment_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, env, argv, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    rc = run_all.main([*FLOPS, *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(text in err for text in expected), err
    assert not out.exists()


def test_pretrained_weights_offline_is_one_line(hostile_files, tmp_path, capsys, monkeypatch):
    from bench import models

    monkeypatch.setattr(models, "_hub_reachable", lambda endpoint: False)
    monkeypatch.setattr(models, "_in_hub_cache", lambda cfg: False)
    out = tmp_path / "run"
    rc = run_all.main(["--metrics", "acc", "--methods", "evit", "--models", "deit_tiny_patch16_224", "--pretrained",
                       "--data-dir", str(hostile_files / "imagenet"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "hub cannot be reached" in err and "--checkpoint" in err
    assert not out.exists()
