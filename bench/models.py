"""timm model creation, local checkpoints, and the embedded Fashion-MNIST ViT the project ships."""
from __future__ import annotations

from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = "tokenbench_vit_fmnist"
EMBEDDED_CHECKPOINT = ASSETS / f"{EMBEDDED_MODEL}.safetensors"

# The embedded default: DeiT-style (CLS token, qkv bias, token pooling) with 12 blocks so every
# method's default reduction layers apply unchanged; 28 px grey-scale input, patch 4 -> 7x7 = 49 patches.
EMBEDDED_ARCH = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10,
    embed_dim=64, depth=12, num_heads=4, mlp_ratio=4.0, qkv_bias=True,
)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

default_cfgs = generate_default_cfgs({
    f"{EMBEDDED_MODEL}.fmnist": dict(
        file=str(EMBEDDED_CHECKPOINT),
        num_classes=10, input_size=(1, 28, 28), pool_size=None,
        crop_pct=1.0, crop_mode="center", interpolation="bilinear",
        mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
        first_conv="patch_embed.proj", classifier="head",
        license="same as this project",
    ),
})


@register_model
def tokenbench_vit_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """12-block, width-64 ViT for 28x28 Fashion-MNIST, trained by scripts/train_embedded.py."""
    return build_model_with_cfg(
        VisionTransformer, EMBEDDED_MODEL, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(EMBEDDED_ARCH, **kwargs),
    )
