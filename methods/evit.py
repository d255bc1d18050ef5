"""EViT (Liang et al., ICLR 2022, youweiliang/evit): keep the image tokens the CLS token attends to
most, fuse the rest into one token (docs/methods.md#evit).

At each reduction block, after attention and its residual and before the MLP:

    a_j  = head-mean of the CLS row of the softmax attention, over image tokens j
    left = ceil(keep_ratio * current image tokens)     (a fused token from an earlier stage counts)
    x    = [prefix, top-`left` image tokens by a_j in descending-score order, (Σ_dropped a_j x_j)]

and the MLP runs on the reduced set. The fused token is the unnormalised attention-weighted sum of
the dropped tokens, appended last. If `left` equals the current count the block is left as it is.

`TokenPruning` is the shared machinery of EViT, Top-K (EViT without fusion, optional logit scores)
and random keep-K: a subclass only says how tokens are scored (`token_scores`) and whether the rest
is fused (`fuses`).

Deviation from the official code, on purpose: ALL prefix tokens (CLS, distillation, registers) are
kept and never scored. Official EViT treats a DeiT distillation token as an image token that can be
dropped (youweiliang/evit#15); it only ships non-distilled DeiT models, so no published number
depends on it. Another small one: the scores are the pre-dropout probabilities (the official code
reads them after `attn_drop`, which is 0 for every DeiT model).
"""
from __future__ import annotations

import torch

from .attention import attend, batch_rows, cls_attention_probs, output_projection, project_qkv, take_rows
from .base import DROPPED, FUSED, KEPT, BlockTokens, Method, Schedule, quarter_layers, rel_ceil, swap_class
from .registry import register
from .errors import MethodError
from .geometry import standard_block_macs
from .options import Option


class PruningBlock:
    """Mixin swapped into a stock timm `Block`: attention, residual, keep the top tokens, MLP."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise MethodError("token pruning changes the sequence length; attention masks are not supported")
        method, index = self.token_reduction, self.token_reduction_index
        if index == method.layers[0]:
            method.state.carry.clear()  # a fresh pass, even when called without the model-level reset
        num_image = x.shape[1] - method.geometry.num_prefix
        left = rel_ceil(num_image, method.keep_ratio)
        if left >= num_image:
            return super().forward(x)

        x_in = self.norm1(x)
        q, k, v = project_qkv(self.attn, x_in)
        out = output_projection(self.attn, attend(self.attn, q, k, v), x_in)
        x = x + self.drop_path1(self.ls1(out))
        scores = method.token_scores(self.attn, q, k, index)
        x = method.keep_top(x, scores, left, index, self.training)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TokenPruning(Method):
    """Score the image tokens, keep the top ceil(keep_ratio * n), drop or fuse the rest."""

    count_rule = "rel_ceil"
    layer_presets = {"quarters": quarter_layers}
    live_keep_ratio = True  # every block computes ceil(keep_ratio * n) at forward time: a warm-up may move it

    @property
    def fuses(self) -> bool:
        return False

    def token_scores(self, attn, q: torch.Tensor, k: torch.Tensor, index: int) -> torch.Tensor:
        """(B, n_image) scores of the current image tokens; higher is kept first."""
        raise NotImplementedError

    # --- schedule and cost --------------------------------------------------------------------
    def schedule(self) -> Schedule:
        prefix, num_image = self.geometry.num_prefix, self.geometry.num_patches
        blocks = []
        for i in range(self.geometry.depth):
            n_in = prefix + num_image
            left = rel_ceil(num_image, self.keep_ratio) if i in self.layers else num_image
            if left < num_image:
                num_image = left + int(self.fuses)
                n_out = prefix + num_image
                blocks.append(BlockTokens(n_in, n_in, n_out, n_out, "fuse" if self.fuses else "prune"))
            else:
                blocks.append(BlockTokens(n_in, n_in, n_in, n_in))
        return Schedule(tuple(blocks))

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """The stock block on its tokens plus, at a reducing block, the method's own matrix products:
        the CLS query's attention row q0 K^T over the n_in tokens (recomputed beside the fused
        attention, docs/methods.md#attention-kernels; methods scored by CLS attention only) and, when fusing, the
        fused token's mat-vec over the current image tokens. Both are counted (docs/methods.md#method-overheads); the overhead-free count leaves them out."""
        g = self.geometry
        macs = standard_block_macs(g, tokens.n_attn, tokens.n_mlp)
        if tokens.action in ("prune", "fuse"):
            if self.needs_cls:
                macs += tokens.n_in * g.attn_dim
            if self.fuses:
                macs += (tokens.n_in - g.num_prefix) * g.dim
        return macs

    # --- patching -------------------------------------------------------------------------------
    def patch_block(self, block, index: int) -> None:
        swap_class(block, PruningBlock)
        block.token_reduction = self
        block.token_reduction_index = index

    # --- the reduction itself ------------------------------------------------------------------
    def keep_top(self, x: torch.Tensor, scores: torch.Tensor, left: int, index: int,
                 training: bool) -> torch.Tensor:
        """x (B, N, C) -> prefix + the `left` best-scored image tokens (descending) [+ fused token]."""
        prefix = self.geometry.num_prefix
        batch, num_tokens, _ = x.shape
        kept_image = scores.topk(left, dim=1, largest=True, sorted=True).indices  # no full sort
        prefix_idx = torch.arange(prefix, device=x.device).expand(batch, -1)
        kept = torch.cat([prefix_idx, kept_image + prefix], dim=1)
        reduced = take_rows(x, batch_rows(kept, num_tokens), kept.shape[1])  # one index, row copies
        if self.fuses:
            # Σ over dropped tokens of a_j x_j as one batched mat-vec: zero the kept tokens' weights.
            weights = scores.scatter(1, kept_image, 0.0).unsqueeze(1)
            fused = weights.to(x.dtype) @ x[:, prefix:]
            reduced = torch.cat([reduced, fused], dim=1)
        if self.state.trace or training:
            self._record(kept, kept_image, scores.shape[1], index, training)
        return reduced

    def _record(self, kept: torch.Tensor, kept_image: torch.Tensor, num_image: int, index: int,
                training: bool) -> None:
        """Aux "kept" and "patch_state"; the original patch behind every current image token is
        carried in `state.carry["positions"]` (-1 for a fused token)."""
        carry, batch, device = self.state.carry, kept.shape[0], kept.device
        num_patches = self.geometry.num_patches
        positions = carry.get("positions")
        if positions is None or positions.shape[1] != num_image:
            positions = torch.arange(num_patches, device=device).expand(batch, -1)
            carry["patch_state"] = torch.full((batch, num_patches), KEPT, dtype=torch.int8, device=device)
        kept_mask = torch.zeros(batch, num_image, dtype=torch.bool, device=device).scatter(1, kept_image, True)
        # Newly dropped patches change state; kept tokens and the fused token write to a spare column
        # (how many real patches are dropped differs per sample once a fused token exists).
        spare = num_patches
        target = torch.where(~kept_mask & (positions >= 0), positions, spare)
        patch_state = torch.cat([carry["patch_state"], carry["patch_state"][:, :1]], dim=1)
        patch_state = patch_state.scatter(1, target, FUSED if self.fuses else DROPPED)[:, :num_patches]
        positions = positions.gather(1, kept_image)
        if self.fuses:
            positions = torch.cat([positions, positions.new_full((batch, 1), -1)], dim=1)
        carry.update(positions=positions, patch_state=patch_state)
        self.state.record("kept", index, kept, training)
        self.state.record("patch_state", index, patch_state, training)


@register
class EViT(TokenPruning):
    name = "evit"
    summary = "keep the tokens the CLS token attends to most; fuse the rest into one token"
    needs_cls = True
    options = {"fuse": Option(True, bool, "append the attention-weighted sum of the dropped tokens")}

    @property
    def fuses(self) -> bool:
        return bool(self.opts["fuse"])

    def token_scores(self, attn, q, k, index):
        prefix = self.geometry.num_prefix
        return cls_attention_probs(attn, q[:, :, :1], k).mean(dim=1)[:, prefix:]
