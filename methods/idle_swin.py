"""IdleViT on timm's Swin Transformer (docs/methods.md#idlevit-on-swin).

In every idle block, inside each attention window of M tokens (after the block's cyclic shift), the k
best-scored tokens run the block: window attention among themselves with the relative position bias and
shift mask gathered for their positions, the residual, the MLP. The other M - k tokens are idle: they
stay where they are, untouched, so the shifted windows of the next block and PatchMerging see the usual
token grid and need no change. Every window selects the same k, so the selected tokens pack into dense
(B * nW, k, C) windows and the block really runs on k tokens per window.

Scoring without a CLS token (`score`):
- "query" (default, training-free): a pooled pseudo-query per window, q_bar = W_q mean_j(x_hat_j) + b_q,
  the query of the window's mean token; token j scores the head mean of q_bar . k_j (k projected for all
  M tokens, as IdleViT's official path projects K for all N);
- "predictor": a DynamicViT-style local-global MLP per idle block (trainable, `score_predictor`) on the
  stage's tokens, its global half averaged over the whole image; its keep log-probability ranks the tokens.

`idle_kv=True`: the idle tokens still serve as keys and values: the k selected queries of a window attend
over all M of its tokens (rows of the bias gathered for the queries); idle tokens still get no update.

k per idle block is max(1, int(M * r^(s+1))) with IdleViT's stages of `layers_per_stage` consecutive idle
blocks (default ceil(len(layers) / 3)); a block whose k is M runs the stock block (keep ratio 1 is the
stock model bit for bit).

Training: the mask path (all M tokens, idle key columns at -1e5 unless idle_kv, residual updates gated by
the selection), which records the window logits and selections for the token-cut loss; with the predictor
the gate is straight-through (hard selection forward, the keep probability's gradient backward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import (
    IDLE, KEPT, BlockTokens, CanonicalConfig, ForwardState, Schedule, gather_tokens, stagewise_ratios,
    swap_class,
)
from .registry import register
from .dynamicvit import PredictorLG, new_predictor
from .idle import IDLE_KEY_BIAS, preset_canonical_config, stage_length, token_cut_loss
from .options import Option
from .swin import (
    SwinGeometry, SwinMethod, from_windows, split_projection, stage_blocks, to_windows, upsample_to_patches,
    window_attend, window_bias, window_ids,
)


def _stage3(depths):
    """dyswin's locations: stage 3 (index 2) from its second block on (Swin-T: blocks 5-9)."""
    return stage_blocks(depths, 2, 1)


def _stages34(depths):
    """Stage 3 from its second block, and all of stage 4 (Swin-T: blocks 5-11)."""
    return (*stage_blocks(depths, 2, 1), *stage_blocks(depths, 3))


@dataclass(frozen=True)
class IdleSwinLayer:
    """What one idle Swin block needs at forward time."""

    index: int  # flat block index, the key of its aux outputs
    position: int  # position among the idle blocks (its predictor)
    keep: int  # k: tokens selected in every window
    score: str  # "query" | "predictor"
    idle_kv: bool
    grid: tuple[int, int]  # the stage's token grid
    patch_grid: tuple[int, int]  # the stem's patch grid (aux outputs are per original patch)
    state: ForwardState


@register
class IdleSwin(SwinMethod):
    name = "idle-swin"
    aliases = ("idlevit-swin",)
    summary = ("IdleViT on Swin: in every window the top-k tokens (pooled pseudo-query or a predictor) run "
               "the block, the rest stay in place, idle")
    count_rule = "abs_floor"  # per window: k = int(M * r^s)
    options = {
        "preset": Option("stage3", str, "default idle blocks: stage3 (stage 3 from its 2nd block, as dyswin) or "
                         "stage34 (that and all of stage 4)", choices=("stage3", "stage34")),
        "score": Option("query", str, "what ranks the tokens of a window: query (pooled pseudo-query, no "
                        "training) or predictor (trainable DynamicViT-style MLP)", choices=("query", "predictor")),
        "idle_kv": Option(False, bool, "idle tokens still serve as keys and values of the selected queries"),
        "layers_per_stage": Option(None, int, "idle blocks per keep-ratio stage (r, r^2, ...); "
                                   "default ceil(len(layers) / 3)"),
    }
    layer_presets = {"stage3": _stage3, "stage34": _stages34}
    # IdleViT's recipe less its frozen CLS token and position embedding (Swin has neither).
    finetune_defaults = dict(cut_loss="both", cut_weight=20.0, cut_bug_compat=False, distill="kl+feature",
                             distill_weight=5.0)

    @classmethod
    def canonical_config(cls, depth, layers, options) -> CanonicalConfig:
        """As IdleViT's: layers named by the first preset that yields them; `layers_per_stage` equal to its
        default dropped."""
        explicit, opts = super().canonical_config(depth, layers, options)
        return preset_canonical_config(cls, depth, explicit, opts)

    def __init__(self, geometry: SwinGeometry, keep_ratio, layers, options):
        super().__init__(geometry, keep_ratio, layers, options)
        self.layers_per_stage = per_stage = stage_length(options.get("layers_per_stage"), len(layers))
        ratios = stagewise_ratios(keep_ratio, layers, per_stage)
        self.keep_per_layer = {i: max(1, int(geometry.stage_for(i).window_area * r)) for i, r in zip(layers, ratios)}
        self.predictors = nn.ModuleList()
        if options["score"] == "predictor":
            self.predictors = nn.ModuleList(new_predictor(geometry.stage_for(i).dim, seed=p)
                                            for p, i in enumerate(layers))

    # --- counts and cost -----------------------------------------------------------------------
    def schedule(self) -> Schedule:
        g, blocks = self.geometry, []
        for i in range(g.depth):
            stock = g.stock_tokens(i)
            keep = self.keep_per_layer.get(i)
            stage = g.stage_for(i)
            if keep is None or keep >= stage.window_area:  # every token selected: the stock block
                blocks.append(stock)
                continue
            n = keep * stage.num_windows
            blocks.append(BlockTokens(stock.n_in, n, n, stock.n_out, "idle-kv" if self.opts["idle_kv"] else "idle",
                                      windows=stage.num_windows, n_kv=stock.n_in if self.opts["idle_kv"] else 0,
                                      stage=stock.stage))
        return Schedule(tuple(blocks))

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """The stock block on the selected tokens plus the scoring (docs/methods.md#method-overheads):
        query: q_bar per window (nW D Da), q_bar . k_j for every token (HW Da) and, unless the idle tokens are
        keys anyway (idle_kv), their keys ((HW - n) D Da); predictor: its linear layers on the HW tokens."""
        plain = self.plain_block_macs(index, tokens)
        if not tokens.action.startswith("idle"):
            return plain
        stage = self.geometry.stage_for(index)
        if self.opts["score"] == "predictor":
            return plain + self.predictors[self.layers.index(index)].macs(tokens.n_in)
        D, Da = stage.dim, stage.attn_dim
        extra_keys = 0 if self.opts["idle_kv"] else (tokens.n_in - tokens.n_attn) * D * Da
        return plain + stage.num_windows * D * Da + tokens.n_in * Da + extra_keys

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"score_predictor": self.predictors} if len(self.predictors) else {}

    def training_losses(self, settings, features, teacher_features) -> dict:
        """IdleViT's token-cut loss, window by window (no prefix: num_prefix 0), over the idle blocks."""
        if settings["cut_loss"] == "none" or not self.aux.get("idle_mask"):
            return {}
        idle_blocks = sum(1 for block in self.schedule().blocks if block.action.startswith("idle"))
        return {"cut": token_cut_loss(self.aux, max(idle_blocks, 1), kind=settings["cut_loss"],
                                      bug_compat=settings["cut_bug_compat"], num_prefix=0)}

    def describe(self) -> dict:
        out = super().describe()
        out.update(layers_per_stage=self.layers_per_stage,
                   keep_per_window={str(i): k for i, k in self.keep_per_layer.items()})
        return out

    # --- patching ------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> None:
        reference = model.patch_embed.proj.weight
        self.predictors.to(device=reference.device, dtype=reference.dtype)
        blocks = self.geometry.blocks_of(model)
        for position, i in enumerate(self.layers):
            stage = self.geometry.stage_for(i)
            blocks[i].idle_swin = IdleSwinLayer(i, position, self.keep_per_layer[i], self.opts["score"],
                                                self.opts["idle_kv"], stage.grid, self.geometry.grid, self.state)
            blocks[i].idle_swin_method = self  # a plain attribute: the predictors stay registered on the model
            swap_class(blocks[i], IdleSwinBlock)


# ---------------------------------------------------------------------------------------------
# The patched block


def select_per_window(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(R, M) scores -> (R, keep) positions of the top `keep` in each window, ascending."""
    return scores.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values


class IdleSwinBlock:
    """Mixin over timm `SwinTransformerBlock`: idle tokens per window (eval: packed; training: masks)."""

    idle_swin: IdleSwinLayer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.idle_swin
        if layer.keep >= self.window_area:  # every token selected: the stock block, bit for bit
            if layer.state.trace or self.training:
                windows = x.shape[0] * (x.shape[1] * x.shape[2] // self.window_area)
                self._record(torch.ones(windows, self.window_area, dtype=torch.bool, device=x.device), x.shape,
                             self.training)
            return super().forward(x)
        if self.training:
            return self._masked_forward(x)
        return self._packed_forward(x)

    def _scores(self, x: torch.Tensor, normed_windows: torch.Tensor):
        """(R, M) scores and, for the pooled query, the keys of all window tokens (R, heads, M, d)."""
        layer = self.idle_swin
        if layer.score == "predictor":
            B, H, W, C = x.shape
            predictor: PredictorLG = self.idle_swin_method.predictors[layer.position]
            tokens = x.reshape(B, H * W, C)
            keep_logprob = predictor(tokens, tokens.new_ones(B, H * W, 1))[..., :1]  # (B, HW, 1)
            return to_windows(self, keep_logprob.reshape(B, H, W, 1)).squeeze(-1), None
        pooled = normed_windows.mean(dim=1, keepdim=True)  # the window's mean token
        q_bar = split_projection(self.attn, pooled, 0)  # (R, heads, 1, d): W_q mean + b_q = mean of the queries
        keys = split_projection(self.attn, normed_windows, 1)
        return (q_bar @ keys.transpose(-2, -1)).mean(1).squeeze(1), keys

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, attn = self.idle_swin, self.attn
        B, H, W, C = x.shape
        windows = to_windows(self, x)  # a permutation of x: idle tokens are copied bit for bit
        normed = to_windows(self, self.norm1(x))  # norm1 is per token, so it commutes with the permutation
        R = windows.shape[0]
        scores, keys = self._scores(x, normed)
        idx = select_per_window(scores, layer.keep)
        picked = gather_tokens(normed, idx)
        q = split_projection(attn, picked, 0)
        if layer.idle_kv:  # the selected queries attend over every token of their window
            k = keys if keys is not None else split_projection(attn, normed, 1)
            v = split_projection(attn, normed, 2)
            bias = window_bias(self, R, idx, None)
        else:
            if keys is None:
                k = split_projection(attn, picked, 1)
            else:
                k = keys.gather(2, idx[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3]))
            v = split_projection(attn, picked, 2)
            bias = window_bias(self, R, idx, idx)
        out = attn.proj_drop(attn.proj(window_attend(attn, q, k, v, bias.to(q.dtype))))
        selected = gather_tokens(windows, idx) + self.drop_path1(out)
        selected = selected + self.drop_path2(self.mlp(self.norm2(selected)))
        if layer.state.trace:
            self._record(torch.zeros(R, self.window_area, dtype=torch.bool, device=x.device).scatter(
                1, idx, torch.ones_like(idx, dtype=torch.bool)),
                         x.shape, False)
        # Write back out of place: `x` belongs to the caller.
        windows = windows.scatter(1, idx.unsqueeze(-1).expand(-1, -1, C), selected)
        return from_windows(self, windows, H, W)

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training: every token projected; idle key columns masked with -1e5 (not with idle_kv), residual
        updates gated by the selection (straight-through with the predictor)."""
        layer, attn = self.idle_swin, self.attn
        B, H, W, C = x.shape
        windows = to_windows(self, x)
        normed = to_windows(self, self.norm1(x))
        R, M = windows.shape[:2]
        q, k, v = (split_projection(attn, normed, i) for i in range(3))
        logits = (q * attn.scale) @ k.transpose(-2, -1) + window_bias(self, R).to(q.dtype)  # (R, heads, M, M)
        if layer.score == "predictor":
            scores, _ = self._scores(x, normed)
            keep_prob = scores.exp()
        else:
            pooled = split_projection(attn, normed.mean(dim=1, keepdim=True), 0)
            scores = (pooled @ k.transpose(-2, -1)).mean(1).squeeze(1).detach()
        idx = select_per_window(scores, layer.keep)
        mask = torch.zeros(R, M, dtype=x.dtype, device=x.device).scatter(1, idx, 1.0)
        gate = mask + (keep_prob - keep_prob.detach()) if layer.score == "predictor" else mask
        layer.state.record("idle_mask", layer.index, mask, True)
        layer.state.record("attn_logits", layer.index, logits, True)
        self._record(mask.bool(), x.shape, True)
        if not layer.idle_kv:
            logits = logits + (1.0 - mask)[:, None, None, :] * IDLE_KEY_BIAS
        out = (attn.attn_drop(logits.softmax(dim=-1)) @ v).transpose(1, 2).reshape(R, M, -1)
        out = attn.proj_drop(attn.proj(out))
        windows = windows + self.drop_path1(out) * gate.unsqueeze(-1)
        windows = windows + self.drop_path2(self.mlp(self.norm2(windows))) * gate.unsqueeze(-1)
        return from_windows(self, windows, H, W)

    def _record(self, selected: torch.Tensor, shape, training: bool) -> None:
        """Aux "patch_state" (per original patch), "kept" (raster positions in the stage grid of the selected
        tokens, window by window) and "window" (the window of every original patch)."""
        layer = self.idle_swin
        state = layer.state
        if not (state.trace or training):
            return
        B, H, W, _ = shape
        device = selected.device
        grid_state = torch.where(selected, KEPT, IDLE).to(torch.int8).reshape(-1, self.window_area, 1)
        grid_state = from_windows(self, grid_state, H, W).reshape(B, H * W)
        state.record("patch_state", layer.index, upsample_to_patches(grid_state, (H, W), layer.patch_grid), training)
        raster = torch.arange(H * W, device=device).reshape(1, H, W, 1).expand(B, -1, -1, -1)
        positions = to_windows(self, raster).squeeze(-1)  # (R, M): where each window slot sits in the grid
        kept = positions.masked_select(selected).reshape(B, -1)
        state.record("kept", layer.index, kept, training)
        windows = window_ids((H, W), self.window_size, self.shift_size, device)
        state.record("window", layer.index, upsample_to_patches(windows, (H, W), layer.patch_grid), training)

