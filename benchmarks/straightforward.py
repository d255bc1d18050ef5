"""The straightforward eval-mode block forwards of IdleViT, EViT / Top-K / random and ToMe: the code as it
was before the fast paths of docs/PERFORMANCE.md, kept as the reference the fast paths are tested and timed
against (tests/test_fast_paths.py, benchmarks/efficiency.py --against straightforward).

What "straightforward" means per method:
- IdleViT: official scoring (keys of all N tokens, per-head logits averaged), q and v by two separate
  projections of the selected tokens, keys gathered; `gather` / `scatter` with an index expanded over the
  channels; the write-back is `x.scatter`.
- EViT / Top-K / random: the CLS row by `q0 @ k^T` (which copies the keys), `gather` with an expanded index.
- ToMe: head-mean keys, every token multiplied and divided by its size, `gather` / `scatter_reduce` with
  expanded indices.

`make_straightforward(model)` swaps the patched blocks of a model patched by `methods.apply` to these
forwards (eval only: training uses the methods' own paths); the method object, its options and its state stay.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.attention import attend, output_projection, project_qkv
from methods.base import gather_tokens, rel_ceil


def _split(attn, which):
    rows = slice(which * attn.attn_dim, (which + 1) * attn.attn_dim)
    bias = attn.qkv.bias
    return attn.qkv.weight[rows], None if bias is None else bias[rows]


def _project(attn, x, which):
    B, n, _ = x.shape
    out = F.linear(x, *_split(attn, which))
    return out.reshape(B, n, attn.num_heads, attn.head_dim).transpose(1, 2)


class StraightIdleBlock:
    """IdleViT's gather path as it was: official scoring, split projections, gather/scatter."""

    def forward(self, x, attn_mask=None, is_causal=False):
        layer, attn = self.idle_layer, self.attn
        if layer.keep == x.shape[1] - layer.num_prefix:
            return super().forward(x)
        x_norm = self.norm1(x)
        q_cls = attn.q_norm(_project(attn, x_norm[:, :1], 0))
        k_all = attn.k_norm(_project(attn, x_norm, 1))
        scores = (q_cls @ k_all.transpose(-2, -1)).mean(1).squeeze(1)
        B, P = x.shape[0], layer.num_prefix
        top = scores[:, P:].topk(layer.keep, dim=1, sorted=True).indices + P
        idx = torch.cat([torch.arange(P, device=x.device).expand(B, P), top], dim=1)
        selected, selected_norm = gather_tokens(x, idx), gather_tokens(x_norm, idx)
        q = attn.q_norm(_project(attn, selected_norm, 0))
        k = k_all.gather(2, idx[:, None, :, None].expand(-1, k_all.shape[1], -1, k_all.shape[3]))
        v = _project(attn, selected_norm, 2)
        out = output_projection(attn, attend(attn, q, k, v), selected_norm)
        selected = selected + self.drop_path1(self.ls1(out))
        selected = selected + self.drop_path2(self.ls2(self.mlp(self.norm2(selected))))
        return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), selected)


def _pruning_scores(method, attn, q, k, index):
    """The scores as the methods computed them: full q0 @ k^T products."""
    prefix = method.geometry.num_prefix
    if method.name == "random":
        return method.token_scores(attn, q, k, index)
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    if method.name == "topk" and method.opts["score"] == "logit":
        return logits.squeeze(2).mean(dim=1)[:, prefix:]
    return logits.softmax(dim=-1).squeeze(2).mean(dim=1)[:, prefix:]


class StraightPruningBlock:
    """EViT / Top-K / random keep-K as they were."""

    def forward(self, x, attn_mask=None, is_causal=False):
        method, index = self.token_reduction, self.token_reduction_index
        num_image = x.shape[1] - method.geometry.num_prefix
        left = rel_ceil(num_image, method.keep_ratio)
        if left >= num_image:
            return super().forward(x)
        x_in = self.norm1(x)
        q, k, v = project_qkv(self.attn, x_in)
        out = output_projection(self.attn, attend(self.attn, q, k, v), x_in)
        x = x + self.drop_path1(self.ls1(out))
        scores = _pruning_scores(method, self.attn, q, k, index)
        prefix = method.geometry.num_prefix
        kept_image = scores.topk(left, dim=1, largest=True, sorted=True).indices
        kept = torch.cat([torch.arange(prefix, device=x.device).expand(x.shape[0], -1), kept_image + prefix], 1)
        reduced = gather_tokens(x, kept)
        if method.fuses:
            weights = scores.scatter(1, kept_image, 0.0).unsqueeze(1)
            reduced = torch.cat([reduced, weights.to(x.dtype) @ x[:, prefix:]], dim=1)
        return reduced + self.drop_path2(self.ls2(self.mlp(self.norm2(reduced))))


def _tome_match(method, metric, r):
    prefix = method.geometry.num_prefix
    protected_a, protected_b = (prefix + 1) // 2, prefix // 2
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, :protected_a, :] = -math.inf
    scores[:, :, :protected_b] = -math.inf
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src_a, unmerged_a = order[:, :r], order[:, r:]
    if prefix:
        unmerged_a = unmerged_a.sort(dim=1).values
    dst_b = best_b.gather(1, src_a)
    batch, num_b, device = metric.shape[0], b.shape[1], metric.device
    unmerged_a = unmerged_a[:, protected_a:]
    image_b = torch.arange(protected_b, num_b, device=device).expand(batch, -1)
    kept = torch.cat([torch.arange(prefix, device=device).expand(batch, -1), 2 * unmerged_a, 2 * image_b + 1], 1)
    first_image_b_slot = prefix + unmerged_a.shape[1]
    dst_slot = torch.where(dst_b < protected_b, 2 * dst_b + 1, first_image_b_slot + dst_b - protected_b)
    return kept, 2 * src_a, dst_slot


class StraightMergingBlock:
    """ToMe as it was (ToFu keeps its own merge: only ToMe blocks are swapped)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        method, index = self.token_reduction, self.token_reduction_index
        carry = method.state.carry
        if index == method.layers[0]:
            carry.clear()
        size = carry.get("size")
        x_in = self.norm1(x)
        q, k, v = project_qkv(self.attn, x_in)
        bias = None
        if size is not None and method.opts["prop_attn"]:
            bias = size.log().to(q.dtype)[:, None, None, :]
        out = output_projection(self.attn, attend(self.attn, q, k, v, bias), x_in)
        x = x + self.drop_path1(self.ls1(out))
        r = min(method.merge_counts.get(index, 0), (x.shape[1] - method.geometry.num_prefix) // 2)
        if r > 0:
            kept, src, dst_slot = _tome_match(method, k.mean(dim=1), r)
            if size is None:
                size = x.new_ones(x.shape[:2])
            weighted = x * size.unsqueeze(-1)
            channels = dst_slot.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            merged = gather_tokens(weighted, kept).scatter_reduce(1, channels, gather_tokens(weighted, src), "sum")
            new_size = size.gather(1, kept).scatter_reduce(1, dst_slot, size.gather(1, src), "sum")
            carry["size"] = new_size
            x = merged / new_size.unsqueeze(-1)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


_SWAPS = {"IdleBlock": StraightIdleBlock, "PruningBlock": StraightPruningBlock, "MergingBlock": StraightMergingBlock}


def make_straightforward(model):
    """Swap every fast block of a patched model to its straightforward forward, in place; returns it."""
    method = model.token_reduction
    if method.name not in ("idle", "evit", "topk", "random", "tome"):
        raise ValueError(f"no straightforward forward for method {method.name!r}")
    for block in model.blocks:
        mixin = next((m for m in type(block).__mro__ if m.__name__ in _SWAPS), None)
        if mixin is None:
            continue
        stock = block._stock_class
        block.__class__ = type(f"Straight{stock.__name__}", (_SWAPS[mixin.__name__], stock),
                               {"_stock_class": stock})
    return model
