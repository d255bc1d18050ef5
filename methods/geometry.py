"""What the methods and the analytic cost model need to know about a timm ViT, read off the live model.

`Geometry.from_model` accepts exactly the architectures whose cost the formulas below model and whose
blocks the patched forwards reproduce; anything else is refused with one MethodError line that names
the model, the part and the supported families, rather than counted wrongly or patched silently:
- model: timm `VisionTransformer`, or `VisionTransformerDistilled` (DeiT: CLS + distillation token,
  two classifier heads);
- stem: timm `PatchEmbed` (one Conv2d per patch, optional per-token norm);
- every block (all of them are checked): timm pre-norm `Block` with timm `Attention` (optional
  qk-norm, output norm, gate) and a token-wise MLP, `Mlp`, `GluMlp` (incl. `SwiGLUPacked`) or
  `SwiGLU` on linear layers, with or without LayerScale;
- norms anywhere: LayerNorm / RmsNorm / SimpleNorm (per token, so they commute with selecting tokens);
- head: CLS token, average / max / avgmax pooling, attention pooling (`global_pool='map'`,
  `AttentionPoolLatent`: it runs on the tokens that reach it, so its cost follows the schedule's
  final token count), or no pooling (a classifier on every token).
Refused, e.g.: ParallelScalingBlock, ParallelThingsBlock, ResPostBlock (post-norm),
DiffParallelScalingBlock, DiffAttention, AttentionRope, ConvMlp / GatedMlp / 1x1-conv MLPs,
AttentionPoolPrr (`'prr'`), hybrid CNN stems and every non-VisionTransformer class (Eva, ...).

MACs count matrix products only (linear layers, the patch convolution, q k^T and A v), as fvcore
with its norm handles off does (methods/flops.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, NoReturn

from torch import nn

from .errors import MethodError
from .tokens import BlockTokens

Refuse = Callable[[str], NoReturn]  # raises the one-line MethodError naming an unsupported part

SUPPORTED_FAMILIES = (
    "supported: timm VisionTransformer or VisionTransformerDistilled with PatchEmbed, pre-norm Block, "
    "Attention (qk-norm, output norm, gate), Mlp/GluMlp/SwiGLUPacked/SwiGLU MLP, LayerScale, "
    "LayerNorm/RmsNorm/SimpleNorm, CLS/distillation/register tokens, token/avg/max/avgmax/map pooling or none; "
    "timm SwinTransformer (methods/swin.py) for the Swin methods"
)


@dataclass(frozen=True)
class Geometry:
    """Token counts, widths and per-token costs of a timm ViT (all blocks are alike)."""

    family: ClassVar[str] = "vit"  # which methods apply (`Method.families`); methods.swin.SwinGeometry is "swin"
    num_patches: int  # N0: image tokens at the input (grid_h * grid_w)
    num_prefix: int  # CLS + distillation + register tokens, always first in the sequence
    has_cls: bool  # the CLS token is at position 0
    depth: int
    dim: int
    num_heads: int
    attn_dim: int  # num_heads * head_dim (== dim for every DeiT/ViT)
    attn_linear_macs: int  # per token: qkv and output projections (+ the gate): 4 D^2 for DeiT
    mlp_macs: int  # per token: the MLP's linear layers, 2 D hidden for a GELU Mlp (8 D^2 at ratio 4)
    stem_macs: int  # patch embedding of one image
    head_macs: int  # per image, whatever the token count: classifier(s), attention-pool latent side
    head_token_macs: int = 0  # per token reaching the head: attention-pool K/V and logits, or a per-token classifier
    head_reads_prefix: bool = False  # the prefix tokens reach the head's per-token part too
    pool: str = "token"  # what the head reads: "token" (CLS), "avg", "max", "avgmax", "map" or "" (every token)

    @property
    def head_dim(self) -> int:
        return self.attn_dim // self.num_heads

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    def head_cost(self, final_tokens: int) -> int:
        """MACs of the head on the `final_tokens` (prefix included) that leave the last block."""
        reaching = final_tokens if self.head_reads_prefix else final_tokens - self.num_prefix
        return self.head_macs + self.head_token_macs * reaching

    @property
    def fixed_macs(self) -> int:
        """MACs outside the blocks that no method changes, besides stem and head (Swin: PatchMerging). 0 here."""
        return 0

    def blocks_of(self, model: nn.Module) -> list[nn.Module]:
        """The model's blocks in the order of their indices (the indices of `layers` and the schedule)."""
        return list(model.blocks)

    def stock_tokens(self, index: int):
        """`BlockTokens` of the stock block `index`: every token, one sequence."""
        n = self.num_tokens
        return BlockTokens(n, n, n, n)

    def block_macs(self, index: int, tokens) -> int:
        """The stock block on the scheduled tokens: `standard_block_macs(n_attn, n_mlp)`."""
        return standard_block_macs(self, tokens.n_attn, tokens.n_mlp)

    @classmethod
    def from_model(cls, model: nn.Module) -> "Geometry":
        """Read a live (or meta-device) flat timm ViT; MethodError for anything not modelled (see module
        doc). `methods.model_geometry` reads any modelled family (a Swin model gives its SwinGeometry)."""
        return read_geometry(model)


def standard_block_macs(g: Geometry, n_attn: int, n_mlp: int) -> int:
    """A stock pre-norm block (docs/methods.md#block-cost): projections + q k^T + A v on n_attn tokens, MLP on n_mlp.

    12 n D^2 + 2 n^2 D for DeiT; norms, softmax and activations are not counted (the field's convention).
    """
    return n_attn * g.attn_linear_macs + 2 * n_attn * n_attn * g.attn_dim + n_mlp * g.mlp_macs


def stock_type(module: nn.Module) -> type:
    """The timm class of a module, also once a method has swapped in its subclass (base.swap_class)."""
    return vars(type(module)).get("_stock_class", type(module))


# ---------------------------------------------------------------------------------------------
# Reading and checking a model

def _per_token_norms() -> tuple[type, ...]:
    from timm.layers import norm

    return (nn.Identity, nn.LayerNorm, nn.RMSNorm, norm.LayerNorm, norm.LayerNormFp32, norm.RmsNorm,
            norm.RmsNormFp32, norm.SimpleNorm, norm.SimpleNormFp32)


def _linear_macs(module: nn.Module) -> int:
    """Per-token MACs of a Linear (0 for an Identity standing in for one)."""
    return module.in_features * module.out_features if isinstance(module, nn.Linear) else 0


def _model_label(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, cls_name = cfg.get("architecture"), stock_type(model).__name__
    return f"{arch} ({cls_name})" if arch else cls_name


def read_geometry(model: nn.Module) -> Geometry:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    label = _model_label(model)

    def refuse(part: str) -> NoReturn:
        raise MethodError(f"{label}: {part} is not modelled by the token-reduction methods; {SUPPORTED_FAMILIES}")

    model_class = stock_type(model)
    if model_class not in (VisionTransformer, VisionTransformerDistilled):
        refuse(f"model class {model_class.__name__}")
    if len(model.blocks) == 0:
        refuse("a model without blocks")
    norms = _per_token_norms()
    for name in ("norm_pre", "norm", "fc_norm"):
        _check_norm(getattr(model, name), name, norms, refuse)
    stem_macs, num_patches = _stem(model.patch_embed, int(model.embed_dim), norms, refuse)

    dim = int(model.embed_dim)
    signatures = [_block_signature(block, i, dim, norms, refuse) for i, block in enumerate(model.blocks)]
    for i, signature in enumerate(signatures):
        if signature != signatures[0]:
            refuse(f"blocks of different shapes (block {i} differs from block 0)")
    num_heads, head_dim, attn_linear_macs, mlp_macs = signatures[0]
    head_macs, head_token_macs, head_reads_prefix = _head(model, norms, refuse)
    return Geometry(
        pool="map" if model.attn_pool is not None else str(model.global_pool),
        num_patches=num_patches,
        num_prefix=int(model.num_prefix_tokens),
        has_cls=model.cls_token is not None,
        depth=len(model.blocks),
        dim=dim,
        num_heads=num_heads,
        attn_dim=num_heads * head_dim,
        attn_linear_macs=attn_linear_macs,
        mlp_macs=mlp_macs,
        stem_macs=stem_macs,
        head_macs=head_macs,
        head_token_macs=head_token_macs,
        head_reads_prefix=head_reads_prefix,
    )


def _check_norm(module: nn.Module, where: str, norms: tuple[type, ...], refuse: Refuse) -> None:
    if type(module) not in norms:
        refuse(f"norm {type(module).__name__} ({where})")


def _stem(patch_embed: nn.Module, dim: int, norms, refuse: Refuse) -> tuple[int, int]:
    from timm.layers import PatchEmbed

    if type(patch_embed) is not PatchEmbed or type(patch_embed.proj) is not nn.Conv2d:
        refuse(f"patch embedding {type(patch_embed).__name__}")
    _check_norm(patch_embed.norm, "patch_embed.norm", norms, refuse)
    proj = patch_embed.proj
    grid = patch_embed.grid_size
    num_patches = int(grid[0] * grid[1])
    per_patch = proj.in_channels // proj.groups * proj.kernel_size[0] * proj.kernel_size[1]
    return num_patches * per_patch * proj.out_channels, num_patches


def _block_signature(block: nn.Module, index: int, dim: int, norms, refuse: Refuse) -> tuple[int, int, int, int]:
    """(num_heads, head_dim, attention linear MACs per token, MLP MACs per token) of a checked block."""
    from timm.layers import Attention, DropPath, LayerScale
    from timm.models.vision_transformer import Block

    where = f"block {index}"
    if stock_type(block) is not Block:
        refuse(f"block type {stock_type(block).__name__} ({where})")
    for name in ("norm1", "norm2"):
        _check_norm(getattr(block, name), f"{where} {name}", norms, refuse)
    for name in ("ls1", "ls2"):
        if type(getattr(block, name)) not in (nn.Identity, LayerScale):
            refuse(f"layer scale {type(getattr(block, name)).__name__} ({where})")
    for name in ("drop_path1", "drop_path2"):
        if type(getattr(block, name)) not in (nn.Identity, DropPath):
            refuse(f"drop path {type(getattr(block, name)).__name__} ({where})")

    attn = block.attn
    if type(attn) is not Attention:
        refuse(f"attention {type(attn).__name__} ({where})")
    for name in ("q_norm", "k_norm", "norm"):
        _check_norm(getattr(attn, name), f"{where} attn.{name}", norms, refuse)
    gate = attn.gate
    if attn.qkv.in_features != dim or attn.proj.out_features != dim or (gate is not None and gate.in_features != dim):
        refuse(f"attention with input/output width other than embed_dim {dim} ({where})")
    attn_linear = _linear_macs(attn.qkv) + _linear_macs(attn.proj) + (0 if gate is None else _linear_macs(gate))
    return int(attn.num_heads), int(attn.head_dim), attn_linear, _mlp_macs(block.mlp, where, dim, norms, refuse)


def _mlp_macs(mlp: nn.Module, where: str, dim: int, norms, refuse: Refuse) -> int:
    """Per-token MACs of a token-wise MLP, read off its linear layers."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    layer_names = {Mlp: ("fc1", "fc2"), GluMlp: ("fc1", "fc2"), SwiGLU: ("fc1_g", "fc1_x", "fc2")}.get(type(mlp))
    if layer_names is None:
        refuse(f"mlp {type(mlp).__name__} ({where})")
    layers = [getattr(mlp, name) for name in layer_names]
    for layer in layers:
        if not isinstance(layer, nn.Linear):  # use_conv=True: 1x1 convolutions on NCHW maps
            refuse(f"mlp {type(mlp).__name__} with {type(layer).__name__} layers ({where})")
    if layers[0].in_features != dim or layers[-1].out_features != dim:
        refuse(f"mlp {type(mlp).__name__} with input/output width other than embed_dim {dim} ({where})")
    _check_norm(mlp.norm, f"{where} mlp.norm", norms, refuse)
    return sum(_linear_macs(layer) for layer in layers)


def _head(model: nn.Module, norms, refuse: Refuse) -> tuple[int, int, bool]:
    """(MACs per image, MACs per token reaching the head, whether prefix tokens reach it)."""
    from timm.layers import AttentionPoolLatent, Mlp

    classifiers = [model.head] + ([model.head_dist] if hasattr(model, "head_dist") else [])
    for classifier in classifiers:
        if type(classifier) not in (nn.Linear, nn.Identity):
            refuse(f"classifier head {type(classifier).__name__}")
    classifier_macs = sum(_linear_macs(c) for c in classifiers)
    pool = model.attn_pool
    if pool is not None:
        if type(pool) is not AttentionPoolLatent:
            refuse(f"attention pool {type(pool).__name__} (global_pool={model.global_pool!r})")
        if pool.pos_embed is not None:  # a fixed-length position table cannot take fewer tokens
            refuse("attention pool AttentionPoolLatent with a position embedding")
        if pool.pool not in ("token", "avg"):
            refuse(f"attention pool AttentionPoolLatent with pool_type {pool.pool!r}")
        if pool.mlp is not None and (type(pool.mlp) is not Mlp or not isinstance(pool.mlp.fc1, nn.Linear)):
            refuse(f"attention pool AttentionPoolLatent with mlp {type(pool.mlp).__name__}")
        for name in ("q_norm", "k_norm", "norm"):
            _check_norm(getattr(pool, name), f"attn_pool.{name}", norms, refuse)
        latents = int(pool.latent_len)
        mlp = 0 if pool.mlp is None else _linear_macs(pool.mlp.fc1) + _linear_macs(pool.mlp.fc2)
        latent_side = latents * (_linear_macs(pool.q) + _linear_macs(pool.proj) + mlp)
        # K, V of every token it reads, and q k^T + A v of the latent queries against them
        per_token = _linear_macs(pool.kv) + 2 * latents * pool.num_heads * pool.head_dim
        return latent_side + classifier_macs, per_token, bool(model.pool_include_prefix)
    if model.global_pool == "":  # no pooling: the classifier runs on every token, prefix included
        return 0, classifier_macs, True
    if model.global_pool in ("token", "avg", "max", "avgmax"):
        return classifier_macs, 0, False
    refuse(f"global pool {model.global_pool!r}")
