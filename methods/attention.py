"""Pieces of a stock timm `Attention` forward, so methods can run attention on a subset of tokens,
add a bias (ToMe's log-size), or read the CLS row, with the block's own weights and switches.

Each helper mirrors `timm.layers.attention.Attention.forward` (q/k norm, the fused-SDPA switch,
the output norm and gate), so that a method which selects every token reproduces the stock block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of shape (B, H, N, d) for x (B, N, C), with the module's q_norm / k_norm applied."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_logits(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled pre-softmax logits (B, H, Nq, Nk)."""
    return (q * attn.scale) @ k.transpose(-2, -1)


def attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v -> (B, Nq, H*d), using SDPA exactly when the stock module would.

    `bias` is an additive float mask broadcastable to (B, H, Nq, Nk) (ToMe's log size, IdleViT's -1e5).
    """
    dropout = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    else:
        logits = attention_logits(attn, q, k)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    B, _, Nq, _ = q.shape
    return out.transpose(1, 2).reshape(B, Nq, attn.attn_dim)


def output_projection(attn: nn.Module, out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """The stock tail of Attention.forward: output norm, optional gate (computed from the attention's
    own input `x_in`, for the same tokens as `out`), proj, proj_drop."""
    out = attn.norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x_in).sigmoid()
    return attn.proj_drop(attn.proj(out))


def cls_attention_probs(attn: nn.Module, q_cls: torch.Tensor, k: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the CLS query over all keys, per head: (B, H, N).

    Recomputing just this row costs B*H*N*d, so the full attention can stay on the fused SDPA path
    (docs/methods.md#attention-kernels) while EViT / Top-K still read the CLS probabilities.
    q_cls: (B, H, 1, d)."""
    logits = attention_logits(attn, q_cls, k)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).squeeze(2)
