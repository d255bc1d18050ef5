"""Small stock timm ViTs with random float64 weights for the method tests (no downloads): a DeiT,
a distilled DeiT, a ViT with register tokens and LayerScale, and one without a CLS token."""
import copy
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import methods

IMG = 96  # 36 patches of 16 px


def randomize(model, seed):
    """Weights that make attention peaked and LayerScale matter (timm's init keeps both near-trivial),
    in float64 so that score rankings never hinge on rounding."""
    gen = torch.Generator().manual_seed(seed)
    model = model.to_empty(device="cpu").double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "token" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("gamma"):
                p.copy_(0.2 + 0.8 * torch.rand(p.shape, generator=gen))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def timm_model(name, seed, **kwargs):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, img_size=IMG, num_classes=10, **kwargs)
    return randomize(model, seed)


def registers_vit(seed):
    with torch.device("meta"):
        model = VisionTransformer(img_size=IMG, patch_size=16, embed_dim=48, depth=12, num_heads=3,
                                  num_classes=10, reg_tokens=4, qkv_bias=True, init_values=1.0)
    return randomize(model, seed)


def gap_vit(seed):
    with torch.device("meta"):
        model = VisionTransformer(img_size=IMG, patch_size=16, embed_dim=48, depth=12, num_heads=3,
                                  num_classes=10, class_token=False, global_pool="avg", qkv_bias=True)
    return randomize(model, seed)


MODELS = {
    "cls": lambda: timm_model("deit_tiny_patch16_224", 0),
    "distilled": lambda: timm_model("deit_tiny_distilled_patch16_224", 1),
    "registers": lambda: registers_vit(2),
    "gap": lambda: gap_vit(3),
}


@pytest.fixture(scope="module")
def models():
    return {name: make() for name, make in MODELS.items()}


def random_images(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMG, IMG, generator=gen, dtype=torch.float64)


def patched_copy(model, name, keep_ratio=1.0, fused_attn=True, **options):
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    return methods.apply(model, name, keep_ratio, **options)
