"""Zero-TPrune (Wang, Dedhia, Jha, CVPR 2024, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the
Attention Graph in Pre-Trained Transformers"): importance by a weighted PageRank on the attention graph, then
importance-guided similarity pruning of redundant tokens (docs/methods.md#zero-tprune).

In every reduction block, after attention and its residual and before the MLP:
1. I-stage, weighted PageRank: the attention probabilities of each head are a weighted directed graph
   (query i -> key j with weight P_h[i, j], rows summing to 1). Starting from s = 1/N on all N tokens,
   `iterations` times s_h <- P_h^T s_h (a token is important when important tokens attend to it); the
   importance is the mean of s_h over heads;
2. S-stage: the image tokens are sorted by importance and split in two: the more important half
   (ceil(n/2)) is the target group B, the rest the source group A. Every A token's redundancy is its
   highest cosine similarity (head-mean keys) to a B token; the r most redundant A tokens are pruned;
3. the MLP runs on the prefix and the n - r image tokens left, in their input order.
Counts: r per reduction layer like ToMe (clamped to half the image tokens), from keep_ratio via the final
count int(N0 * keep_ratio^3); every block reduces by default.

Left out: the I-stage's own pruning of the least important tokens (the final paper has the importance
guide the partition, which is what is done here), and its two refinements, emphasizing informative regions
and the variance-based head filter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import output_projection, project_qkv
from .base import BlockTokens, Method, Schedule, swap_class
from .registry import register
from .slots import index_mask, record_slots, start_block
from .errors import MethodError
from .geometry import standard_block_macs
from .mctf import explicit_attention
from .options import Option
from .tome import MergeCount, r_per_layer, r_schedule


class ZeroTPruneBlock:
    """Mixin swapped into a stock timm `Block`: explicit attention, residual, prune, MLP."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        method, index, _ = start_block(self, attn_mask, is_causal, "token pruning")
        r = min(method.prune_counts.get(index, 0), (x.shape[1] - method.geometry.num_prefix) // 2)
        if r == 0:
            return super().forward(x)
        x_in = self.norm1(x)
        q, k, v = project_qkv(self.attn, x_in)
        mixed, probs = explicit_attention(self.attn, q, k, v)
        x = x + self.drop_path1(self.ls1(output_projection(self.attn, mixed, x_in)))
        x = method.prune(x, probs, k.mean(dim=1), r, index, self.training)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@register
class ZeroTPrune(Method):
    name = "zerotprune"
    aliases = ("zero-tprune", "zero-tp")
    summary = "prune tokens similar to important ones (weighted PageRank on the attention graph)"
    needs_cls = False
    count_rule = "remove_r"
    options = {
        "r": MergeCount(None, int, "tokens pruned per reduction block (int or per-layer list); "
                                   "default: derived from keep_ratio"),
        "iterations": Option(30, int, "weighted-PageRank iterations"),
    }
    layer_presets = {"all": lambda depth: tuple(range(depth))}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.opts["iterations"] < 1:
            raise MethodError(f"option iterations={self.opts['iterations']} is not valid; valid: >= 1")
        self.prune_counts = r_per_layer(self)

    # --- schedule and cost --------------------------------------------------------------------
    def schedule(self) -> Schedule:
        return r_schedule(self.geometry, self.prune_counts, "prune")

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """Plus the PageRank iterations (iterations x H N^2 for the mat-vecs s^T P_h) and the similarities of
        the source half against the target half of the image tokens (floor(n/2) ceil(n/2) d)."""
        g = self.geometry
        macs = standard_block_macs(g, tokens.n_attn, tokens.n_mlp)
        if tokens.action == "prune":
            n, n_img = tokens.n_in, tokens.n_in - g.num_prefix
            macs += self.opts["iterations"] * g.num_heads * n * n + (n_img // 2) * math.ceil(n_img / 2) * g.head_dim
        return macs

    def describe(self) -> dict:
        return dict(super().describe(), prune_counts=[self.prune_counts.get(i, 0) for i in self.layers])

    # --- patching -------------------------------------------------------------------------------
    def patch_block(self, block, index: int) -> None:
        swap_class(block, ZeroTPruneBlock)
        block.token_reduction = self
        block.token_reduction_index = index

    # --- the reduction itself ------------------------------------------------------------------
    def importance(self, probs: torch.Tensor) -> torch.Tensor:
        """Weighted PageRank: (B, N) mean over heads of s_h after `iterations` steps s_h <- P_h^T s_h."""
        batch, heads, num, _ = probs.shape
        s = probs.new_full((batch, heads, 1, num), 1.0 / num)
        for _ in range(self.opts["iterations"]):
            s = s @ probs
        return s.squeeze(2).mean(dim=1)

    def prune(self, x: torch.Tensor, probs: torch.Tensor, metric: torch.Tensor, r: int, index: int,
              training: bool) -> torch.Tensor:
        prefix = self.geometry.num_prefix
        batch, num_tokens, _ = x.shape
        n = num_tokens - prefix
        with torch.no_grad():
            importance = self.importance(probs)[:, prefix:]
            order = importance.sort(dim=1, descending=True, stable=True).indices
            targets, sources = order[:, :math.ceil(n / 2)], order[:, math.ceil(n / 2):]
            unit = F.normalize(metric[:, prefix:], dim=-1)
            pick = lambda idx: unit.gather(1, idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))  # noqa: E731
            redundancy = (pick(sources) @ pick(targets).transpose(-1, -2)).amax(dim=-1)
            pruned = sources.gather(1, redundancy.topk(r, dim=1, sorted=True).indices)  # image indices
            alive = ~index_mask(pruned + prefix, num_tokens)
            slot = torch.where(alive, alive.long().cumsum(dim=1) - 1, -1)
        kept = slot.argsort(dim=1, stable=True)[:, r:]  # the alive tokens' positions, in order (dropped: -1)
        x = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        record_slots(self.state, index, slot, torch.zeros_like(alive), num_tokens - r, prefix,
                     self.geometry.num_patches, training)
        return x
