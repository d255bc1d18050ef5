"""DynamicViT on timm's Swin Transformer, after the official dyswin scheme (raoyongming/DynamicViT,
models/dyswin.py; docs/methods.md#dynamicvit-on-swin).

Only stage 3 (index 2) is sparsified. Before each of 3 of its blocks (local 1, 2, 3 for a 6-block stage,
Swin-T; 2, 4, 6 for an 18-block one, Swin-S/B) a predictor (DynamicViT's local-global MLP, its global half
averaged over all tokens of the image) scores every token of the stage; the top int(N * rho_s) (N = the
stage's H * W tokens, rho_s = rho, rho - 0.2, rho - 0.4) are "kept" until the next predictor, which scores
all tokens again (the sets are not nested). From the first predictor to the end of the stage every block
runs its window attention on ALL tokens, unchanged; after it, kept tokens get the block's MLP and the rest a
fast path, LayerNorm + Linear(D, D) (a new module per block, `fast_mlp`). Shifted windows and PatchMerging
are untouched, since no token leaves the grid.

Keep ratio 1 is the stock model (every token kept, no predictor runs), and so is any stage ratio of 1 or
more; the subtractive ratios are the paper's only below 1 (at rho = 1 they would be 1, 0.8, 0.6).

Training: Gumbel-softmax straight-through decisions (hard forward), out = x + m * mlp(norm2(x)) +
(1 - m) * fast(x), the value of the official two-stream forward; the decisions are recorded as aux
"decision" for the ratio loss (official Swin weight 10).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import IDLE, KEPT, BlockTokens, Schedule, gather_tokens, swap_class
from .registry import register
from .dynamicvit import new_predictor
from .swin import SwinGeometry, SwinMethod, stage_blocks, upsample_to_patches

SPARSE_STAGE = 2  # dyswin sparsifies the third stage only
RATIO_STEP = 0.2  # rho, rho - 0.2, rho - 0.4


def official_locations(depths) -> tuple[int, ...]:
    """Flat indices of the blocks the predictors run before: local (1, 2, 3) of a stage of at most 6
    blocks (Swin-T), (2, 4, 6) of a deeper one (Swin-S/B); those past the stage's end are left out."""
    blocks = stage_blocks(depths, SPARSE_STAGE)
    if not blocks:
        return ()
    local = (1, 2, 3) if len(blocks) <= 6 else (2, 4, 6)
    return tuple(blocks[0] + j for j in local if j < len(blocks))


def stage_ratios(keep_ratio: float, locations: int) -> list[float]:
    """rho, rho - 0.2, rho - 0.4, ... (clamped at 0); all 1 at rho = 1."""
    if keep_ratio >= 1.0:
        return [1.0] * locations
    return [max(0.0, keep_ratio - RATIO_STEP * s) for s in range(locations)]


def new_fast_mlp(dim: int, seed: int) -> nn.Sequential:
    """dyswin's fastMlp: LayerNorm + Linear(D, D), official init (trunc normal 0.02, zero bias), drawn from a
    private generator so building the method never touches the global RNG."""
    with torch.device("meta"):
        fast = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
    fast.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(1000 + seed)
    nn.init.ones_(fast[0].weight)
    nn.init.zeros_(fast[0].bias)
    nn.init.trunc_normal_(fast[1].weight, std=0.02, generator=generator)
    nn.init.zeros_(fast[1].bias)
    return fast


@register
class DynamicViTSwin(SwinMethod):
    name = "dynamicvit-swin"
    aliases = ("dyswin",)
    summary = ("DynamicViT on Swin (dyswin): 3 predictors in stage 3 pick the tokens that get the MLP; "
               "the rest get LayerNorm + Linear")
    count_rule = "abs_floor"  # int(N * (rho - 0.2 s)), N = the stage's tokens
    layer_presets = {"official": official_locations}  # the predictors run BEFORE these blocks
    # The official Swin recipe: ratio loss weight 10, KL and token distillation 0.5 each (token: all final
    # tokens), backbone at 0.2 of the lr (--lr_scale 0.2 in the README's Swin-T command).
    finetune_defaults = dict(ratio_weight=10.0, distill="kl", distill_weight=0.5, tokens_weight=0.5,
                             backbone_lr_scale=0.2)

    def __init__(self, geometry: SwinGeometry, keep_ratio, layers, options):
        super().__init__(geometry, keep_ratio, layers, options)
        self.ratios = stage_ratios(keep_ratio, len(layers))
        # Per location: tokens that get the MLP (all of them when its ratio is 1: nothing to predict).
        self.keep_counts = {i: min(geometry.stage_for(i).num_tokens, int(geometry.stage_for(i).num_tokens * r))
                            for i, r in zip(layers, self.ratios)}
        self.active = any(k < geometry.stage_for(i).num_tokens for i, k in self.keep_counts.items())
        # Blocks after the first location up to the end of its stage, and the location in force at each.
        self.in_force: dict[int, int] = {}
        if layers and self.active:
            stage = geometry.stage_for(layers[0])
            current = None
            for i in range(layers[0], stage.first + stage.depth):
                current = i if i in self.keep_counts else current
                self.in_force[i] = current
        self.predictors = nn.ModuleList(new_predictor(geometry.stage_for(i).dim, seed=s)
                                        for s, i in enumerate(layers))
        self.fast = nn.ModuleList(new_fast_mlp(geometry.stage_for(i).dim, seed=i) for i in self.in_force)

    # --- counts and cost -----------------------------------------------------------------------
    def schedule(self) -> Schedule:
        g, blocks = self.geometry, []
        for i in range(g.depth):
            stock = g.stock_tokens(i)
            if i in self.in_force:
                blocks.append(BlockTokens(stock.n_in, stock.n_attn, self.keep_counts[self.in_force[i]], stock.n_out,
                                          "fast", windows=stock.windows, stage=stock.stage))
            else:
                blocks.append(stock)
        return Schedule(tuple(blocks))

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """Window attention on all tokens and the MLP on the kept (the plain part), plus the fast path
        (LayerNorm + Linear: D^2 per other token) and, at a location, the predictor on all the stage's tokens
        (docs/methods.md#method-overheads)."""
        plain = self.plain_block_macs(index, tokens)
        if tokens.action != "fast":
            return plain
        dim = self.geometry.stage_for(index).dim
        extra = (tokens.n_in - tokens.n_mlp) * dim * dim
        if index in self.keep_counts:
            extra += self.predictors[self.layers.index(index)].macs(tokens.n_in)
        return plain + extra

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"score_predictor": self.predictors, "fast_mlp": self.fast}

    def training_losses(self, settings, features, teacher_features) -> dict:
        """dyswin's terms: the ratio loss (squared gap of each sample's kept fraction to rho_s, averaged over
        samples and locations) and, with a teacher, the MSE between all final tokens of student and teacher."""
        decisions = self.aux.get("decision", {})
        if not decisions:
            return {}
        ratio = sum(((decisions[i].mean(dim=1) - r) ** 2).mean()
                    for i, r in zip(self.layers, self.ratios) if i in decisions) / len(self.layers)
        out = {"ratio": ratio}
        if teacher_features is not None:
            out["tokens"] = F.mse_loss(features, teacher_features)
        return out

    def describe(self) -> dict:
        out = super().describe()
        out.update(stage_ratios=self.ratios, keep_counts={str(i): k for i, k in self.keep_counts.items()})
        return out

    # --- patching ------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> None:
        reference = model.patch_embed.proj.weight
        self.predictors.to(device=reference.device, dtype=reference.dtype)
        self.fast.to(device=reference.device, dtype=reference.dtype)
        blocks = self.geometry.blocks_of(model)
        for position, i in enumerate(self.in_force):
            swap_class(blocks[i], FastPathBlock)
            blocks[i].dyswin = self  # plain attributes: the modules stay registered on the model only
            blocks[i].dyswin_index = i
            blocks[i].dyswin_fast = position

    # --- per-forward steps ---------------------------------------------------------------------
    def decide(self, x: torch.Tensor, index: int, training: bool) -> torch.Tensor:
        """At a location: eval -> (B, n) positions (raster, in the stage grid) of the kept tokens, best first;
        training -> (B, HW, 1) hard straight-through Gumbel decisions."""
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        log_probs = self.predictors[self.layers.index(index)](tokens, tokens.new_ones(B, H * W, 1))
        if training:
            decision = F.gumbel_softmax(log_probs, hard=True)[..., :1]
            self.state.record("decision", index, decision.squeeze(-1), training=True)
            return decision
        return log_probs[..., 0].argsort(dim=1, descending=True)

    def record(self, index: int, kept: torch.Tensor, shape, training: bool) -> None:
        """Aux "patch_state" (KEPT: the MLP; IDLE: the fast path, shown as idle) and "kept"."""
        if not (self.state.trace or training):
            return
        B, H, W, _ = shape
        grid_state = torch.where(kept, KEPT, IDLE).to(torch.int8)
        self.state.record("patch_state", index, upsample_to_patches(grid_state, (H, W), self.geometry.grid), training)
        if not training:
            self.state.record("kept", index, kept.nonzero()[:, 1].reshape(B, -1), training)


class FastPathBlock:
    """Mixin over timm `SwinTransformerBlock`: window attention on all tokens, the MLP for the kept tokens,
    the fast path for the others (dyswin's AdaSwinTransformerBlock)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        method: DynamicViTSwin = self.dyswin
        index = self.dyswin_index
        carry = method.state.carry
        if index in method.keep_counts:
            carry["dyswin"] = method.decide(x, index, self.training)
        B, H, W, C = x.shape
        fast = method.fast[self.dyswin_fast]
        x = x + self.drop_path1(self._attn(self.norm1(x)))  # the stock attention on every token
        x = x.reshape(B, H * W, C)
        if self.training:
            decision = carry["dyswin"]
            if index in method.keep_counts:
                method.record(index, decision.squeeze(-1).detach() > 0.5, (B, H, W, C), True)
            out = x + decision * self.drop_path2(self.mlp(self.norm2(x))) + (1 - decision) * self.drop_path2(fast(x))
            return out.reshape(B, H, W, C)
        order = carry["dyswin"]
        keep = method.keep_counts[method.in_force[index]]
        kept_idx, fast_idx = order[:, :keep], order[:, keep:]
        kept, rest = gather_tokens(x, kept_idx), gather_tokens(x, fast_idx)
        kept = kept + self.drop_path2(self.mlp(self.norm2(kept)))
        rest = rest + self.drop_path2(fast(rest))
        if index in method.keep_counts and method.state.trace:
            mask = torch.zeros(B, H * W, dtype=torch.bool, device=x.device).scatter(
                1, kept_idx, torch.ones_like(kept_idx, dtype=torch.bool))
            method.record(index, mask, (B, H, W, C), False)
        out = x.scatter(1, kept_idx.unsqueeze(-1).expand(-1, -1, C), kept)
        out = out.scatter(1, fast_idx.unsqueeze(-1).expand(-1, -1, C), rest)
        return out.reshape(B, H, W, C)
