"""MCTF, Multi-Criteria Token Fusion (Lee et al., CVPR 2024, "Multi-criteria Token Fusion with One-step-ahead
Attention for Efficient Vision Transformers"; mlvlab/MCTF), training-free variant (docs/methods.md#mctf).

At the end of every reduction block (after its MLP), on the block's output x and its own attention
probabilities P (B, H, N, N) (proportional attention included):
1. criteria for a pair (i in A, j in B), A = positions 0, 2, 4, ..., B = 1, 3, 5, ... of the sequence:
   similarity  ((cos(x_i, x_j) + 1) / 2)^(1 / tau_sim);
   informativeness  (u_i u_j)^(1 / tau_info), u = (1 / a) / max(1 / a), a_j = mean over heads and queries
     of P[:, :, j] (the attention a token receives; rarely attended tokens are fused first);
   size  (v_i v_j)^(1 / tau_size), v = (1 / s) / max(1 / s) (small tokens are fused first);
   the score is their product (a tau of 0 switches that criterion off); prefix tokens are never matched;
2. bidirectional bipartite matching: the r // 2 A tokens with the best scores are fused into their best B
   token; then the r - r // 2 B tokens with the best scores towards the remaining A tokens are fused into
   their best A token (scores of step 1, a B token carries what it received);
3. fusion: each group becomes sum_i w_i x_i / sum_i w_i, w_i = a_i s_i (attention-and-size pooling;
   `pooling=size` takes w_i = s_i as ToMe); sizes add up.
The output is [prefix, remaining A tokens (by position, or in score order without prefix tokens), remaining
B tokens in step-2 score order] (the official order, prefix tokens moved to the front).

Left out, on purpose: the one-step-ahead attention (fusing the next block's input with that block's own
attention map and reusing the fused map) and the training-time parts (the teacher/student token-reduction
consistency and the random r of the teacher). Here a block fuses its own output with its own attention.
Counts: r per reduction layer like ToMe (clamped to half the image tokens); from keep_ratio via the final
count int(N0 * keep_ratio^3) over the reduction layers, default blocks 1..L-1 (the official
`activate_layer`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import attend, attention_logits, output_projection, project_qkv
from .base import BlockTokens, Method, Schedule, patch_from_first_layer
from .registry import register
from .slots import (
    index_mask, merge_count, pool_slots, record_slots, size_bias, start_block, stock_block_suffices,
)
from .errors import MethodError
from .geometry import standard_block_macs
from .options import Option
from .tome import MergeCount, r_per_layer, r_schedule


def explicit_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias) v as explicit matrix products: (output (B, N, H*d), probs (B, H, N, N)).
    The probabilities are the ones before attention dropout (the scores); the output uses dropout as the
    stock module does."""
    logits = attention_logits(attn, q, k)
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    out = attn.attn_drop(probs) @ v
    batch, _, num, _ = q.shape
    return out.transpose(1, 2).reshape(batch, num, attn.attn_dim), probs


class MCTFBlock:
    """Mixin swapped into a stock timm `Block`: (proportional) attention, residual, MLP, fuse."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        method, index, size = start_block(self, attn_mask, is_causal, "token fusion")
        r = merge_count(method, index, x)
        if stock_block_suffices(method, r, size):
            return super().forward(x)

        x_in = self.norm1(x)
        q, k, v = project_qkv(self.attn, x_in)
        bias = size_bias(method, size, q.dtype)
        if r > 0:
            mixed, probs = explicit_attention(self.attn, q, k, v, bias)
        else:
            mixed, probs = attend(self.attn, q, k, v, bias), None
        x = x + self.drop_path1(self.ls1(output_projection(self.attn, mixed, x_in)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if r > 0:
            x = method.fuse(x, probs, r, index, self.training)
        return x


@register
class MCTF(Method):
    name = "mctf"
    summary = "fuse tokens by similarity, attention received and size (bidirectional matching, training-free)"
    needs_cls = False
    count_rule = "remove_r"
    options = {
        "r": MergeCount(None, int, "tokens fused per reduction block (int or per-layer list); "
                                   "default: derived from keep_ratio"),
        "tau_sim": Option(1.0, float, "temperature of the similarity criterion (0: off)"),
        "tau_info": Option(20.0, float, "temperature of the informativeness criterion (0: off)"),
        "tau_size": Option(40.0, float, "temperature of the size criterion (0: off)"),
        "bidirection": Option(True, bool, "bidirectional matching (A to B, then B to A)"),
        "pooling": Option("attention", str, "fusion weights: attention x size, or size", ("attention", "size")),
        "prop_attn": Option(True, bool, "proportional attention: add log(token size) to the logits"),
    }
    layer_presets = {"all_but_first": lambda depth: tuple(range(1, depth))}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("tau_sim", "tau_info", "tau_size"):
            if self.opts[name] < 0:
                raise MethodError(f"option {name}={self.opts[name]} is negative; valid: >= 0 (0 switches it off)")
        self.merge_counts = r_per_layer(self)

    # --- schedule and cost --------------------------------------------------------------------
    def schedule(self) -> Schedule:
        return r_schedule(self.geometry, self.merge_counts, "merge", before_mlp=False)

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """Plus the cosine similarities of A against B on the block's output tokens (width D)."""
        macs = standard_block_macs(self.geometry, tokens.n_attn, tokens.n_mlp)
        if tokens.action == "merge":
            n = tokens.n_in
            macs += math.ceil(n / 2) * (n // 2) * self.geometry.dim
        return macs

    def describe(self) -> dict:
        return dict(super().describe(), merge_counts=[self.merge_counts.get(i, 0) for i in self.layers])

    # --- patching -------------------------------------------------------------------------------
    def patch(self, model) -> None:
        patch_from_first_layer(self, model.blocks, MCTFBlock)

    # --- the reduction itself ------------------------------------------------------------------
    def scores(self, x: torch.Tensor, received: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """Multi-criteria scores of A (rows) against B (columns), prefix pairs at -inf."""
        unit = F.normalize(x, dim=-1)
        score = torch.ones(x.shape[0], math.ceil(x.shape[1] / 2), x.shape[1] // 2, dtype=x.dtype, device=x.device)
        if self.opts["tau_sim"]:
            sim = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
            score = score * ((sim + 1) / 2).clamp_min(0) ** (1 / self.opts["tau_sim"])
        for criterion, tau in ((received, self.opts["tau_info"]), (size, self.opts["tau_size"])):
            if tau:
                inverse = 1 / criterion
                inverse = inverse / inverse.amax(dim=1, keepdim=True)
                score = score * (inverse[:, ::2, None] * inverse[:, None, 1::2]) ** (1 / tau)
        prefix = self.geometry.num_prefix
        score[:, :(prefix + 1) // 2, :] = -math.inf
        score[:, :, :prefix // 2] = -math.inf
        return score

    def assign(self, score: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Output slot of every input token and the source mask, by (bidirectional) bipartite matching."""
        batch, num_a, num_b = score.shape
        num = num_a + num_b
        prefix, device = self.geometry.num_prefix, score.device
        bidirection = self.opts["bidirection"]
        r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
        best, best_b = score.max(dim=-1)
        order_a = best.argsort(dim=-1, descending=True)
        src_a, unm_a = order_a[:, :r1], order_a[:, r1:]
        if prefix:
            unm_a = unm_a.sort(dim=-1).values
        if bidirection:
            to_unm_a = score.gather(1, unm_a.unsqueeze(-1).expand(-1, -1, num_b)).transpose(1, 2)  # (B, nb, na')
            best2, best_a = to_unm_a.max(dim=-1)
            order_b = best2.argsort(dim=-1, descending=True)
            src_b, unm_b = order_b[:, :r2], order_b[:, r2:]
        else:
            unm_b = torch.arange(num_b, device=device).expand(batch, -1)
            src_b = unm_b[:, :0]
        # Positions in the sequence; the output is [prefix, unmerged A, unmerged B] with prefix first.
        pos_unm = torch.cat([2 * unm_a, 2 * unm_b + 1], dim=1)  # (B, num - r): official order
        is_prefix = pos_unm < prefix
        rank = torch.where(is_prefix, pos_unm - num, torch.arange(num - r, device=device).expand(batch, -1))
        out_pos = pos_unm.gather(1, rank.sort(dim=1, stable=True).indices)  # prefix to the front, in order
        slot = torch.full((batch, num), -1, dtype=torch.long, device=device)
        slot.scatter_(1, out_pos, torch.arange(num - r, device=device).expand(batch, -1))
        if bidirection and r2:
            dst_a = unm_a.gather(1, best_a.gather(1, src_b))  # A index each B source goes to
            slot.scatter_(1, 2 * src_b + 1, slot.gather(1, 2 * dst_a))
        if r1:
            slot.scatter_(1, 2 * src_a, slot.gather(1, 2 * best_b.gather(1, src_a) + 1))
        source = index_mask(2 * src_a, num, 2 * src_b + 1)
        return slot, source, num - r

    def fuse(self, x: torch.Tensor, probs: torch.Tensor, r: int, index: int, training: bool) -> torch.Tensor:
        carry = self.state.carry
        size = carry.get("size")
        if size is None:
            size = x.new_ones(x.shape[:2])
        received = probs.mean(dim=(1, 2))  # (B, N): attention each token receives
        with torch.no_grad():
            slot, source, num_out = self.assign(self.scores(x, received, size), r)
        weight = received * size if self.opts["pooling"] == "attention" else size
        x, _ = pool_slots(x, slot, num_out, weight)
        carry["size"] = size.new_zeros(size.shape[0], num_out + 1).scatter_add(
            1, torch.where(slot < 0, num_out, slot), size)[:, :num_out]
        record_slots(self.state, index, slot, source, num_out, self.geometry.num_prefix,
                     self.geometry.num_patches, training)
        return x
