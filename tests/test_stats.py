"""bench.report.stats against answers worked out by hand: McNemar counts and p-values, degenerate CIs."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench.report import stats


def paired(a_only: int, b_only: int, both: int = 10, neither: int = 5):
    """Correctness vectors with the given discordant counts."""
    a = [1] * a_only + [0] * b_only + [1] * both + [0] * neither
    b = [0] * a_only + [1] * b_only + [1] * both + [0] * neither
    return np.array(a, bool), np.array(b, bool)


def write_preds(path, labels, top1):
    labels, top1 = np.asarray(labels, np.int64), np.asarray(top1, np.int64)
    top5 = np.stack([top1] + [(top1 + k) % 1000 for k in range(1, 5)], axis=1)
    np.savez(path, labels=labels, top5=top5)
    return path


def test_identical_predictions_give_p_one():
    a, _ = paired(0, 0)
    res = stats.mcnemar(a, a)
    assert (res.a_only, res.b_only, res.p_value, res.delta_top1) == (0, 0, 1.0, 0.0)
    assert not res.significant()


@pytest.mark.parametrize("a_only,b_only,exact,midp", [
    # n = 7 discordant, 1 vs 6: P(X <= 1) = (1 + 7) / 128; two-sided exact = 16/128;
    # mid-p = exact - P(X = 1) = 16/128 - 7/128.
    (1, 6, 16 / 128, 9 / 128),
    # n = 5, 0 vs 5: exact = 2 / 32; mid-p = 2/32 - 1/32.
    (0, 5, 2 / 32, 1 / 32),
    # n = 6, 3 vs 3: 2 * P(X <= 3) = 84/64 capped at 1; mid-p = 84/64 - 20/64 = 1.
    (3, 3, 1.0, 1.0),
    # n = 12, 2 vs 10: P(X <= 2) = (1 + 12 + 66) / 4096; exact = 158/4096; mid-p = (158 - 66) / 4096.
    (2, 10, 158 / 4096, 92 / 4096),
])
def test_mcnemar_hand_computed(a_only, b_only, exact, midp):
    a, b = paired(a_only, b_only)
    assert stats.mcnemar(a, b, mid_p=False).p_value == pytest.approx(exact, rel=1e-12)
    res = stats.mcnemar(a, b)
    assert res.p_value == pytest.approx(midp, rel=1e-12)
    assert (res.a_only, res.b_only, res.n) == (a_only, b_only, a.size)
    assert res.delta_top1 == pytest.approx(100.0 * (a_only - b_only) / a.size)
    assert stats.mcnemar(b, a).p_value == pytest.approx(midp)  # symmetric in the two methods


def test_ci_of_constant_vectors_is_degenerate():
    assert stats.bootstrap_ci(np.ones(50, bool)) == (100.0, 100.0)
    assert stats.bootstrap_ci(np.zeros(50, bool)) == (0.0, 0.0)


def test_ci_matches_binomial_width_and_is_seeded():
    x = np.r_[np.ones(320), np.zeros(80)]  # 80 % of 400
    low, high = stats.bootstrap_ci(x, seed=3)
    half = 1.96 * math.sqrt(0.8 * 0.2 / 400) * 100  # normal approximation, 3.92 points
    assert low < 80.0 < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert stats.bootstrap_ci(x, seed=3) == (low, high)


def test_paired_bootstrap_ci():
    a, b = paired(0, 0)
    assert stats.paired_bootstrap_ci(a, b) == (0.0, 0.0)
    a, b = paired(0, 40, both=40, neither=20)  # B always at least as right: every resample has delta <= 0
    low, high = stats.paired_bootstrap_ci(a, b)
    assert low < high <= 0.0


def test_predictions_files(tmp_path):
    labels = np.arange(10) % 3
    pa = write_preds(tmp_path / "a.npz", labels, labels)  # all right
    pb = write_preds(tmp_path / "b.npz", labels, np.where(np.arange(10) < 4, labels + 1, labels))  # 4 wrong
    res = stats.paired_test(stats.load_predictions(pa), stats.load_predictions(pb))
    assert (res.a_only, res.b_only) == (4, 0)
    assert res.p_value == pytest.approx(2 / 16 - 1 / 16)  # n = 4, 0 vs 4: exact 2/16, mid-p 1/16
    assert stats.paired_p_of_files(pa, pb) == pytest.approx(1 / 16)
    assert stats.ci_of_file(pa) == (100.0, 100.0)
    assert all(math.isnan(v) for v in stats.ci_of_file(tmp_path / "missing.npz"))
    other = write_preds(tmp_path / "c.npz", labels[::-1], labels[::-1])
    with pytest.raises(stats.StatsError, match="same images"):
        stats.paired_test(stats.load_predictions(pa), stats.load_predictions(other))
    assert math.isnan(stats.paired_p_of_files(pa, other))
    np.savez(tmp_path / "bad.npz", labels=labels)
    with pytest.raises(stats.StatsError, match="labels and top5"):
        stats.load_predictions(tmp_path / "bad.npz")


def test_pairwise_tests_only_within_groups(tmp_path):
    labels = np.zeros(8, np.int64)
    paths = [write_preds(tmp_path / f"{i}.npz", labels, np.where(np.arange(8) < i, 1, 0)) for i in range(3)]
    frame = pd.DataFrame(dict(model="m", method=["x", "y", "z"], keep_ratio=[0.5, 0.5, 0.7],
                              preds_path=[str(p) for p in paths]))
    pairs = stats.pairwise_tests(frame, group_by=["model", "keep_ratio"])
    assert len(pairs) == 1  # z is at another keep ratio
    row = pairs.iloc[0]
    assert (row["a"], row["b"], row["a_only"], row["b_only"]) == ("x", "y", 1, 0)
    assert row["p_value"] == pytest.approx(0.5)  # n = 1 discordant: exact 2 * 1/2 = 1, mid-p 1 - 1/2


def test_pairwise_tests_read_each_predictions_file_once(tmp_path, monkeypatch):
    labels = np.zeros(8, np.int64)
    paths = [str(write_preds(tmp_path / f"{i}.npz", labels, np.where(np.arange(8) < i, 1, 0))) for i in range(5)]
    frame = pd.DataFrame(dict(model="m", method=list("abcde"), keep_ratio=0.5, preds_path=paths))
    reads, load = [], stats.load_predictions
    monkeypatch.setattr(stats, "load_predictions", lambda path: reads.append(path) or load(path))
    assert len(stats.pairwise_tests(frame, group_by=["model", "keep_ratio"])) == 10
    assert sorted(reads) == sorted(paths)  # 5 reads, not 2 per pair (20)
