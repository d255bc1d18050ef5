"""ToFu, Token Fusion (Kim et al., WACV 2024, "Token Fusion: Bridging the Gap between Token Pruning and
Token Merging"): ToMe's bipartite matching in every block; the early blocks prune the matched tokens, the
later ones merge them with norm-preserving MLERP (docs/methods.md#tofu).

In every reduction block, after attention and its residual and before the MLP, ToMe's matching
(methods/tome.py: head-mean keys, alternate A/B split of the sequence, protected prefix tokens, the r
best-matched A tokens) pairs every source with a destination. Then
- blocks before `merge_from` ("prune"): the sources are dropped; destinations and sizes stay as they are;
- blocks from `merge_from` on ("MLERP"): each destination with its sources becomes
  x = (m / |m|) * max_i |x_i|, m = sum_i s_i x_i / sum_i s_i, s the token sizes: the direction of the
  size-weighted average with the largest norm among the merged tokens, so merging does not shrink the
  norm as plain averaging does. Sizes add up (ToMe).
Token order and counts are ToMe's; `prop_attn` is ToMe's proportional attention (it only acts once a
block has merged). Options: `r` and `prop_attn` as ToMe (r from keep_ratio via the final count
int(N0 * keep_ratio^3)), `merge_from` the first block that merges (default depth // 2 + 1, blocks 0-6
prune and 7-11 merge for 12 blocks).
"""
from __future__ import annotations

import torch

from .registry import register
from .slots import index_mask, pool_slots, record_slots
from .errors import MethodError
from .options import Option
from .tome import ToMe


@register
class ToFu(ToMe):
    name = "tofu"
    summary = "bipartite matching; prune the matched tokens in early blocks, MLERP-merge them in later ones"
    count_rule = "remove_r"
    options = dict(ToMe.options, merge_from=Option(
        None, int, "first block that merges (MLERP) instead of pruning; default depth // 2 + 1"))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        merge_from = self.opts["merge_from"]
        depth = self.geometry.depth
        if merge_from is not None and not 0 <= merge_from <= depth:
            raise MethodError(f"option merge_from={merge_from} is outside the blocks; valid: 0..{depth}")
        self.merge_from = depth // 2 + 1 if merge_from is None else merge_from

    def describe(self) -> dict:
        return dict(super().describe(), merge_from=self.merge_from)

    def merge(self, x: torch.Tensor, metric: torch.Tensor, r: int, index: int, training: bool) -> torch.Tensor:
        kept, src, dst_slot = self.match(metric, r)
        batch, num_tokens, _ = x.shape
        num_out = num_tokens - r
        merging = index >= self.merge_from
        slot = torch.empty(batch, num_tokens, dtype=torch.long, device=x.device)
        slot.scatter_(1, kept, torch.arange(num_out, device=x.device).expand(batch, -1))
        slot.scatter_(1, src, dst_slot if merging else torch.full_like(src, -1))
        carry = self.state.carry
        size = carry.get("size")
        if merging:
            weights = x.new_ones(x.shape[:2]) if size is None else size
            mean, carry["size"] = pool_slots(x, slot, num_out, weights)
            norms = x.norm(dim=-1)
            longest = norms.new_zeros(batch, num_out + 1).scatter_reduce(
                1, torch.where(slot < 0, num_out, slot), norms, "amax")[:, :num_out]
            x = mean / mean.norm(dim=-1, keepdim=True) * longest.unsqueeze(-1)
        else:
            x = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            if size is not None:
                carry["size"] = size.gather(1, kept)
        source = index_mask(src, num_tokens)
        record_slots(self.state, index, slot, source, num_out, self.geometry.num_prefix,
                     self.geometry.num_patches, training)
        return x
