"""Model creation with local weights: checkpoint formats, timm's filters, one-line errors, pretrained weights
offline, and the embedded model's committed file. References compare state dicts tensor by tensor with the
model they were saved from."""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from safetensors.torch import save_file

from bench import models
from bench.models import ModelError
from tests.test_data import SMALL, SMALL_NAME, small_model, state_dicts_equal

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
