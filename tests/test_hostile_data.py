"""Damaged data: a predictions file that does not match its record (item 3), and an eval folder with
unreadable images (item 8).

A finished accuracy record stands only together with its `<key>.preds.npz`: every paired statistic of
the report reads it. An image that cannot be decoded is named in one line; `--skip-unreadable` leaves
such images out and the record lists them.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

import run_all
from bench import data, records, report
from bench.report import stats
from bench.report.__main__ import main as report_main
from tests.test_faults import stub_run

ACC_GRID = ["--metrics", "acc", "--methods", "evit,topk", "--ratios", "0.5", "--limit", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def finished_acc_run(tmp_path_factory) -> Path:
    """An accuracy run of three jobs (baseline, evit, topk) on 16 embedded images, made once."""
    run_dir = tmp_path_factory.mktemp("acc") / "run"
    assert run_all.main([*ACC_GRID, "--out", str(run_dir)]) == 0
    return run_dir


@pytest.fixture
def acc_run(finished_acc_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_acc_run, run_dir)
    return run_dir


@pytest.fixture
def measured_acc(monkeypatch):
    from bench import jobs

    real, keys = jobs.get("acc").run, []

    def counting(spec, context):
        keys.append(spec.key)
        return real(spec, context)

    stub_run(monkeypatch, "acc", counting)
    return keys


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


DAMAGES = {
    "missing": None,
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "garbage": lambda good: b"PK\x03\x04" + bytes(range(256)) * 4,
    "flipped-bytes": lambda good: good[:60] + bytes(b ^ 0xFF for b in good[60:120]) + good[120:],
    "other-arrays": lambda good: _npz(x=np.zeros(3)),
    "other-images": lambda good: _npz(labels=np.zeros(8, np.int64), top5=np.zeros((8, 5), np.int64)),
}


def damage(run_dir: Path, method: str, how: str) -> tuple[str, Path]:
    key = next(p.name.removesuffix(".json") for p in records.records_dir(run_dir).glob(f"acc-{method}-*.json"))
    preds = records.preds_path(run_dir, key)
    if DAMAGES[how] is None:
        preds.unlink()
    else:
        preds.write_bytes(DAMAGES[how](preds.read_bytes()))
    return key, preds


@pytest.mark.parametrize("how", DAMAGES)
def test_a_record_without_readable_predictions_is_recomputed(acc_run, capsys, measured_acc, how):
    key, preds = damage(acc_run, "evit", how)
    with pytest.raises(records.RecordError, match=preds.name):
        records.read_record(records.record_path(acc_run, key))
    capsys.readouterr()
    assert run_all.main([*ACC_GRID, "--out", str(acc_run)]) == 0
    out, err = capsys.readouterr()
    assert measured_acc == [key]  # recomputed, the others skipped
    assert "1 done, 2 skipped" in out
    assert "Traceback" not in err and preds.name in err and "invalid record" in err, err
    assert records.read_record(records.record_path(acc_run, key)).status == "ok"
    summary = report.summarize(report.load_runs(acc_run))
    acc_rows = summary[summary["top1"].notna()]
    assert len(acc_rows) == 3 and acc_rows["top1_ci_low"].notna().all()
    pairs = stats.pairwise_tests(summary, group_by=["model", "keep_ratio"], exclude_method="none")
    assert len(pairs) == 1  # evit against topk


@pytest.mark.parametrize("how", ["truncated", "garbage", "other-images"])
def test_report_of_a_folder_with_damaged_predictions_names_them(acc_run, capsys, how):
    key, preds = damage(acc_run, "topk", how)
    assert report_main([str(acc_run), "--no-figures", "--no-pictures"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    text = (acc_run / "report.md").read_text()
    assert preds.name in text  # listed under problems, not silently a row without its statistics
    assert key not in set(report.load_runs(acc_run)["key"])


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04 truncated", _npz(x=np.zeros(2))])
def test_load_predictions_refuses_damaged_files_with_its_own_error(tmp_path, content):
    path = tmp_path / "p.preds.npz"
    path.write_bytes(content)
    with pytest.raises(stats.StatsError, match="p.preds.npz"):
        stats.load_predictions(path)
    assert np.isnan(stats.ci_of_file(path)).all()


# ---------------------------------------------------------------------------------------------
# Item 8: unreadable images in an eval folder

@pytest.fixture
def folder_with_bad_images(tmp_path) -> tuple[Path, list[Path]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in range(10):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(root / f"c{label}" / f"{i}.png")
    truncated, not_an_image = root / "c3" / "1.png", root / "c5" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    not_an_image.write_text("an HTML error page saved as .png\n")
    return root, [truncated, not_an_image]


@pytest.fixture
def weights(tmp_path) -> Path:
    from tests.test_bad_input import save_embedded_checkpoint

    return save_embedded_checkpoint(tmp_path / "w.pth")


def bad_image_argv(root, weights, out, *extra) -> list[str]:
    return ["--metrics", "acc", "--methods", "evit", "--ratios", "0.5", "--data-dir", str(root),
            "--checkpoint", str(weights), "--batch-size", "4", "--out", str(out), *extra]


def test_an_unreadable_image_fails_the_job_with_one_line_naming_it(tmp_path, capsys, folder_with_bad_images, weights):
    root, bad = folder_with_bad_images
    run_dir = tmp_path / "run"
    assert run_all.main(bad_image_argv(root, weights, run_dir)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    _, failed, _ = records.scan(run_dir)
    assert len(failed) == 2  # the baseline and evit: each names the file
    for rec in failed.values():
        message = rec.data["error"]
        assert "\n" not in message and "--skip-unreadable" in message, message
        assert any(str(path) in message for path in bad), message
        assert rec.key in err and message.split(": ", 1)[1] in err


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_named_by_the_loader_in_and_out_of_workers(folder_with_bad_images, workers):
    import timm

    from bench.jobs.accuracy import evaluate

    root, bad = folder_with_bad_images
    model = timm.create_model("tokenbench_vit_fmnist")
    dataset = data.eval_dataset(str(root), model)
    with pytest.raises(data.UnreadableImage) as caught:
        evaluate(model, dataset, batch_size=4, progress=False, workers=workers)
    assert "\n" not in str(caught.value) and str(bad[1]) in str(caught.value)  # c5/0 comes first in the order


def test_skip_unreadable_leaves_them_out_and_the_record_lists_them(tmp_path, capsys, folder_with_bad_images, weights):
    root, bad = folder_with_bad_images
    run_dir = tmp_path / "run"
    assert run_all.main(bad_image_argv(root, weights, run_dir, "--skip-unreadable")) == 0
    done, failed, problems = records.scan(run_dir)
    assert len(done) == 2 and not failed and not problems
    for rec in done.values():
        assert rec.spec.extra == (("skip_unreadable", True),)
        assert rec.metrics["n_images"] == 18 and rec.metrics["skipped_images"] == 2
        assert sorted(rec.metrics["skipped_files"]) == sorted(str(p.resolve()) for p in bad)
        preds = np.load(records.preds_path(run_dir, rec.key))
        assert preds["labels"].shape == (18,) and (preds["labels"] >= 0).all()
    # Without the flag the same grid has other keys: a run that skipped images never passes for one that did not.
    assert run_all.main(bad_image_argv(root, weights, run_dir)) == 1


def test_every_image_unreadable_is_one_line_too(tmp_path, capsys, folder_with_bad_images, weights):
    root, _ = folder_with_bad_images
    for path in root.rglob("*.png"):
        path.write_bytes(b"")
    run_dir = tmp_path / "run"
    assert run_all.main(bad_image_argv(root, weights, run_dir, "--skip-unreadable")) == 1
    _, failed, _ = records.scan(run_dir)
    assert {"no readable image" in rec.data["error"] for rec in failed.values()} == {True}


def test_skip_unreadable_is_a_grid_flag(tmp_path, capsys):
    assert run_all.main(["--collect", str(tmp_path), "--skip-unreadable"]) == 2
    assert "--skip-unreadable cannot be combined" in capsys.readouterr().err


def test_accuracy_keys_without_the_flag_are_those_of_earlier_runs():
    """The skip setting is part of an accuracy job's key only when given: existing records stay valid."""
    import dataclasses

    from bench import grid, jobs

    acc = jobs.get("acc")
    before = dataclasses.replace(acc, key_fields=tuple(f for f in acc.key_fields if f != "extra"))
    for spec in grid.plan(run_all.parse([*ACC_GRID, "--device", "cpu"])[0]).jobs:
        assert spec.key == before.normalise(spec).key
