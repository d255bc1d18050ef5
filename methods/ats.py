"""ATS, adaptive token sampling (Fayyaz et al., ECCV 2022; adaptivetokensampling/ATS), as a patch over a stock
timm ViT (docs/methods.md#ats).

In every ATS block, from the block's own attention:

    S_j  = (sum over heads of the CLS row of the softmax attention)_j * ||v_j||,  j an image token
    S    = S / sum_j S_j;  sort ascending;  cdf;  cdf_hat = (cdf - cdf_min) / (cdf_max - cdf_min)
    y_t  = y_0 + t (1 - y_0) / (K - 1),  t = 0..K-1,  y_0 the smallest positive cdf_hat
    keep the image token whose cdf_hat is nearest to each y_t, each token once (duplicates removed)

so an image keeps 1 <= u <= min(K, n) image tokens, more where its significance is spread and fewer where
a few tokens carry it. The kept tokens (prefix first, then the image tokens in ascending significance, the
official order) are the block's queries; keys and values stay all of the block's input tokens, and only the
kept tokens go through the residual, the MLP and on to the next block.

K, the number of samples, is `samples` when given (the official configuration samples N0 = 196 at every
ATS block of DeiT-S), else int(N0 * keep_ratio); at keep ratio 1 without `samples` the blocks are the
stock blocks (the identity row of every grid), since sampling always removes duplicates.

Token counts differ per image. A batch is padded to its largest count; padded tokens are masked out of
every later attention with an additive -inf key bias (exact, unlike the official eps-floored policy
softmax), so an image's result and its count do not depend on its batch. `image_schedules()` holds the
per-image counts of a traced forward, and the analytic MACs of an image are those of the image alone.
Training runs the same path (the official trains with the policy mask over all tokens; the sampling is not
differentiable in either, the gradient reaches the weights through the kept tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend, output_projection, project_qkv
from .base import DROPPED, KEPT, BlockTokens, Method, Schedule, gather_tokens, swap_class
from .registry import register
from .errors import MethodError
from .geometry import standard_block_macs
from .options import Option


def _layers(depth: int) -> range:
    """The official ATS_BLOCKS: every block from depth // 4 on (3..11 for 12 blocks)."""
    return range(depth // 4, depth)


def inverse_transform_sample(scores: torch.Tensor, valid: torch.Tensor, samples: int):
    """ATS's sampling of image tokens, for a batch with padding.

    scores (B, n) >= 0 significance (entries where `valid` is False are ignored), valid (B, n) bool,
    samples K >= 1. Returns positions (B, U) long of the kept tokens in ascending significance (U = the
    largest count; a row's slots past its count repeat its first position), counts (B,) long and
    slot_valid (B, U) bool."""
    B, n = scores.shape
    device = scores.device
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    scores = scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    # Ascending significance, padding last (its cdf stays flat at the top and it is never nearest).
    order = torch.where(valid, scores, torch.full_like(scores, float("inf"))).argsort(dim=1, stable=True)
    sorted_valid = valid.gather(1, order)
    cdf = scores.gather(1, order).cumsum(dim=1)
    low, high = cdf[:, :1], cdf.max(dim=1, keepdim=True).values
    cdf_hat = (cdf - low) / (high - low).clamp_min(torch.finfo(cdf.dtype).tiny)
    inf = torch.full_like(cdf_hat, float("inf"))
    start = torch.where(sorted_valid & (cdf_hat > 0), cdf_hat, inf).min(dim=1, keepdim=True).values
    start = torch.where(torch.isinf(start), torch.ones_like(start), start)  # one token: sample at 1
    steps = torch.arange(samples, device=device, dtype=cdf_hat.dtype)
    ys = start + steps * (1.0 - start) / max(samples - 1, 1)  # (B, K)
    nearest = (ys[:, :, None] - torch.where(sorted_valid, cdf_hat, inf)[:, None, :]).abs().argmin(dim=2)
    picked = torch.zeros(B, n, dtype=torch.bool, device=device).scatter(
        1, nearest, torch.ones_like(nearest, dtype=torch.bool))  # a tensor source: torch.jit traces it
    counts = picked.sum(dim=1)
    width = int(counts.max())
    rank = torch.arange(n, device=device).expand(B, n)
    columns = torch.where(picked, rank, rank + n).argsort(dim=1)[:, :width]  # picked sorted positions first
    positions = order.gather(1, columns)
    slot_valid = torch.arange(width, device=device) < counts[:, None]
    positions = torch.where(slot_valid, positions, positions[:, :1])
    return positions, counts, slot_valid


def key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, N) additive attention bias: 0 for real tokens, -inf for padding."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
    return bias[:, None, None, :]


def _project(attn: nn.Module, x: torch.Tensor, which: int) -> torch.Tensor:
    """q (0), k (1) or v (2) of x (B, n, D) as (B, H, n, d), from the rows of the fused qkv."""
    rows = slice(which * attn.attn_dim, (which + 1) * attn.attn_dim)
    bias = None if attn.qkv.bias is None else attn.qkv.bias[rows]
    B, n, _ = x.shape
    return F.linear(x, attn.qkv.weight[rows], bias).reshape(B, n, attn.num_heads, attn.head_dim).transpose(1, 2)


@register
class ATS(Method):
    name = "ats"
    aliases = ("adaptive-token-sampling",)
    summary = "adaptive token sampling: inverse-transform sampling of CLS attention x value norm; per-image counts"
    needs_cls = True
    count_rule = "adaptive"  # at most K = int(N0 * r) samples per ATS block, duplicates removed
    adaptive = True
    options = {
        "samples": Option(None, int, "inverse-transform samples K per ATS block (the official N0); "
                          "default int(N0 * keep_ratio), none at keep ratio 1"),
    }
    layer_presets = {"official": _layers}

    @classmethod
    def refusal(cls, geometry) -> str | None:
        if geometry.pool != "token":
            return (f"the token count differs per image, so the head must read the CLS token only, but this "
                    f"model pools {geometry.pool or 'every token'!r}; valid: a model with global_pool='token'")
        return None

    def __init__(self, geometry, keep_ratio, layers, options):
        super().__init__(geometry, keep_ratio, layers, options)
        samples = options["samples"]
        if samples is not None and samples < 1:
            raise MethodError(f"option samples={samples} is not valid; valid: an integer >= 1")
        self.samples = samples if samples is not None else max(1, int(geometry.num_patches * keep_ratio))
        self.active = bool(layers) and (samples is not None or keep_ratio < 1.0)
        if not self.active:
            self.adaptive = False  # the stock model: the same counts for every image

    # --- counts and cost -----------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Upper bounds: an ATS block keeps at most min(K, its image tokens)."""
        g = self.geometry
        n, blocks = g.num_tokens, []
        for i in range(g.depth):
            if self.active and i in self.layers:
                out = g.num_prefix + min(self.samples, n - g.num_prefix)
                blocks.append(BlockTokens(n, out, out, out, "sample", n_kv=n))
                n = out
            else:
                blocks.append(BlockTokens(n, n, n, n))
        return Schedule(tuple(blocks))

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """The stock block on the n kept tokens plus what the rest still costs (docs/methods.md#method-overheads):
        k and v of the N - n others (2 (N - n) D Da), the CLS row q0 K^T for the scores (N Da) and the kept
        queries against the other keys (2 n (N - n) Da)."""
        g = self.geometry
        plain = standard_block_macs(g, tokens.n_attn, tokens.n_mlp)
        if tokens.action != "sample":
            return plain
        N, n = tokens.n_in, tokens.n_attn
        return plain + 2 * (N - n) * g.dim * g.attn_dim + N * g.attn_dim + 2 * n * (N - n) * g.attn_dim

    def image_schedules(self) -> list[Schedule] | None:
        """One schedule per image of the last traced (or training) forward: each ATS block's input and
        output counts as recorded ("tokens_in", "tokens_out")."""
        if not self.active:
            return None
        tokens_in, tokens_out = self.aux.get("tokens_in", {}), self.aux.get("tokens_out", {})
        if set(tokens_out) != set(self.layers):
            raise MethodError("ats: no per-image counts recorded; run a forward with "
                              "model.token_reduction.state.trace = True first")
        g = self.geometry
        ins = {i: tokens_in[i].tolist() for i in self.layers}
        outs = {i: tokens_out[i].tolist() for i in self.layers}
        schedules = []
        for b in range(len(outs[self.layers[0]])):
            n, blocks = g.num_tokens, []
            for i in range(g.depth):
                if i in outs:
                    blocks.append(BlockTokens(ins[i][b], outs[i][b], outs[i][b], outs[i][b], "sample", n_kv=ins[i][b]))
                    n = outs[i][b]
                else:
                    blocks.append(BlockTokens(n, n, n, n))
            schedules.append(Schedule(tuple(blocks)))
        return schedules

    def describe(self) -> dict:
        return dict(super().describe(), samples=self.samples)

    # --- patching ------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> None:
        if not self.active:
            return
        blocks = self.geometry.blocks_of(model)
        # Every block after the first ATS block may see a padded batch: the others mask the padding too.
        for i in range(self.layers[0], self.geometry.depth):
            swap_class(blocks[i], ATSBlock if i in self.layers else PaddedBlock)
            blocks[i].token_reduction = self
            blocks[i].token_reduction_index = i

    # --- the sampling itself, called by the ATS blocks --------------------------------------------
    def record(self, index: int, valid: torch.Tensor | None, num_in: int, selected: torch.Tensor,
               counts: torch.Tensor, slot_valid: torch.Tensor, training: bool) -> None:
        """Aux "tokens_in"/"tokens_out" (per image), "kept" and "patch_state" (per original patch)."""
        state = self.state
        if not (state.trace or training):
            return
        g, carry = self.geometry, state.carry
        B, device = selected.shape[0], selected.device
        prefix = g.num_prefix
        num = valid.sum(dim=1) if valid is not None else torch.full((B,), num_in, device=device)
        state.record("tokens_in", index, num.long(), training)
        state.record("tokens_out", index, (counts + prefix).long(), training)
        positions = carry.get("positions")  # original patch of every current image token, -1 for padding
        if positions is None:
            positions = torch.arange(g.num_patches, device=device).expand(B, -1)
        positions = torch.where(slot_valid, positions.gather(1, selected - prefix), -1)
        carry["positions"] = positions
        present = torch.zeros(B, g.num_patches + 1, dtype=torch.bool, device=device).scatter(
            1, torch.where(positions >= 0, positions, g.num_patches),
            torch.ones_like(positions, dtype=torch.bool))[:, :g.num_patches]
        state.record("patch_state", index, torch.where(present, KEPT, DROPPED).to(torch.int8), training)
        prefix_idx = torch.arange(prefix, device=device).expand(B, -1)
        state.record("kept", index, torch.cat([prefix_idx, selected], dim=1), training)


class ATSBlock:
    """Mixin over timm `Block`: score, sample, and run the block for the sampled queries only."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise MethodError("ATS changes the sequence length; attention masks are not supported")
        method: ATS = self.token_reduction
        index, carry, attn = self.token_reduction_index, method.state.carry, self.attn
        if index == method.layers[0]:
            carry.clear()  # a fresh pass, even when called without the model-level reset
        prefix = method.geometry.num_prefix
        valid = carry.get("valid")  # (B, N) bool once an earlier ATS block padded the batch
        B, N, _ = x.shape
        bias = None if valid is None else key_bias(valid, x.dtype)

        x_norm = self.norm1(x)
        k = attn.k_norm(_project(attn, x_norm, 1))
        v = _project(attn, x_norm, 2)
        q_prefix = attn.q_norm(_project(attn, x_norm[:, :prefix], 0))
        cls_logits = (q_prefix[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        if bias is not None:
            cls_logits = cls_logits + bias
        cls_attention = cls_logits.softmax(dim=-1).sum(dim=1)[:, 0]  # summed over heads: (B, N)
        value_norm = v.transpose(1, 2).reshape(B, N, -1).norm(dim=-1)
        scores = (cls_attention * value_norm)[:, prefix:]
        image_valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid[:, prefix:]
        positions, counts, slot_valid = inverse_transform_sample(scores.detach(), image_valid, method.samples)
        selected = positions + prefix

        keep = torch.cat([torch.arange(prefix, device=x.device).expand(B, -1), selected], dim=1)
        kept_norm = gather_tokens(x_norm, keep)
        q = torch.cat([q_prefix, attn.q_norm(_project(attn, kept_norm[:, prefix:], 0))], dim=2)
        out = output_projection(attn, attend(attn, q, k, v, bias), kept_norm)
        x_out = gather_tokens(x, keep) + self.drop_path1(self.ls1(out))
        x_out = x_out + self.drop_path2(self.ls2(self.mlp(self.norm2(x_out))))
        method.record(index, valid, N, selected, counts, slot_valid, self.training)
        if bool(slot_valid.all()):
            carry.pop("valid", None)
        else:
            carry["valid"] = torch.cat([torch.ones(B, prefix, dtype=torch.bool, device=x.device), slot_valid], dim=1)
        return x_out


class PaddedBlock:
    """Mixin over timm `Block` for the blocks after the first ATS block that do not sample: the stock block,
    with the batch's padding masked out of attention when there is any."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        valid = self.token_reduction.state.carry.get("valid")
        if valid is None or valid.shape[1] != x.shape[1]:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise MethodError("ATS changes the sequence length; attention masks are not supported")
        attn = self.attn
        x_in = self.norm1(x)
        q, k, v = project_qkv(attn, x_in)
        out = output_projection(attn, attend(attn, q, k, v, key_bias(valid, x.dtype)), x_in)
        x = x + self.drop_path1(self.ls1(out))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
