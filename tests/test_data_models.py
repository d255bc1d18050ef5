"""Eval data (Fashion-MNIST, ImageNet-style folders) and model creation with local weights.

References are independent of the code under test: known Fashion-MNIST facts, PIL-only image
pipelines, and state dicts compared tensor by tensor with the model they were saved from.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from bench import data, models
from bench.data import DataError
from bench.models import ModelError

# A small timm ViT (a narrow, 2-block vit_tiny) at an unusual size: 36 px, patch 12 -> 3x3 patches. timm's default ViT eval
# transform (crop_pct 0.9, bicubic, mean = std = 0.5) then resizes to floor(36 / 0.9) = 40 and
# center-crops 36, an even 2-pixel border on each side.
SMALL = dict(img_size=36, patch_size=12, num_classes=3, embed_dim=48, depth=2, num_heads=3)
SMALL_NAME = "vit_tiny_patch16_224"


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
# Fashion-MNIST, the embedded default

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(),
                                  reason="Debian's dataset-fashion-mnist is not installed")


@needs_fmnist
def test_fashion_mnist_files_have_the_published_counts_and_statistics():
    test_x, test_y = data.load_fashion_mnist("test", FMNIST)
    train_x, train_y = data.load_fashion_mnist("train", FMNIST)
    assert test_x.shape == (10000, 28, 28) and train_x.shape == (60000, 28, 28)
    assert test_x.dtype == torch.uint8 and test_y.dtype == torch.int64
    # Balanced classes 0..9: 1000 test and 6000 train images each.
    assert torch.bincount(test_y).tolist() == [1000] * 10
    assert torch.bincount(train_y).tolist() == [6000] * 10
    assert test_y[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt
    assert abs(train_x.float().div(255).mean().item() - 0.2860) < 5e-4
    assert abs(train_x.float().div(255).std().item() - 0.3530) < 5e-4


@needs_fmnist
def test_fashion_mnist_eval_set_uses_the_embedded_models_transform():
    model = models.create_model(models.EMBEDDED_MODEL)
    dataset = data.eval_dataset("fashion-mnist", model, limit=7)
    images, labels = data.load_fashion_mnist("test", FMNIST)
    assert len(dataset) == 7 and dataset.targets == labels[:7].tolist()
    assert dataset.classes[9] == "Ankle boot"
    for i in (0, 6):
        tensor, label = dataset[i]
        expected = (images[i].float() / 255 - 0.2860) / 0.3530  # the training script's normalisation
        assert tensor.shape == (1, 28, 28) and label == labels[i].item()
        torch.testing.assert_close(tensor[0], expected, atol=1e-5, rtol=0)
    assert dataset.data_config["input_size"] == (1, 28, 28) and dataset.data_config["crop_pct"] == 1.0
    assert "10000 images" in data.check_data("fashion-mnist")


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


# ---------------------------------------------------------------------------------------------
# Checkpoints

@pytest.mark.parametrize("layout", ["deit", "state_dict", "bare", "safetensors"])
def test_checkpoint_formats_load_the_saved_weights(tmp_path, layout):
    source = small_model(seed=1)
    sd = source.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"deit": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd}, "bare": sd}[layout], path)
    loaded = models.create_model(SMALL_NAME, checkpoint=path, **SMALL)
    assert state_dicts_equal(loaded.state_dict(), sd)
    assert not state_dicts_equal(small_model(seed=2).state_dict(), sd)  # the check can fail


def test_checkpoint_at_another_resolution_is_resized_by_timms_filter(tmp_path):
    source = timm.create_model(SMALL_NAME, **dict(SMALL, img_size=24))  # 2x2 patches
    path = tmp_path / "w24.pth"
    torch.save({"model": source.state_dict()}, path)
    model = models.create_model(SMALL_NAME, checkpoint=path, **SMALL)  # 3x3 patches
    assert model.pos_embed.shape == (1, 10, 48)
    torch.testing.assert_close(model.cls_token, source.cls_token)
    torch.testing.assert_close(model.pos_embed[:, :1], source.pos_embed[:, :1])  # prefix kept as is


def test_check_checkpoint_preflight(tmp_path):
    path = tmp_path / "embedded.pth"
    torch.save({"model": models.create_model(models.EMBEDDED_MODEL).state_dict()}, path)
    models.check_checkpoint(models.EMBEDDED_MODEL, str(path))  # fits: no error
    with pytest.raises(ModelError, match=r"does not fit .*cls_token \(1, 1, 64\) vs model \(1, 1, 192\)"):
        models.check_checkpoint(SMALL_NAME, str(path))


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match="does not exist") as info:
        models.create_model(SMALL_NAME, checkpoint=path, **SMALL)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["broken.pth", "broken.safetensors"])
def test_corrupt_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x02 definitely not a checkpoint" * 10)
    for check in (lambda: models.create_model(SMALL_NAME, checkpoint=path, **SMALL),
                  lambda: models.check_checkpoint(SMALL_NAME, path)):
        with pytest.raises(ModelError, match="cannot be read") as info:
            check()
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_without_tensors(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelError, match="no state dict"):
        models.create_model(SMALL_NAME, checkpoint=path, **SMALL)


def test_mismatched_shapes_list_every_key_with_both_shapes(tmp_path):
    source = timm.create_model(SMALL_NAME, **dict(SMALL, num_classes=5))
    path = tmp_path / "five.pth"
    torch.save({"model": source.state_dict()}, path)
    with pytest.raises(ModelError) as info:
        models.create_model(SMALL_NAME, checkpoint=path, **SMALL)
    text = str(info.value)
    assert "head.weight (5, 48) vs model (3, 48)" in text and "head.bias (5,) vs model (3,)" in text
    assert str(path) in text and "\n" not in text


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = small_model().state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(ModelError, match=r"missing keys: norm\.weight.*unexpected keys: extra\.weight"):
        models.create_model(SMALL_NAME, checkpoint=path, **SMALL)


# ---------------------------------------------------------------------------------------------
# Model names and pretrained weights

def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError) as info:
        models.create_model("vit_smal_patch16_224")
    text = str(info.value)
    assert "'vit_smal_patch16_224'" in text and "vit_small_patch16_224" in text


def test_pretrained_offline_says_to_pass_a_checkpoint(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read at import time by the hub client
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-tokenbench-cache")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", "/nonexistent-tokenbench-cache")
    with pytest.raises(ModelError) as info:
        models.create_model("vit_tiny_patch16_224", pretrained=True, img_size=32, patch_size=16)
    text = str(info.value)
    assert "vit_tiny_patch16_224" in text and "--checkpoint FILE" in text and "\n" not in text


def test_embedded_pretrained_file_missing_says_how_to_make_it(monkeypatch, tmp_path):
    cfg = timm.models.get_pretrained_cfg(models.EMBEDDED_MODEL)
    missing = dataclasses.replace(cfg, file=str(tmp_path / "absent.safetensors"))
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda *a, **k: missing)
    with pytest.raises(ModelError, match=r"absent\.safetensors.*scripts/train_embedded\.py"):
        models.create_model(models.EMBEDDED_MODEL, pretrained=True)


def test_embedded_model_loads_its_committed_file_through_timm(monkeypatch, tmp_path):
    """The pretrained_cfg `file` mechanism, pointed at a file we write (the real one may not exist yet)."""
    source = models.create_model(models.EMBEDDED_MODEL)
    path = tmp_path / "embedded.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = models.create_model(models.EMBEDDED_MODEL, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)))
    assert state_dicts_equal(model.state_dict(), source.state_dict())


def test_embedded_model_defaults_to_its_weights():
    assert models.wants_pretrained(models.EMBEDDED_MODEL, None, False)
    assert not models.wants_pretrained(models.EMBEDDED_MODEL, "/some/file.pth", False)
    assert not models.wants_pretrained(SMALL_NAME, None, False)
    assert models.wants_pretrained(SMALL_NAME, None, True)
