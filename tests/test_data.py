"""Eval data: the shipped Fashion-MNIST files and ImageNet-style folders through the timm eval transform.

References are independent of the code under test: known Fashion-MNIST facts, PIL-only image
pipelines, and state dicts compared tensor by tensor with the model they were saved from.
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from bench import data, models
from bench.data import DataError

# A small timm ViT (a narrow, 2-block vit_tiny) at an unusual size: 36 px, patch 12 -> 3x3 patches. timm's default ViT eval
# transform (crop_pct 0.9, bicubic, mean = std = 0.5) then resizes to floor(36 / 0.9) = 40 and
# center-crops 36, an even 2-pixel border on each side.
SMALL = dict(img_size=36, patch_size=12, num_classes=3, embed_dim=48, depth=2, num_heads=3)
SMALL_NAME = "vit_tiny_patch16_224"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Helpers shared with test_accuracy.py

def make_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4, size: int = 44,
                      seed: int = 0) -> Path:
    """ImageNet-style folder of random PNGs; the last image of each class is grey-scale."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 5, 3), dtype=np.uint8)  # not square on purpose
            image = Image.fromarray(pixels)
            if i == per_class - 1:
                image = image.convert("L")
            image.save(root / name / f"img{i}.png")
    return root


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(SMALL_NAME, **SMALL).eval()


def reference_input(path: Path, size: int = 36, scale: int = 40, mode: str = "RGB",
                    mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """The eval transform by hand with PIL: shorter side to `scale` (bicubic), centre crop, normalise."""
    image = Image.open(path).convert(mode)
    w, h = image.size
    new_w, new_h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy((array - mean) / std).permute(2, 0, 1)


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST, the embedded default: shipped in bench/assets/fashion-mnist, so nothing here skips

# Zalando's published MD5s of its original files (the table in github.com/zalandoresearch/fashion-mnist).
ZALANDO_MD5 = {"t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
               "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}
SUBSET_COUNTS = [1935, 2025, 1982, 2011, 1967, 2010, 2068, 2003, 1971, 2028]  # first 20,000 train labels


def needs_fmnist(test):
    """No-op: the data ships with the project. Kept only while test_accuracy.py still imports it."""
    return test


def load_train_embedded():
    spec = importlib.util.spec_from_file_location("train_embedded", ROOT / "scripts" / "train_embedded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_full_copy(tmp_path, monkeypatch):
    """No full Fashion-MNIST anywhere: no environment variable, no Debian package, no torchvision cache."""
    monkeypatch.delenv("TOKENBENCH_FASHION_MNIST", raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(data, "TORCHVISION_ROOT", tmp_path / "no-torchvision")


def test_shipped_test_split_is_zalandos_original_files():
    for name, md5 in ZALANDO_MD5.items():
        assert hashlib.md5((data.SHIPPED_FASHION_MNIST / name).read_bytes()).hexdigest() == md5


def test_shipped_test_split_has_the_published_counts_and_statistics(monkeypatch):
    monkeypatch.setenv("TOKENBENCH_FASHION_MNIST", "/nonexistent")  # only training looks for a full copy
    images, labels = data.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10  # balanced classes 0..9
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt
    assert images.long().sum().item() == 573469082
    pixels = images.double() / 255
    # The test split's own statistics; 0.2860 / 0.3530 (the model's normalisation) are the train split's.
    assert round(pixels.mean().item(), 4) == 0.2868 and round(pixels.std().item(), 4) == 0.3524


def test_shipped_train_subset_is_20000_images_close_to_class_balanced():
    images, labels = data.load_fashion_mnist("train")
    assert images.shape == (20000, 28, 28) and labels.shape == (20000,)
    counts = torch.bincount(labels, minlength=10).tolist()
    assert counts == SUBSET_COUNTS and all(abs(c - 2000) <= 0.035 * 2000 for c in counts)
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the train split's first labels
    assert images.long().sum().item() == 1142624448
    pixels = images.double() / 255
    assert round(pixels.mean().item(), 4) == 0.2858 and round(pixels.std().item(), 4) == 0.3532
    # Close to the full train split's statistics, which the embedded model normalises with.
    assert abs(pixels.mean().item() - models.FASHION_MNIST_MEAN[0]) < 5e-4
    assert abs(pixels.std().item() - models.FASHION_MNIST_STD[0]) < 5e-4


def test_shipped_files_match_their_recorded_sha256():
    for name, digest in data.SHIPPED_SHA256.items():
        assert hashlib.sha256((data.SHIPPED_FASHION_MNIST / name).read_bytes()).hexdigest() == digest
    assert set(data.SHIPPED_SHA256) == {p.name for p in data.SHIPPED_FASHION_MNIST.glob("*.gz")}
    readme = (data.SHIPPED_FASHION_MNIST / "README.md").read_text()
    assert all(digest in readme for digest in data.SHIPPED_SHA256.values())
    assert "MIT License" in (data.SHIPPED_FASHION_MNIST / "LICENSE").read_text()


@pytest.mark.parametrize("damage", ["truncated", "one byte changed", "missing"])
def test_a_damaged_shipped_file_is_one_clear_data_error(tmp_path, monkeypatch, damage):
    copy = tmp_path / "fashion-mnist"
    shutil.copytree(data.SHIPPED_FASHION_MNIST, copy)
    target = copy / "t10k-images-idx3-ubyte.gz"
    raw = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(raw[:len(raw) // 2])
    elif damage == "one byte changed":
        target.write_bytes(raw[:1000] + bytes([raw[1000] ^ 1]) + raw[1001:])
    else:
        target.unlink()
    monkeypatch.setattr(data, "SHIPPED_FASHION_MNIST", copy)
    model = models.create_model(models.EMBEDDED_MODEL)
    for check in (lambda: data.load_fashion_mnist("test"), lambda: data.check_data("fashion-mnist"),
                  lambda: data.eval_dataset("fashion-mnist", model), data.fashion_mnist_dir):
        with pytest.raises(DataError) as info:
            check()
        text = str(info.value)
        assert str(target) in text and "\n" not in text and "git checkout -- bench/assets/fashion-mnist" in text
        assert ("is missing" if damage == "missing" else "is damaged (sha256") in text
    assert data.load_fashion_mnist("train")[1].shape == (20000,)  # the intact files of the copy still load


def test_fashion_mnist_eval_set_uses_the_embedded_models_transform(no_full_copy):
    model = models.create_model(models.EMBEDDED_MODEL)
    dataset = data.eval_dataset("fashion-mnist", model, limit=7)
    images, labels = data.load_fashion_mnist("test")
    assert len(dataset) == 7 and dataset.targets == labels[:7].tolist()
    assert dataset.classes[9] == "Ankle boot"
    for i in (0, 6):
        tensor, label = dataset[i]
        expected = (images[i].float() / 255 - 0.2860) / 0.3530  # the training script's normalisation
        assert tensor.shape == (1, 28, 28) and label == labels[i].item()
        torch.testing.assert_close(tensor[0], expected, atol=1e-5, rtol=0)
    assert dataset.data_config["input_size"] == (1, 28, 28) and dataset.data_config["crop_pct"] == 1.0
    for name in ZALANDO_MD5:  # the record says which files, and which bytes
        assert f"bench/assets/fashion-mnist/{name} (sha256 {data.SHIPPED_SHA256[name][:12]})" in dataset.source
    assert "10000 images" in data.check_data("fashion-mnist")
    assert data.fashion_mnist_dir() == data.SHIPPED_FASHION_MNIST


def test_a_full_copy_is_found_through_the_environment_variable(tmp_path, monkeypatch):
    full = tmp_path / "full"  # Zalando's file names; the shipped subset stands in for the 60,000 images
    full.mkdir()
    for kind in ("images-idx3", "labels-idx1"):
        shutil.copy(data.SHIPPED_FASHION_MNIST / f"train20k-{kind}-ubyte.gz", full / f"train-{kind}-ubyte.gz")
    monkeypatch.setenv("TOKENBENCH_FASHION_MNIST", str(full))
    assert data.full_fashion_mnist_dir() == full
    images, labels = data.load_fashion_mnist("train", full)
    assert torch.equal(labels, data.load_fashion_mnist("train")[1]) and images.shape == (20000, 28, 28)
    with pytest.raises(DataError, match="has no Fashion-MNIST test files"):
        data.load_fashion_mnist("test", full)
    assert len(data.load_fashion_mnist("test")[1]) == 10000  # the default stays the shipped files


def test_no_full_copy_says_where_to_get_one(tmp_path, monkeypatch, no_full_copy):
    with pytest.raises(DataError) as info:
        data.full_fashion_mnist_dir()
    text = str(info.value)
    assert "\n" not in text and str(tmp_path / "no-debian") in text
    assert all(hint in text for hint in ("dataset-fashion-mnist", "TOKENBENCH_FASHION_MNIST", "zalandoresearch"))
    monkeypatch.setenv("TOKENBENCH_FASHION_MNIST", str(data.SHIPPED_FASHION_MNIST))  # a subset, not a full copy
    with pytest.raises(DataError, match="has no train-images-idx3-ubyte"):
        data.full_fashion_mnist_dir()


def test_training_script_without_a_full_copy_fails_with_one_line(tmp_path, capsys, no_full_copy):
    train_embedded = load_train_embedded()
    assert train_embedded.main(["--work-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "dataset-fashion-mnist" in err and "TOKENBENCH_FASHION_MNIST" in err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_training_script_wants_all_60000_training_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_FASHION_MNIST", str(tmp_path))
    for kind in ("images-idx3", "labels-idx1"):
        shutil.copy(data.SHIPPED_FASHION_MNIST / f"train20k-{kind}-ubyte.gz", tmp_path / f"train-{kind}-ubyte.gz")
    assert load_train_embedded().main(["--work-dir", str(tmp_path / "runs")]) == 2
    assert "20000 training images, not the full 60,000" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# ImageNet-style folders

def test_folder_images_go_through_the_models_timm_eval_transform(tmp_path):
    root = make_image_folder(tmp_path / "val")
    model = small_model()
    dataset = data.eval_dataset(str(root), model)
    assert dataset.classes == ["cat", "dog", "eel"] and len(dataset) == 12
    assert dataset.data_config["input_size"] == (3, 36, 36)  # follows the img_size override
    for position in range(len(dataset)):
        path, label = dataset.dataset.samples[dataset.indices[position]]
        tensor, got_label = dataset[position]
        assert got_label == label == ["cat", "dog", "eel"].index(Path(path).parent.name)
        torch.testing.assert_close(tensor, reference_input(Path(path)), atol=1e-6, rtol=0)


def test_folder_order_interleaves_classes_and_limit_takes_a_prefix(tmp_path):
    root = make_image_folder(tmp_path / "val")
    model = small_model()
    full = data.eval_dataset(str(root), model)
    assert full.targets == [0, 1, 2] * 4
    names = [Path(full.dataset.samples[i][0]).name for i in full.indices]
    assert names[:3] == ["img0.png"] * 3 and names[3:6] == ["img1.png"] * 3
    part = data.eval_dataset(str(root), model, limit=5)
    assert part.indices == full.indices[:5] and part.targets == [0, 1, 2, 0, 1]
    assert data.eval_dataset(str(root), model, limit=5).indices == part.indices  # deterministic


def test_grey_model_gets_grey_images(tmp_path):
    root = make_image_folder(tmp_path / "val", size=28)
    model = models.create_model(models.EMBEDDED_MODEL)
    tensor, _ = data.eval_dataset(str(root), model)[0]
    path = data.eval_dataset(str(root), model).dataset.samples[0][0]
    expected = reference_input(Path(path), size=28, scale=28, mode="L", mean=0.2860, std=0.3530)
    torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("empty", "is empty"),
    ("flat", "no class sub-folders"),
    ("no_images", "no images"),
])
def test_bad_data_folders_give_one_line_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout != "missing":
        root.mkdir()
    if layout == "flat":
        Image.new("RGB", (8, 8)).save(root / "a.png")
    if layout == "no_images":
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("not an image")
    for check in (lambda: data.check_data(str(root)), lambda: data.eval_dataset(str(root), small_model())):
        with pytest.raises(DataError) as info:
            check()
        text = str(info.value)
        assert message in text and str(root) in text and "\n" not in text
        assert "fashion-mnist" in text  # the valid alternatives


def test_bad_limit_is_a_data_error(tmp_path):
    root = make_image_folder(tmp_path / "val", per_class=1)
    with pytest.raises(DataError, match="limit 0"):
        data.eval_dataset(str(root), small_model(), limit=0)
