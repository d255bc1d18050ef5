"""Pieces of a stock timm `Attention` forward, so methods can run attention on a subset of tokens,
add a bias (ToMe's log-size), or read the CLS row, with the block's own weights and switches.

Each helper mirrors `timm.layers.attention.Attention.forward` (q/k norm, the fused-SDPA switch,
the output norm and gate), so that a method which selects every token reproduces the stock block.

The row helpers (`batch_rows`, `take_rows`, `replace_rows`) move whole tokens with one flat index per
block: `index_select` / `index_copy_` on the (B*N, C) view copy rows, where `gather` / `scatter` with an
index expanded over the channels read one index per element (on CPU about 16x slower for DeiT-S at
batch 32, docs/PERFORMANCE.md).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

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


def cls_logits(attn: nn.Module, q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled pre-softmax logits of the CLS query over all keys, per head: (B, H, N). q_cls: (B, H, 1, d).

    `k` from `project_qkv` is a strided view of the fused qkv output in which batch and heads cannot be
    merged, so `q @ k^T` first copies every key (5.8 ms for DeiT-S at batch 32 on one CPU thread). On
    CPU with batch > 1 one row-vector bmm per head, (B, 1, d) @ (B, d, N), reads the keys in place
    (0.9 ms; the column form (B, N, d) @ (B, d, 1) takes a slow path, 1.3 ms); a single sample's keys
    are cheaper to copy than H calls. All are matrix products, so fvcore counts the N*Da of the
    analytic count exactly."""
    scaled = q_cls * attn.scale
    if k.device.type != "cpu" or k.shape[0] == 1:
        return (scaled @ k.transpose(-2, -1)).squeeze(2)
    return torch.cat([torch.bmm(scaled[:, h], k[:, h].transpose(1, 2)) for h in range(k.shape[1])], dim=1)


def cls_attention_probs(attn: nn.Module, q_cls: torch.Tensor, k: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the CLS query over all keys, per head: (B, H, N).

    Recomputing just this row costs B*H*N*d, so the full attention can stay on the fused SDPA path
    (docs/methods.md#attention-kernels) while EViT / Top-K still read the CLS probabilities.
    q_cls: (B, H, 1, d); bias broadcastable to (B, H, 1, N)."""
    logits = cls_logits(attn, q_cls, k)
    if bias is not None:
        logits = logits + bias.squeeze(2)
    return logits.softmax(dim=-1)


def batch_rows(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Positions (B, n) in sequences of `num_tokens` -> rows (B*n,) of the flattened (B*num_tokens, C)
    batch. Computed once per block and shared by every gather and write-back of that block."""
    offsets = torch.arange(0, idx.shape[0] * num_tokens, num_tokens, device=idx.device)
    return (idx + offsets.unsqueeze(1)).reshape(-1)


def take_rows(x: torch.Tensor, rows: torch.Tensor, per_sample: int) -> torch.Tensor:
    """x (B, N, C), rows from `batch_rows` -> (B, per_sample, C): the tokens at those rows, in order."""
    batch, _, channels = x.shape
    return x.reshape(-1, channels).index_select(0, rows).view(batch, per_sample, channels)


def replace_rows(x: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """x with the tokens at `rows` replaced by `new` (B, n, C), out of place.

    `x` belongs to the caller (a forward hook or forward_intermediates may hold it as the previous
    block's output), so the result is a new tensor: one row copy of x into memory this function owns,
    then the n new rows written into it. Every other token is bit for bit the input."""
    channels = x.shape[-1]
    out = x.clone(memory_format=torch.contiguous_format)
    out.view(-1, channels).index_copy_(0, rows, new.reshape(-1, channels).to(out.dtype))
    return out


def head_sum(k: torch.Tensor) -> torch.Tensor:
    """sum over heads of k (B, H, N, d) -> (B, N, d).

    `k` from `project_qkv` is a strided view of the fused qkv output; on CPU a reduction over its head
    dimension is ~3x slower than adding the H head slices (DeiT-S, batch 32), so the CPU path adds them."""
    if k.device.type != "cpu" or k.shape[1] < 2:
        return k.sum(dim=1)
    total = k[:, 0] + k[:, 1]
    for head in range(2, k.shape[1]):
        total = total + k[:, head]
    return total


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side (kineto) logs start/stop lines to file descriptor 2 on every use; a job's
    console should not fill with them. Python exceptions still propagate; the descriptor is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def sdpa_kernels(net: nn.Module, *inputs) -> list[str]:
    """The SDPA kernels one forward of `net(*inputs)` runs, sorted: e.g.
    `_scaled_dot_product_flash_attention_for_cpu` (CPU flash), `_scaled_dot_product_attention_math` (the
    math fallback), `_scaled_dot_product_efficient_attention` / `_scaled_dot_product_flash_attention`
    (CUDA); ["explicit"] when no SDPA kernel ran (timm's `fused_attn=False`: matmul + softmax).
    Read from the profiler, since PyTorch picks the kernel per call from shapes, mask and dtype."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        net(*inputs)
    names = {event.name.removeprefix("aten::") for event in prof.events()}
    kernels = sorted(name for name in names if name.startswith(("_scaled_dot_product", "_flash_attention",
                                                                 "_efficient_attention")))
    return kernels or ["explicit"]
