"""Bad input through the CLI: exit code 2, ONE line on stderr naming the bad value and the valid
ones, no traceback, and nothing written (or overwritten) in --out.

Most cases call `run_all.main` in-process; a few go through a real `python run_all.py` subprocess to
prove that what a user sees on stderr is the one line and not a stack trace.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import methods
import run_all
from bench import validate
from bench.models import EMBEDDED_MODEL

REPO = Path(__file__).resolve().parents[1]
NO_CLS_MODEL = "vit_base_patch16_gap_224"  # a stock timm ViT with global average pooling, no CLS token
DEPTH = 12  # of the embedded model


def run_cli(capsys, out: Path, *argv: str) -> tuple[int, list[str]]:
    rc = run_all.main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    return rc, err.strip().splitlines()


def assert_one_line_error(rc: int, lines: list[str], *expected: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("run_all.py: error: "), line
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"


def tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mtime: equal trees mean nothing was touched."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def out(tmp_path):
    """The run folder a bad command names: it must not exist afterwards."""
    path = tmp_path / "run"
    yield path
    assert not path.exists(), f"{path} was created by a command that failed pre-flight"


def save_embedded_checkpoint(path: Path, **arch) -> Path:
    """A DeiT-format checkpoint ({"model": state_dict}) of a random-init embedded architecture."""
    import timm

    torch.manual_seed(0)
    torch.save({"model": timm.create_model(EMBEDDED_MODEL, **arch).state_dict()}, path)
    return path


@pytest.fixture
def checkpoint_of_other_width(tmp_path) -> Path:
    return save_embedded_checkpoint(tmp_path / "narrow.pth", embed_dim=32)


@pytest.fixture
def acc_argv(tmp_path) -> list[str]:
    """An accuracy grid with weights that load, so only the data can be what is wrong."""
    return ["--metrics", "acc", "--checkpoint", str(save_embedded_checkpoint(tmp_path / "w.pth"))]


# ---------------------------------------------------------------------------------------------
# Grid flags

@pytest.mark.parametrize("argv, expected", [
    (["--methods", "evitt"], ["'evitt'", "valid:", "none"]),
    (["--methods", ""], ["no method", "valid:", "none"]),
    (["--methods", ","], ["no method", "valid:"]),
    (["--models", "vit_tiny_patch16_22"], ["'vit_tiny_patch16_22'", "vit_tiny_patch16_224"]),
    (["--metrics", "acc,flop"], ["'flop'", "acc, flops, throughput"]),
    (["--ratios", "0"], ["'0'", "0 < ratio <= 1"]),
    (["--ratios", "-0.5"], ["'-0.5'", "0 < ratio <= 1"]),
    (["--ratios", "0.7,1.5"], ["'1.5'", "0 < ratio <= 1"]),
    (["--ratios", "seven"], ["'seven'", "not a number", "0 < ratio <= 1"]),
    (["--ratios", "nan"], ["'nan'", "0 < ratio <= 1"]),
], ids=["unknown-method", "empty-methods", "only-commas", "unknown-model", "unknown-metric",
        "ratio-zero", "ratio-negative", "ratio-above-one", "ratio-not-a-number", "ratio-nan"])
def test_bad_grid_flag(capsys, out, argv, expected):
    rc, lines = run_cli(capsys, out, "--metrics", "flops", *argv)
    assert_one_line_error(rc, lines, *expected)


@pytest.mark.parametrize("argv, expected", [
    (["--layers", f"evit=3,{DEPTH}"], [f"layer {DEPTH}", f"0..{DEPTH - 1}"]),
    (["--layers", "evit=3,3,6"], ["layer 3", "more than once"]),
    (["--layers", "evit=3,x"], ["'evit=3,x'", "block indices"]),
    (["--layers", "evit="], ["'evit='", "block indices"]),
    (["--method-opt", "evit.fusee=true"], ["'fusee'", "valid:", "fuse"]),
    (["--method-opt", "evit.fuse=maybe"], ["fuse='maybe'", "bool", "valid: true, false"]),
], ids=["layer-beyond-depth", "layer-duplicated", "layer-not-int", "layers-empty", "unknown-option",
        "option-wrong-type"])
def test_bad_method_configuration(capsys, out, argv, expected):
    rc, lines = run_cli(capsys, out, "--metrics", "flops", "--methods", "evit", *argv)
    assert_one_line_error(rc, lines, *expected)


def test_cls_scored_method_on_model_without_cls_token(capsys, out):
    cls_scored = [n for n in methods.available() if methods.get_method(n).needs_cls]
    assert cls_scored == ["idle", "evit", "topk", "dynamicvit", "ppt", "ats"]
    rc, lines = run_cli(capsys, out, "--metrics", "flops", "--models", NO_CLS_MODEL, "--methods", cls_scored[0])
    assert_one_line_error(rc, lines, cls_scored[0], "CLS", "none")


# ---------------------------------------------------------------------------------------------
# Measurement flags

@pytest.mark.parametrize("argv, expected", [
    (["--batch-size", "0"], ["'0'", "positive integer"]),
    (["--batch-size", "-4"], ["'-4'", "positive integer"]),
    (["--metrics", "throughput", "--batch-sizes", "1,0"], ["'0'", "positive integer"]),
    (["--limit", "0"], ["'0'", "positive integer"]),
    (["--dtype", "fp8"], ["'fp8'", "fp32", "bf16", "fp16"]),
    (["--device", "gpu"], ["'gpu'", "cpu"]),
    (["--launcher", "local", "--time", "xx"], ["'xx'", "[D-]HH:MM:SS"]),
    (["--launcher", "local", "--no-wait"], ["--no-wait", "--launcher slurm"]),
    (["--no-wait"], ["--no-wait", "--launcher slurm", "inline"]),
    (["--max-array-size", "-1"], ["'-1'", "positive integer"]),
    (["--array-parallelism", "0"], ["'0'", "positive integer"]),
    (["--gpus-per-node", "-1"], ["'-1'", "integer >= 0"]),
    (["--cpus-per-task", "0"], ["'0'", "positive integer"]),
    (["--mem", "lots"], ["'lots'", "32G"]),
    (["--partition", "a b"], ["'a b'", "without spaces"]),
    (["--seed", "-3"], ["'-3'", "integer >= 0", "valid: 0, 1"]),
], ids=["batch-zero", "batch-negative", "throughput-batch-zero", "limit-zero", "unknown-dtype", "unknown-device",
        "launch-time", "local-no-wait", "inline-no-wait", "max-array-size", "array-parallelism", "gpus-per-node",
        "cpus-per-task", "mem", "partition", "seed"])
def test_bad_measurement_flag(capsys, out, argv, expected):
    argv = argv if "--metrics" in argv else ["--metrics", "flops", *argv]
    rc, lines = run_cli(capsys, out, *argv)
    assert_one_line_error(rc, lines, *expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(capsys, out):
    rc, lines = run_cli(capsys, out, "--metrics", "flops", "--device", "cuda")
    assert_one_line_error(rc, lines, "'cuda'", "no CUDA GPU", "valid: cpu")


def test_dtype_the_device_cannot_run(capsys, out, monkeypatch):
    """fp16 autocast runs on CPU in torch 2.14, so a device without it is simulated at the probe."""
    monkeypatch.setattr(validate, "_dtype_error",
                        lambda device, dtype: "RuntimeError: no fp16 kernels" if dtype == "fp16" else None)
    rc, lines = run_cli(capsys, out, "--metrics", "flops", "--device", "cpu", "--dtype", "fp16")
    assert_one_line_error(rc, lines, "'fp16'", "'cpu'", "no fp16 kernels", "valid there: fp32, bf16")


def test_every_dtype_runs_on_cpu():
    """The real probe, not simulated: what this torch can do on CPU is accepted."""
    for dtype in ("fp32", "bf16", "fp16"):
        validate.check_dtype_runs("cpu", dtype)


# ---------------------------------------------------------------------------------------------
# Files and folders

def test_data_dir_missing(capsys, out, tmp_path, acc_argv):
    missing = tmp_path / "no-such-dir"
    rc, lines = run_cli(capsys, out, *acc_argv, "--data-dir", str(missing))
    assert_one_line_error(rc, lines, str(missing))


def test_data_dir_empty(capsys, out, tmp_path, acc_argv):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, lines = run_cli(capsys, out, *acc_argv, "--data-dir", str(empty))
    assert_one_line_error(rc, lines, str(empty), "empty")


def test_data_dir_without_class_folders(capsys, out, tmp_path, acc_argv):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "img0.png").write_bytes(b"\x89PNG not really")
    rc, lines = run_cli(capsys, out, *acc_argv, "--data-dir", str(flat))
    assert_one_line_error(rc, lines, str(flat), "class")


def test_checkpoint_missing(capsys, out, tmp_path):
    missing = tmp_path / "weights.pth"
    rc, lines = run_cli(capsys, out, "--metrics", "flops", "--checkpoint", str(missing))
    assert_one_line_error(rc, lines, "weights.pth", "does not exist", "valid:")


def test_checkpoint_corrupt(capsys, out, tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a pickle nor a zip archive" * 10)
    rc, lines = run_cli(capsys, out, "--metrics", "flops", "--checkpoint", str(corrupt))
    assert_one_line_error(rc, lines, "corrupt.pth", "cannot be read")


def test_checkpoint_with_mismatched_shapes_lists_the_keys(capsys, out, checkpoint_of_other_width):
    rc, lines = run_cli(capsys, out, "--metrics", "flops", "--checkpoint", str(checkpoint_of_other_width))
    assert_one_line_error(rc, lines, "narrow.pth", "mismatched shapes", "cls_token", "(1, 1, 32)", "(1, 1, 64)")


@pytest.fixture
def embedded_weights_at(monkeypatch):
    """Point the embedded model's pretrained config (timm's `file` entry) at another path."""
    import timm

    original = timm.models.get_pretrained_cfg

    def move(path: Path):
        def get_pretrained_cfg(name, *args, **kwargs):
            cfg = original(name, *args, **kwargs)
            if cfg is not None and name.split(".")[0] == EMBEDDED_MODEL:
                cfg.file = str(path)
            return cfg
        monkeypatch.setattr(timm.models, "get_pretrained_cfg", get_pretrained_cfg)
    return move


def test_embedded_weights_missing(capsys, out, tmp_path, embedded_weights_at):
    embedded_weights_at(tmp_path / "gone.safetensors")
    rc, lines = run_cli(capsys, out, "--metrics", "acc", "--limit", "8")
    assert_one_line_error(rc, lines, "gone.safetensors", "missing", "scripts/train_embedded.py", "--checkpoint")


def test_embedded_weights_corrupt(capsys, out, tmp_path, embedded_weights_at):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
    embedded_weights_at(damaged)
    rc, lines = run_cli(capsys, out, "--metrics", "acc", "--limit", "8")
    assert_one_line_error(rc, lines, "damaged.safetensors", "cannot be read")


def test_output_dir_under_a_file(capsys, tmp_path):
    """Root can write anywhere a folder exists, so the unwritable case is a path through a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, lines = run_cli(capsys, blocker / "run", "--metrics", "flops")
    assert_one_line_error(rc, lines, "a-file", "valid:")
    assert blocker.read_text() == "not a folder"


def test_output_dir_is_a_file(capsys, tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    rc, lines = run_cli(capsys, blocker, "--metrics", "flops")
    assert_one_line_error(rc, lines, "results.txt", "is a file", "valid:")
    assert blocker.read_text() == "keep me"


def test_existing_run_folder_is_left_untouched(capsys, tmp_path):
    """A bad command aimed at a folder holding finished work neither writes nor rewrites anything."""
    run_dir = tmp_path / "finished-run"
    (run_dir / "records").mkdir(parents=True)
    (run_dir / "records" / "flops-none-1-0123456789ab.json").write_text('{"schema": 2}\n')
    (run_dir / "grid.json").write_text('{"schema": 2, "specs": []}\n')
    before = tree(run_dir)
    rc, lines = run_cli(capsys, run_dir, "--metrics", "flops", "--ratios", "2")
    assert_one_line_error(rc, lines, "'2'")
    assert tree(run_dir) == before


def test_preflight_of_a_good_grid_leaves_no_trace(tmp_path):
    """The output probe is removed and the run folder not created: pre-flight only looks."""
    from bench.spec import JobSpec

    specs = [JobSpec("flops", EMBEDDED_MODEL), JobSpec("flops", EMBEDDED_MODEL, method="evit", keep_ratio=0.5)]
    validate.preflight(specs, tmp_path / "new" / "run")
    assert list(tmp_path.iterdir()) == []


def test_preflight_for_jobs_that_run_elsewhere_skips_this_machines_devices(tmp_path):
    """A SLURM login node has no GPU; its jobs do. devices_here=False leaves the device to them."""
    from bench.spec import JobSpec

    spec = JobSpec("flops", EMBEDDED_MODEL, device="cuda:3", dtype="bf16")
    validate.preflight([spec], tmp_path / "run", devices_here=False)
    if not torch.cuda.is_available() or torch.cuda.device_count() < 4:
        with pytest.raises(validate.UsageError, match="cuda:3"):
            validate.preflight([spec], tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# What a user really sees: a separate process, stderr as the terminal gets it

@pytest.mark.slow
@pytest.mark.parametrize("argv, expected", [
    (["--ratios", "abc"], "'abc'"),  # rejected while parsing flags
    (["--models", "vit_tiny_patch16_22"], "vit_tiny_patch16_224"),  # rejected by pre-flight
    (["--out", "/dev/null/run"], "'/dev/null/run'"),  # pre-flight's last check, the output probe
    (["--methods", "idle", "--models", "vit_pwee_patch16_reg1_gap_256"], "ParallelScalingBlock"),  # not modelled
], ids=["ratio-not-a-number", "unknown-model", "output-under-a-file", "block-type-not-modelled"])
def test_cli_subprocess_prints_one_line_and_no_traceback(tmp_path, argv, expected):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "run_all.py", "--metrics", "flops", "--out", str(out), *argv],  # last --out wins
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("run_all.py: error: ") and expected in lines[0], lines
    assert proc.stdout == ""
    assert not out.exists()


def test_a_version_1_run_folder_is_named_as_such(capsys, tmp_path):
    """Run folders of the tokenbench before job kinds cannot be extended or collected: one line says which
    version they are, not a KeyError."""
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "grid.json").write_text('{"schema": 1, "specs": []}\n')
    before = tree(run_dir)
    for argv in (["--metrics", "flops", "--out", str(run_dir)], ["--collect", str(run_dir)]):
        assert run_all.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert_one_line_error(2, lines, "version-1 grid", "version 2")
    assert tree(run_dir) == before


@pytest.fixture
def imagenet_like(tmp_path) -> Path:
    """1000 class folders (ImageNet's count), one image: enough for every pre-flight check of the data."""
    data = tmp_path / "imagenet"
    for i in range(1000):
        (data / f"n{i:04d}").mkdir(parents=True)
    (data / "n0000" / "a.png").write_bytes(b"")
    return data


def test_pretrained_offline_fails_in_preflight(capsys, out, monkeypatch, imagenet_like):
    from bench import models

    monkeypatch.setattr(models, "_hub_reachable", lambda endpoint: False)
    monkeypatch.setattr(models, "_in_hub_cache", lambda cfg: False)
    rc, lines = run_cli(capsys, out, "--metrics", "acc", "--models", "deit_tiny_patch16_224", "--pretrained",
                        "--methods", "evit", "--limit", "4", "--data-dir", str(imagenet_like))
    assert_one_line_error(rc, lines, "deit_tiny_patch16_224", "hub cannot be reached", "--checkpoint")


def test_random_weights_without_opting_in_are_refused(capsys, out, imagenet_like):
    rc, lines = run_cli(capsys, out, "--metrics", "acc", "--models", "deit_tiny_patch16_224", "--methods", "evit",
                        "--limit", "8", "--data-dir", str(imagenet_like))
    assert_one_line_error(rc, lines, "deit_tiny_patch16_224", "no trained weights", "--random-weights")


def test_data_with_other_classes_than_the_head_is_refused_in_preflight(capsys, out, tmp_path, acc_argv):
    data = tmp_path / "twenty"
    for i in range(20):
        (data / f"c{i:02d}").mkdir(parents=True)
    (data / "c00" / "a.png").write_bytes(b"")
    rc, lines = run_cli(capsys, out, *acc_argv, "--data-dir", str(data))
    assert_one_line_error(rc, lines, "20 classes", "predicts 10")
