"""Calibration (bench/report/calibration.py): ECE and Brier score against hand computations, the accuracy
job's per-image arrays against a plain softmax, bootstrap CIs, old predictions files, and the report."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from bench import models
from bench.jobs import JobContext, accuracy
from bench.records import preds_path
from bench.report import calibration, tables
from bench.spec import JobSpec

# ----------------------------------------------------------------------------------------------
# ECE by hand


def test_ece_of_a_hand_example():
    # bins of width 1/15: 0.95 -> bin 14, 0.6 -> bin 8, 0.3 -> bin 4 (each its own bin)
    conf = [0.95, 0.95, 0.6, 0.6, 0.3]
    correct = [1, 0, 1, 1, 0]
    # |acc - conf| weighted by share: bin 14: 2/5 * |0.5 - 0.95|; bin 8: 2/5 * |1 - 0.6|; bin 4: 1/5 * 0.3
    expected = 2 / 5 * 0.45 + 2 / 5 * 0.4 + 1 / 5 * 0.3
    assert calibration.ece(conf, correct) == pytest.approx(expected) == pytest.approx(0.4)


def test_ece_averages_confidence_inside_a_bin():
    # 0.61 and 0.65 share the bin (0.6, 0.6667]: mean confidence 0.63, accuracy 0.5
    assert calibration.ece([0.61, 0.65], [1, 0]) == pytest.approx(abs(0.5 - 0.63))
    # a perfectly calibrated bin: confidence 0.5 and half right
    assert calibration.ece([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx(0.0)


def test_bins_are_right_closed():
    edges = np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 0.5, 1.0])
    assert calibration.bin_index(edges).tolist() == [0, 0, 1, 7, 14]


def test_ece_is_vectorised_over_leading_axes():
    rng = np.random.default_rng(0)
    conf, correct = rng.uniform(0.1, 1, (4, 50)), rng.integers(0, 2, (4, 50))
    rows = [calibration.ece(c, h) for c, h in zip(conf, correct)]
    np.testing.assert_allclose(calibration.ece(conf, correct), rows)
    with pytest.raises(calibration.CalibrationError):
        calibration.ece([0.5], [1, 0])


def test_reliability_bins():
    bins = calibration.reliability([0.95, 0.95, 0.6, 0.6, 0.3], [1, 0, 1, 1, 0])
    assert bins["count"][[4, 8, 14]].tolist() == [1, 2, 2] and bins["count"].sum() == 5
    assert bins["accuracy"][14] == pytest.approx(0.5) and bins["confidence"][8] == pytest.approx(0.6)
    assert math.isnan(bins["accuracy"][0])  # empty bin: not drawn


# ----------------------------------------------------------------------------------------------
# Brier terms from the accuracy job


def test_calibration_arrays_of_a_hand_softmax():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
    out = accuracy.calibration_arrays(probs.log(), torch.tensor([0, 2]))
    np.testing.assert_allclose(out["confidence"], [0.7, 0.7], rtol=1e-6)
    np.testing.assert_allclose(out["p_true"], [0.7, 0.1], rtol=1e-6)
    # (0.7-1)^2 + 0.2^2 + 0.1^2 = 0.14; 0.7^2 + 0.2^2 + (0.1-1)^2 = 1.34
    np.testing.assert_allclose(out["brier"], [0.14, 1.34], rtol=1e-5)
    assert calibration.brier([0.14, 1.34]) == pytest.approx(0.74)


def test_accuracy_job_stores_calibration_arrays(tmp_path):
    spec = JobSpec(kind="acc", model=models.EMBEDDED_MODEL, method="evit", keep_ratio=0.5, limit=8, batch_size=4)
    metrics = accuracy.run(spec, JobContext(tmp_path, {}))
    with np.load(preds_path(tmp_path, spec.key)) as npz:
        files = {name: npz[name] for name in npz.files}
    assert set(files) == {"labels", "top5", "confidence", "p_true", "brier"}
    assert all(files[n].dtype == np.float32 and files[n].shape == (8,) for n in ("confidence", "p_true", "brier"))
    # against a direct forward of the same patched model
    model = accuracy.patched_model(spec, JobContext(tmp_path, {})).eval()
    from bench import data

    dataset = data.eval_dataset(spec.data, model, 8)
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([dataset[i][0] for i in range(8)])), -1).numpy()
    labels = files["labels"]
    np.testing.assert_allclose(files["confidence"], probs.max(1), rtol=1e-5)
    np.testing.assert_allclose(files["p_true"], probs[np.arange(8), labels], rtol=1e-5)
    onehot = np.eye(probs.shape[1])[labels]
    np.testing.assert_allclose(files["brier"], ((probs - onehot) ** 2).sum(1), rtol=1e-4, atol=1e-6)
    assert metrics["n_images"] == 8
    scores = calibration.of_file(preds_path(tmp_path, spec.key))
    assert scores["ece"] == pytest.approx(calibration.ece(files["confidence"], files["top5"][:, 0] == labels))
    assert scores["brier_ci_low"] <= scores["brier"] <= scores["brier_ci_high"]


# ----------------------------------------------------------------------------------------------
# CIs, old files, the report


def test_bootstrap_ci_brackets_and_is_reproducible():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.3, 1.0, 400)
    correct = (rng.uniform(size=400) < conf).astype(float)
    stat = lambda c, h, axis=-1: calibration.ece(c, h, axis=axis)  # noqa: E731
    low, high = calibration.bootstrap(stat, conf, correct, n_resamples=300)
    assert low <= calibration.ece(conf, correct) <= high
    assert (low, high) == calibration.bootstrap(stat, conf, correct, n_resamples=300)
    assert calibration.bootstrap(calibration.brier, np.full(50, 0.2), n_resamples=100) == pytest.approx((0.2, 0.2))


def test_old_predictions_files_get_no_calibration(tmp_path):
    old = tmp_path / "old.preds.npz"
    np.savez(old, labels=np.arange(4), top5=np.tile(np.arange(5), (4, 1)))
    assert all(math.isnan(v) for v in calibration.of_file(old).values())
    assert all(math.isnan(v) for v in calibration.of_file(tmp_path / "missing.npz").values())
    (tmp_path / "bad.preds.npz").write_bytes(b"not a zip")
    assert calibration.load(tmp_path / "bad.preds.npz") is None


def test_table_shows_calibration_only_when_present():
    row = dict(model="m", variant="evit", method="evit", keep_ratio=0.5, top1=80.0, ece=0.0312, ece_ci_low=0.02,
               ece_ci_high=0.04, brier=0.25, brier_ci_low=0.2, brier_ci_high=0.3)
    table = tables.paper_table(pd.DataFrame([row]))
    assert table.at[0, "ECE % [95% CI]"] == "3.12 [2.00, 4.00]" and table.at[0, "Brier [95% CI]"] == "0.250 [0.200, 0.300]"
    assert list(table.columns).index("ECE % [95% CI]") == list(table.columns).index("ΔTop-1") + 1
    without = tables.paper_table(pd.DataFrame([dict(row, ece=math.nan)]))
    assert "ECE % [95% CI]" not in without.columns
    section = calibration.markdown(pd.DataFrame([dict(row, regime="off-the-shelf")]))
    assert section[0] == "## Calibration" and "| m " in section[-2] and "3.12" in section[-2]


def test_reliability_figure_draws_an_interval_that_misses_its_point(tmp_path):
    """On few images the bootstrap ECE distribution sits above the ECE itself (ECE is biased upwards), so the
    percentile interval can lie wholly above the point: the figure draws it from its bounds (found by a
    200-image finetune run, where matplotlib's errorbar refused negative error lengths)."""
    spec = JobSpec(kind="acc", model=models.EMBEDDED_MODEL, method="evit", keep_ratio=0.5, limit=8, batch_size=4)
    accuracy.run(spec, JobContext(tmp_path, {}))
    base = dict(model="m", regime="off-the-shelf", variant="evit", method="evit", top1=80.0,
                preds_path=str(preds_path(tmp_path, spec.key)))
    rows = [dict(base, keep_ratio=0.5, ece=0.02, ece_ci_low=0.03, ece_ci_high=0.05),
            dict(base, keep_ratio=0.7, ece=0.01, ece_ci_low=0.005, ece_ci_high=0.02)]
    paths = calibration.write_figures(pd.DataFrame(rows), tmp_path / "figures")
    assert [path.exists() for path in paths.values()] == [True]
