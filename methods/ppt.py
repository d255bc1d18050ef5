"""PPT, Token Pruning and Pooling (Wu et al., 2023, "PPT: Token Pruning and Pooling for Efficient Vision
Transformers", arXiv 2310.01812; xjwu1024/PPT): per image and reduction layer, prune the inattentive tokens
or pool the duplicative ones, chosen by the variance of the token-importance scores (docs/methods.md#ppt).

At each reduction block, after attention and its residual and before the MLP, for the n current image
tokens of each image:
1. importance s_j = (sum over heads of the CLS query's attention probability on j) * |v_j| (v_j the value
   vector of token j over all heads), normalised to sum 1 over the image tokens;
2. if the (unbiased) variance of s is below `threshold`, the scores are flat (duplicative redundancy) and
   the image is pooled: ToMe's bipartite matching on the head-mean keys merges r tokens by size-weighted
   average (methods/tome.py, sizes carry on); otherwise (inattentive redundancy) it is pruned: the prefix and
   the n - r best-scored image tokens are kept, best first;
3. the MLP runs on the N - r tokens left, whichever way each image went.
Proportional attention (`prop_attn`) adds log(size) to the logits of every block after the first one that
pooled. Counts: r per reduction layer like ToMe (clamped to half the image tokens), from keep_ratio via the
final count int(N0 * keep_ratio^3); default layers depth/4, depth/2, 3 depth/4 (3, 6, 9: the official
`pp_loc_list`). The official off-the-shelf DeiT-S setting is r = 50, threshold 7e-5.
"""
from __future__ import annotations

import math

import torch

from .attention import attend, cls_attention_probs, output_projection, project_qkv
from .base import BlockTokens, Method, Schedule, patch_from_first_layer, quarter_layers
from .registry import register
from .slots import (
    index_mask, merge_count, pool_slots, record_slots, size_bias, start_block, stock_block_suffices,
)
from .errors import MethodError
from .geometry import standard_block_macs
from .options import Option
from .tome import MergeCount, ToMe, r_per_layer, r_schedule


class PPTBlock:
    """Mixin swapped into a stock timm `Block`: (proportional) attention, residual, prune or pool, MLP."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        method, index, size = start_block(self, attn_mask, is_causal, "token pruning and pooling")
        r = merge_count(method, index, x)
        if stock_block_suffices(method, r, size):
            return super().forward(x)

        x_in = self.norm1(x)
        q, k, v = project_qkv(self.attn, x_in)
        bias = size_bias(method, size, q.dtype)
        out = output_projection(self.attn, attend(self.attn, q, k, v, bias), x_in)
        x = x + self.drop_path1(self.ls1(out))
        if r > 0:
            cls_row = cls_attention_probs(self.attn, q[:, :, :1], k, bias)  # (B, H, N)
            x = method.reduce(x, cls_row, k, v, r, index, self.training)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@register
class PPT(Method):
    name = "ppt"
    summary = "per image, prune inattentive tokens or pool duplicative ones (by the score variance)"
    needs_cls = True
    count_rule = "remove_r"
    options = {
        "r": MergeCount(None, int, "tokens removed per reduction block (int or per-layer list); "
                                   "default: derived from keep_ratio"),
        "threshold": Option(7e-5, float, "pool when the variance of the importance scores is below it, "
                                         "else prune"),
        "prop_attn": Option(True, bool, "proportional attention: add log(token size) to the logits"),
    }
    layer_presets = {"quarters": quarter_layers}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.opts["threshold"] < 0:
            raise MethodError(f"option threshold={self.opts['threshold']} is negative; valid: >= 0")
        self.merge_counts = r_per_layer(self)

    # --- schedule and cost --------------------------------------------------------------------
    def schedule(self) -> Schedule:
        return r_schedule(self.geometry, self.merge_counts, "prune")

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """Plus the CLS attention row q0 K^T (N Da, recomputed beside the fused attention) and ToMe's
        matching (ceil(N/2) floor(N/2) d), computed for every image of the batch whichever way it goes."""
        g = self.geometry
        macs = standard_block_macs(g, tokens.n_attn, tokens.n_mlp)
        if tokens.action:
            n = tokens.n_in
            macs += n * g.attn_dim + math.ceil(n / 2) * (n // 2) * g.head_dim
        return macs

    def describe(self) -> dict:
        return dict(super().describe(), merge_counts=[self.merge_counts.get(i, 0) for i in self.layers])

    # --- patching -------------------------------------------------------------------------------
    def patch(self, model) -> None:
        patch_from_first_layer(self, model.blocks, PPTBlock)

    # --- the reduction itself ------------------------------------------------------------------
    def importance(self, cls_row: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, n) significance of the image tokens: CLS attention summed over heads times |v_j|, sum 1."""
        prefix = self.geometry.num_prefix
        value_norm = v.transpose(1, 2).flatten(2).norm(dim=-1)  # (B, N) over all heads
        score = (cls_row.sum(dim=1) * value_norm)[:, prefix:]
        return score / score.sum(dim=1, keepdim=True)

    def reduce(self, x: torch.Tensor, cls_row: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: int,
               index: int, training: bool) -> torch.Tensor:
        prefix = self.geometry.num_prefix
        batch, num_tokens, _ = x.shape
        num_out = num_tokens - r
        device = x.device
        arange_out = torch.arange(num_out, device=device).expand(batch, -1)
        with torch.no_grad():
            score = self.importance(cls_row, v)
            pool = score.var(dim=1) < self.opts["threshold"]  # (B,) per image
            # pooling: ToMe's matching (computed for every image, used where pool is set)
            kept, src, dst_slot = ToMe.match(self, k.mean(dim=1), r)
            pooled = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
            pooled.scatter_(1, kept, arange_out).scatter_(1, src, dst_slot)
            # pruning: prefix, then the best-scored image tokens in descending order
            best = score.topk(num_tokens - prefix - r, dim=1, sorted=True).indices + prefix
            order = torch.cat([torch.arange(prefix, device=device).expand(batch, -1), best], dim=1)
            pruned = torch.full((batch, num_tokens), -1, dtype=torch.long, device=device)
            pruned.scatter_(1, order, arange_out)
            slot = torch.where(pool[:, None], pooled, pruned)
            source = index_mask(src, num_tokens) & pool[:, None]
        carry = self.state.carry
        size = carry.get("size")
        x, carry["size"] = pool_slots(x, slot, num_out, x.new_ones(x.shape[:2]) if size is None else size)
        record_slots(self.state, index, slot, source, num_out, prefix, self.geometry.num_patches, training)
        return x
