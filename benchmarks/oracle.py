"""The oracle of a method: the unpatched blocks run on the method's token schedule with selection for free.

A reducing block of the oracle keeps the first tokens by slicing (no scores, no sort, no gather), so its
time is what the schedule costs in stock blocks of those sizes. Splitting a method's efficiency there
(docs/PERFORMANCE.md#where-the-time-goes):

    efficiency(method) = efficiency(oracle) * t_oracle / t_method * GMACs_method / GMACs_plain

the first factor is what smaller matrices cost (fixed per-op costs, GEMM shapes), the rest is the method's
own work (scoring, selection, gather / write-back, its counted overhead). The logits mean nothing.

Per action of `Method.schedule()`:
- "" (stock tokens): the stock block;
- "idle": the stock block on the first n_attn tokens, the rest concatenated back unchanged (the structural
  write-back of a method that keeps every token);
- "prune", "fuse", "merge": attention and its residual on all n_in tokens, then the first n_out tokens go
  through the MLP (EViT's fused token and ToMe's size-weighted average cost nothing here).
"""
from __future__ import annotations

import torch


class OracleBlock:
    def forward(self, x, attn_mask=None, is_causal=False):
        tokens = self.oracle_tokens
        if tokens.action == "idle":
            n = tokens.n_attn
            return torch.cat([super().forward(x[:, :n]), x[:, n:]], dim=1)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x[:, :tokens.n_out]
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def make_oracle(model):
    """Swap every block of a patched model whose schedule reduces tokens to the oracle forward, and every
    other patched block back to its stock class, in place; returns it."""
    method = model.token_reduction
    if method.adaptive:
        raise ValueError(f"method {method.name!r} keeps a different count per image: no static oracle")
    for block, tokens in zip(model.blocks, method.schedule().blocks):
        stock = getattr(block, "_stock_class", type(block))
        if tokens.action:
            block.__class__ = type(f"Oracle{stock.__name__}", (OracleBlock, stock), {"_stock_class": stock})
            block.oracle_tokens = tokens
        else:
            block.__class__ = stock
    return model
