"""The accuracy job against a hand computation: PIL preprocessing, a plain forward, numpy top-k."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench import data, models
from bench.data import DataError
from bench.jobs import JobContext, accuracy
from bench.records import preds_path
from bench.spec import JobSpec
from tests.test_data import SMALL, SMALL_NAME, make_image_folder, reference_input, small_model

TEN = [f"c{i}" for i in range(10)]  # the embedded model's head has 10 classes; data must have as many


def run(spec: JobSpec, run_dir: Path) -> dict:
    return accuracy.run(spec, JobContext(run_dir, {}))


def reference_predictions(model, paths, **transform) -> np.ndarray:
    """Class ids sorted by logit, best first, from a direct forward of hand-made inputs."""
    with torch.no_grad():
        logits = model.eval()(torch.stack([reference_input(Path(p), **transform) for p in paths]))
    return np.argsort(-logits.numpy(), axis=1, kind="stable")


def test_evaluate_matches_a_manual_computation(tmp_path):
    root = make_image_folder(tmp_path / "val")
    checkpoint = tmp_path / "deit.pth"
    torch.save({"model": small_model(seed=3).state_dict()}, checkpoint)  # DeiT layout
    model = models.create_model(SMALL_NAME, checkpoint=checkpoint, **SMALL)
    dataset = data.eval_dataset(str(root), model)
    result = accuracy.evaluate(model, dataset, batch_size=5, progress=False)

    samples = [dataset.dataset.samples[i] for i in dataset.indices]
    expected_order = reference_predictions(small_model(seed=3), [p for p, _ in samples])
    labels = np.array([label for _, label in samples])
    # 3 classes: the 4th and 5th ids do not exist and are padded with -1.
    np.testing.assert_array_equal(result["top5_ids"][:, :3], expected_order)
    assert (result["top5_ids"][:, 3:] == -1).all()
    np.testing.assert_array_equal(result["labels"], labels)
    assert result["labels"].dtype == np.int64 and result["top5_ids"].dtype == np.int64
    assert result["n_images"] == 12
    assert result["top1"] == pytest.approx(100.0 * np.mean(expected_order[:, 0] == labels))
    assert result["top5"] == 100.0  # every one of 3 classes is within the top 5


def _spec(root, checkpoint, **kw) -> JobSpec:
    fields = dict(kind="acc", model=models.EMBEDDED_MODEL, checkpoint=str(checkpoint), data=str(root),
                  batch_size=4)
    return JobSpec(**dict(fields, **kw))


@pytest.fixture
def embedded_checkpoint(tmp_path) -> Path:
    torch.manual_seed(5)
    path = tmp_path / "embedded.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in models.create_model(models.EMBEDDED_MODEL).state_dict().items()},
              str(path))
    return path


def test_run_writes_predictions_and_the_contract_metrics(tmp_path, embedded_checkpoint):
    root = make_image_folder(tmp_path / "val", classes=TEN, per_class=2, size=28)
    spec = _spec(root, embedded_checkpoint)
    metrics = run(spec, tmp_path / "run")

    preds = np.load(preds_path(tmp_path / "run", spec.key))
    assert metrics["preds_file"] == f"{spec.key}.preds.npz"
    assert preds["labels"].dtype == np.int64 and preds["top5"].shape == (20, 5)
    # the record's numbers are those of the prediction file
    assert metrics["top1"] == pytest.approx(100 * np.mean(preds["top5"][:, 0] == preds["labels"]))
    assert metrics["top5"] == pytest.approx(100 * np.mean((preds["top5"] == preds["labels"][:, None]).any(1)))
    # and of a hand computation with the checkpoint's weights (grey model: images converted to L)
    samples = data.eval_dataset(str(root), models.create_model(models.EMBEDDED_MODEL))
    paths = [samples.dataset.samples[i][0] for i in samples.indices]
    reference = models.create_model(models.EMBEDDED_MODEL, checkpoint=embedded_checkpoint)
    expected = reference_predictions(reference, paths, size=28, scale=28, mode="L", mean=0.2860, std=0.3530)
    np.testing.assert_array_equal(preds["top5"], expected[:, :5])
    assert metrics["n_images"] == 20 and metrics["weights"] == f"checkpoint:{embedded_checkpoint}"
    assert metrics["regime"] == "off-the-shelf"
    assert metrics["tokens_per_block"] == [50] * 12  # 7x7 patches + CLS, nothing reduced
    assert metrics["data_config"]["input_size"] == [1, 28, 28]
    assert not list((tmp_path / "run" / "records").glob(".*"))  # no temp file left behind


@pytest.mark.parametrize("method", ["none", "random"])
def test_run_is_deterministic(tmp_path, embedded_checkpoint, method):
    root = make_image_folder(tmp_path / "val", classes=TEN, per_class=1, size=28)
    spec = _spec(root, embedded_checkpoint, method=method, keep_ratio=0.5 if method != "none" else 1.0, seed=7)
    first = run(spec, tmp_path / "a")
    second = run(spec, tmp_path / "b")
    assert first == {**second, "preds_file": first["preds_file"]}
    a, b = np.load(preds_path(tmp_path / "a", spec.key)), np.load(preds_path(tmp_path / "b", spec.key))
    np.testing.assert_array_equal(a["top5"], b["top5"])


def test_run_limit_takes_a_class_balanced_prefix(tmp_path, embedded_checkpoint):
    root = make_image_folder(tmp_path / "val", classes=TEN, per_class=2, size=28)
    spec = _spec(root, embedded_checkpoint, limit=12)
    metrics = run(spec, tmp_path / "run")
    assert metrics["n_images"] == 12
    assert np.load(preds_path(tmp_path / "run", spec.key))["labels"].tolist() == [*range(10), 0, 1]


@pytest.mark.parametrize("count", [12, 3])
def test_a_class_count_other_than_the_heads_is_a_data_error(tmp_path, embedded_checkpoint, count):
    """More classes than outputs, or fewer (a subset of ImageNet's folders would be numbered 0..k-1 and
    scored against the wrong outputs): refused in pre-flight and by the job itself."""
    root = make_image_folder(tmp_path / "val", classes=[f"c{i:02d}" for i in range(count)], per_class=1, size=28)
    with pytest.raises(DataError, match=f"{count} classes .* predicts 10"):
        accuracy.validate(_spec(root, embedded_checkpoint))
    with pytest.raises(DataError, match=f"{count} classes .* predicts 10"):
        run(_spec(root, embedded_checkpoint), tmp_path / "run")


def test_random_weights_are_refused_unless_asked_for(tmp_path):
    root = make_image_folder(tmp_path / "val", classes=["c000"], per_class=1)
    for i in range(1, 1000):  # ImageNet's class count; one image is enough for the folder check
        (root / f"c{i:03d}").mkdir()
    spec = JobSpec("acc", "deit_tiny_patch16_224", "evit", 0.7, data=str(root))
    with pytest.raises(models.ModelError, match="no trained weights .* --random-weights"):
        accuracy.validate(spec)
    accuracy.validate(JobSpec("acc", "deit_tiny_patch16_224", data=str(root), random_weights=True))
    assert models.weights_of(JobSpec("acc", "deit_tiny_patch16_224", random_weights=True)) == "random-init"


def test_run_on_the_embedded_default_data(tmp_path, embedded_checkpoint):
    spec = JobSpec(kind="acc", model=models.EMBEDDED_MODEL, checkpoint=str(embedded_checkpoint), limit=16,
                   batch_size=8)
    metrics = run(spec, tmp_path / "run")
    labels = np.load(preds_path(tmp_path / "run", spec.key))["labels"]
    assert labels.tolist() == data.load_fashion_mnist("test")[1][:16].tolist()
    assert metrics["n_images"] == 16 and 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    assert metrics["data_config"]["mean"] == [0.2860]
