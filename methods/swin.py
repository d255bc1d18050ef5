"""timm's SwinTransformer for the token-reduction methods: its geometry, the analytic cost of a Swin block on
a schedule, and the window bookkeeping the Swin methods share (docs/methods.md#swin-geometry).

`SwinGeometry.from_model` accepts exactly what the cost formulas and the patched forwards model, and refuses
the rest with one MethodError line naming the model and the part:
- model: timm `SwinTransformer` (not V2, not the S3/AutoFormer or MLP variants), fixed image size;
- stem: timm `PatchEmbed` (one Conv2d per patch, LayerNorm or none), NHWC output;
- stage s > 0 starts with timm `PatchMerging` (2x2 concat, LayerNorm, Linear) on an even grid;
- every block: `SwinTransformerBlock` with `WindowAttention` (relative position bias, fixed shift mask) and
  an `Mlp` of linear layers, LayerNorm, feature maps that are whole multiples of the window (no padding);
- head: final LayerNorm, global avg/max/avgmax pooling, a linear classifier (or none).

Blocks are numbered flat over the stages, as `layers` and the schedule index them: Swin-T (depths 2, 2, 6, 2)
has blocks 0-1 (stage 0, 56x56 tokens at 224 px), 2-3 (28x28), 4-9 (14x14) and 10-11 (7x7). Stage numbers in
code are 0-based; the papers' "stage 3" is stage index 2.

MACs count matrix products only, as for the ViTs (methods/flops.py): per block of H x W tokens in windows of
M tokens, HW (3 D Da + Da D) for the projections, 2 HW M Da for q k^T and A v inside the windows, HW times
the MLP; PatchMerging (H/2)(W/2) 4 D_in D_out; the stem convolution; the classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method
from .tokens import BlockTokens
from .errors import MethodError
from .geometry import _linear_macs, _model_label, stock_type

SUPPORTED_SWIN = (
    "supported Swin: timm SwinTransformer with PatchEmbed (Conv2d, LayerNorm), PatchMerging on even grids, "
    "SwinTransformerBlock with WindowAttention and a linear Mlp, LayerNorm, feature maps that are multiples of "
    "the window (no padding), a fixed image size, avg/max/avgmax pooling"
)


@dataclass(frozen=True)
class SwinStage:
    """One stage of a Swin: its blocks share width, heads, token grid and window."""

    first: int  # flat index of the stage's first block
    depth: int
    dim: int
    num_heads: int
    head_dim: int
    grid: tuple[int, int]  # (H, W) tokens of the stage's blocks
    window: tuple[int, int]  # window size after timm's clamp to the grid
    shifts: tuple[tuple[int, int], ...]  # cyclic shift of every block of the stage, (0, 0) for W-MSA
    attn_linear_macs: int  # per token: qkv and output projections
    mlp_macs: int  # per token: the MLP's linear layers
    merge_macs: int  # the PatchMerging that starts the stage, per image (0 for stage 0)

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def window_area(self) -> int:
        return self.window[0] * self.window[1]

    @property
    def num_windows(self) -> int:
        return self.num_tokens // self.window_area

    @property
    def blocks(self) -> range:
        return range(self.first, self.first + self.depth)


@dataclass(frozen=True)
class SwinGeometry:
    """What the methods and the cost model need to know about a timm SwinTransformer."""

    family: ClassVar[str] = "swin"
    stages: tuple[SwinStage, ...]
    num_patches: int  # N0: tokens of the stem grid (56 x 56 for Swin-T at 224 px)
    grid: tuple[int, int]  # the stem grid
    stem_macs: int
    head_macs: int
    num_prefix: int = 0  # no CLS or other prefix tokens: the head pools the last stage's tokens
    has_cls: bool = False
    pool: str = "avg"

    @property
    def depth(self) -> int:
        return sum(stage.depth for stage in self.stages)

    @property
    def num_tokens(self) -> int:
        return self.num_patches

    @property
    def fixed_macs(self) -> int:
        """The PatchMerging layers: no method here changes them."""
        return sum(stage.merge_macs for stage in self.stages)

    def head_cost(self, final_tokens: int) -> int:
        return self.head_macs

    def stage_of(self, index: int) -> int:
        for s, stage in enumerate(self.stages):
            if index in stage.blocks:
                return s
        raise IndexError(index)

    def stage_for(self, index: int) -> SwinStage:
        return self.stages[self.stage_of(index)]

    def shift_of(self, index: int) -> tuple[int, int]:
        stage = self.stage_for(index)
        return stage.shifts[index - stage.first]

    def blocks_of(self, model: nn.Module) -> list[nn.Module]:
        return [block for stage in model.layers for block in stage.blocks]

    def stock_tokens(self, index: int) -> BlockTokens:
        """The stock block: every token of the stage's grid, in its windows."""
        s = self.stage_of(index)
        stage = self.stages[s]
        n = stage.num_tokens
        return BlockTokens(n, n, n, n, windows=stage.num_windows, stage=s)

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        return swin_block_macs(self, index, tokens)

    @classmethod
    def from_model(cls, model: nn.Module) -> "SwinGeometry":
        return read_swin_geometry(model)


def swin_block_macs(g: SwinGeometry, index: int, tokens: BlockTokens) -> int:
    """A stock Swin block on its scheduled tokens (docs/methods.md#swin-block-cost): q and the output
    projection for the n_attn queries, k and v for the keys (`tokens.keys`), q k^T and A v inside each of
    the `windows` windows (queries and keys split equally), the MLP on n_mlp tokens."""
    stage = g.stage_for(index)
    D, Da = stage.dim, stage.attn_dim
    q_and_proj = stage.attn_linear_macs - 2 * D * Da  # q projection and output projection per query
    keys = tokens.keys
    return (tokens.n_attn * q_and_proj + keys * 2 * D * Da
            + 2 * (tokens.n_attn * keys // tokens.windows) * Da + tokens.n_mlp * stage.mlp_macs)


# ---------------------------------------------------------------------------------------------
# Reading and checking a model


def read_swin_geometry(model: nn.Module) -> SwinGeometry:
    from timm.layers import DropPath, Mlp, PatchEmbed
    from timm.models.swin_transformer import (
        PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention,
    )

    label = _model_label(model)

    def refuse(part: str) -> NoReturn:
        raise MethodError(f"{label}: {part} is not modelled by the Swin token-reduction methods; {SUPPORTED_SWIN}")

    def check_norm(module, where):
        if type(module) not in (nn.LayerNorm, nn.Identity):
            refuse(f"norm {type(module).__name__} ({where})")

    if stock_type(model) is not SwinTransformer:
        refuse(f"model class {stock_type(model).__name__}")
    if getattr(model, "dynamic_img_size", False):
        refuse("a dynamic image size (token counts would follow the input)")
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or type(embed.proj) is not nn.Conv2d or embed.flatten:
        refuse(f"patch embedding {type(embed).__name__}")
    check_norm(embed.norm, "patch_embed.norm")
    proj = embed.proj
    grid = (int(embed.grid_size[0]), int(embed.grid_size[1]))
    per_patch = proj.in_channels // proj.groups * proj.kernel_size[0] * proj.kernel_size[1]
    stem_macs = grid[0] * grid[1] * per_patch * proj.out_channels

    stages, first = [], 0
    for s, layer in enumerate(model.layers):
        where = f"stage {s}"
        merge_macs = 0
        if isinstance(layer.downsample, PatchMerging):
            h, w = layer.input_resolution
            if h % 2 or w % 2:
                refuse(f"PatchMerging on an odd grid {h}x{w} ({where}, padded)")
            check_norm(layer.downsample.norm, f"{where} downsample.norm")
            reduction = layer.downsample.reduction
            if type(reduction) is not nn.Linear:
                refuse(f"PatchMerging reduction {type(reduction).__name__} ({where})")
            merge_macs = (h // 2) * (w // 2) * _linear_macs(reduction)
        elif type(layer.downsample) is not nn.Identity:
            refuse(f"downsample {type(layer.downsample).__name__} ({where})")
        if len(layer.blocks) == 0:
            refuse(f"a stage without blocks ({where})")
        signature, shifts = None, []
        for j, block in enumerate(layer.blocks):
            at = f"{where} block {j}"
            if stock_type(block) is not SwinTransformerBlock:
                refuse(f"block type {stock_type(block).__name__} ({at})")
            if block.dynamic_mask:
                refuse(f"a dynamic attention mask ({at})")
            for name in ("norm1", "norm2"):
                check_norm(getattr(block, name), f"{at} {name}")
            for name in ("drop_path1", "drop_path2"):
                if type(getattr(block, name)) not in (nn.Identity, DropPath):
                    refuse(f"drop path {type(getattr(block, name)).__name__} ({at})")
            attn, mlp = block.attn, block.mlp
            if type(attn) is not WindowAttention:
                refuse(f"attention {type(attn).__name__} ({at})")
            if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
                refuse(f"mlp {type(mlp).__name__} ({at})")
            check_norm(mlp.norm, f"{at} mlp.norm")
            H, W = (int(v) for v in block.input_resolution)
            wh, ww = (int(v) for v in block.window_size)
            if H % wh or W % ww:
                refuse(f"a {H}x{W} feature map in {wh}x{ww} windows ({at}, padded)")
            dim = int(block.dim)
            attn_dim = attn.qkv.out_features // 3
            if attn.qkv.in_features != dim or attn.proj.out_features != dim or mlp.fc1.in_features != dim \
                    or mlp.fc2.out_features != dim:
                refuse(f"a block whose width is not its stage's {dim} ({at})")
            this = (dim, int(attn.num_heads), attn_dim // int(attn.num_heads), (H, W), (wh, ww),
                    _linear_macs(attn.qkv) + _linear_macs(attn.proj), _linear_macs(mlp.fc1) + _linear_macs(mlp.fc2))
            if signature is not None and this != signature:
                refuse(f"blocks of different shapes in one stage ({at})")
            signature = this
            shifts.append(tuple(int(v) for v in block.shift_size))
        dim, heads, head_dim, stage_grid, window, attn_linear, mlp_macs = signature
        stages.append(SwinStage(first, len(layer.blocks), dim, heads, head_dim, stage_grid, window, tuple(shifts),
                                attn_linear, mlp_macs, merge_macs))
        first += len(layer.blocks)

    check_norm(model.norm, "norm")
    head = model.head
    fc = getattr(head, "fc", None)
    pool = str(getattr(getattr(head, "global_pool", None), "pool_type", "") or "")
    if type(fc) not in (nn.Linear, nn.Identity) or pool.replace("fast", "") not in ("avg", "max", "avgmax", "catavgmax"):
        refuse(f"head {type(head).__name__} (pool {pool!r})")
    return SwinGeometry(stages=tuple(stages), num_patches=grid[0] * grid[1], grid=grid, stem_macs=stem_macs,
                        head_macs=_linear_macs(fc), pool=pool)


# ---------------------------------------------------------------------------------------------
# Methods on Swin


class SwinMethod(Method):
    """Base of the methods that patch a timm SwinTransformer: windowed block cost, per-stage MACs, and the
    default layers read from the model's stage layout (`layer_presets` map a name to a function of the
    stage depths). Without a model (`canonical_config`), the stage layout is taken to be timm's (2, 2,
    depth - 6, 2) (Swin-T, -S, -B)."""

    families = ("swin",)
    geometry: SwinGeometry

    @staticmethod
    def assumed_depths(depth: int) -> tuple[int, ...]:
        return (2, 2, depth - 6, 2) if depth >= 7 else (depth,)

    @classmethod
    def preset_layers(cls, depths: tuple[int, ...], preset: str) -> tuple[int, ...]:
        if preset not in cls.layer_presets:
            raise MethodError(f"unknown preset {preset!r} for {cls.name}; valid: {', '.join(cls.layer_presets)}")
        return tuple(cls.layer_presets[preset](tuple(depths)))

    @classmethod
    def resolve_layers(cls, depth: int, options: dict) -> tuple[int, ...]:
        return cls.preset_layers(cls.assumed_depths(depth), options.get("preset") or next(iter(cls.layer_presets)))

    @classmethod
    def layers_for(cls, geometry, options: dict) -> tuple[int, ...]:
        depths = tuple(stage.depth for stage in geometry.stages)
        return cls.preset_layers(depths, options.get("preset") or next(iter(cls.layer_presets)))

    @classmethod
    def default_layers(cls, depth: int, preset: str | None = None) -> tuple[int, ...]:
        return cls.preset_layers(cls.assumed_depths(depth), preset or next(iter(cls.layer_presets)))

    def describe(self) -> dict:
        out = super().describe()
        out["stage_of_block"] = [self.geometry.stage_of(i) for i in range(self.geometry.depth)]
        return out


def stage_blocks(depths: tuple[int, ...], stage: int, start: int = 0) -> range:
    """Flat indices of blocks start.. of `stage` (0-based) for these stage depths; empty if it is missing."""
    if stage >= len(depths):
        return range(0)
    first = sum(depths[:stage])
    return range(first + min(start, depths[stage]), first + depths[stage])


# ---------------------------------------------------------------------------------------------
# Windows: the stock block's cyclic shift and partition, as index maps for tracing and references


def window_ids(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
               device=None) -> torch.Tensor:
    """(H*W,) long: the window (in timm's partition order) of every token of the grid, raster order, in a
    block that rolls by -shift before partitioning."""
    H, W = grid
    rows = (torch.arange(H, device=device) - shift[0]) % H
    cols = (torch.arange(W, device=device) - shift[1]) % W
    return ((rows // window[0])[:, None] * (W // window[1]) + (cols // window[1])[None, :]).flatten()


def upsample_to_patches(values: torch.Tensor, grid: tuple[int, int], patch_grid: tuple[int, int]) -> torch.Tensor:
    """(..., H*W) on a stage's grid -> (..., H0*W0) on the stem's patch grid (each stage token covers a
    block of patches), for the per-patch aux outputs the pictures read."""
    H, W = grid
    fh, fw = patch_grid[0] // H, patch_grid[1] // W
    lead = values.shape[:-1]
    x = values.reshape(*lead, H, 1, W, 1).expand(*lead, H, fh, W, fw)
    return x.reshape(*lead, patch_grid[0] * patch_grid[1])


def to_windows(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, M, C): the stock block's cyclic shift and window partition (a permutation)."""
    from timm.models.swin_transformer import window_partition

    B, H, W, C = x.shape
    if any(block.shift_size):
        x = torch.roll(x, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
    return window_partition(x, block.window_size).reshape(-1, block.window_area, C)


def from_windows(block: nn.Module, windows: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The inverse of `to_windows`: (B * nW, M, C) -> (B, H, W, C)."""
    from timm.models.swin_transformer import window_reverse

    C = windows.shape[-1]
    x = window_reverse(windows.reshape(-1, block.window_size[0], block.window_size[1], C), block.window_size, H, W)
    if any(block.shift_size):
        x = torch.roll(x, shifts=block.shift_size, dims=(1, 2))
    return x


def window_bias(block: nn.Module, num_rows: int, rows: torch.Tensor | None = None,
                cols: torch.Tensor | None = None) -> torch.Tensor:
    """The additive attention bias of the stock block (relative position bias + shift mask) for every one
    of `num_rows` windows (B * nW, batch-major), restricted to the query positions `rows` (R, q) and key
    positions `cols` (R, k) inside each window (None: all M). Returns (R, heads, q, k)."""
    attn = block.attn
    M = block.window_area
    device = attn.relative_position_bias_table.device
    index = attn.relative_position_index.view(M, M)
    full = torch.arange(M, device=device).expand(num_rows, M)
    rows = full if rows is None else rows
    cols = full if cols is None else cols
    pair = index[rows[:, :, None], cols[:, None, :]]  # (R, q, k)
    bias = attn.relative_position_bias_table[pair].permute(0, 3, 1, 2)  # (R, heads, q, k)
    mask = block.attn_mask
    if mask is not None:
        num_windows = mask.shape[0]
        which = torch.arange(num_rows, device=device) % num_windows  # batch-major rows: window = row % nW
        bias = bias + mask[which[:, None, None], rows[:, :, None], cols[:, None, :]].unsqueeze(1).to(bias.dtype)
    return bias


def window_attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v per window -> (R, q, heads*d), SDPA exactly when the stock
    WindowAttention would take it."""
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1) + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def split_projection(attn: nn.Module, x: torch.Tensor, which: int) -> torch.Tensor:
    """q (0), k (1) or v (2) of x (R, n, D) as (R, heads, n, d), from the rows of the fused qkv."""
    attn_dim = attn.qkv.out_features // 3
    rows = slice(which * attn_dim, (which + 1) * attn_dim)
    bias = None if attn.qkv.bias is None else attn.qkv.bias[rows]
    R, n, _ = x.shape
    return F.linear(x, attn.qkv.weight[rows], bias).reshape(R, n, attn.num_heads, -1).transpose(1, 2)
