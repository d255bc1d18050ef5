"""PiToMe (Tran et al., NeurIPS 2024, "Accelerating Transformers with Spectrum-Preserving Token Merging";
hchautran/PiToMe): protect isolated tokens by an energy score, merge the high-energy ones by bipartite
matching (docs/methods.md#pitome).

In every reduction block l, after attention and its residual and before the MLP, on the n current image
tokens (prefix tokens are never scored or merged):
1. metric: the keys averaged over heads, L2-normalised; W = metric metric^T (cosine, n x n);
2. energy E_i = mean_j f(W_ij), f(w) = w - m if w >= m else alpha (exp(w - m) - 1) (an ELU shifted by the
   margin m = margin * (1 - l / L), L the depth): tokens in large clusters of similar tokens score high;
3. sort by energy (descending); the 2k highest are mergeable, the rest are protected (kept as they are);
4. the mergeable ones alternate in energy order into A (ranks 0, 2, ...) and B (ranks 1, 3, ...); every A
   token is merged into its most similar B token (cosine W), a size-weighted average; sizes carry on.
The output is [prefix, protected tokens in energy order, B tokens in energy order].

k = min(floor(n - n * ratio), n // 2), `ratio` the paper's fraction of image tokens kept per layer. Without
`ratio`, keep_ratio picks it: the multiple of 0.001 in [0.5, 1] whose final image-token count is closest
to int(N0 * keep_ratio^3) (the final count of the three-stage schedules, as ToMe's r; ties to the larger
ratio; keep_ratio 1 -> ratio 1, no merging).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import attend, output_projection, project_qkv
from .base import BlockTokens, Method, Schedule, patch_from_first_layer
from .registry import register
from .slots import index_mask, pool_slots, record_slots, size_bias, start_block
from .errors import MethodError
from .geometry import standard_block_macs
from .options import Option

_RATIO_GRID = tuple(i / 1000 for i in range(500, 1001))


def merge_count(num_image: int, ratio: float) -> int:
    """Image tokens merged away by a layer of per-layer keep ratio `ratio` (official rounding)."""
    return min(math.floor(num_image - num_image * ratio), num_image // 2)


def final_image_tokens(num_patches: int, num_layers: int, ratio: float) -> int:
    for _ in range(num_layers):
        num_patches -= merge_count(num_patches, ratio)
    return num_patches


def ratio_for_keep_ratio(num_patches: int, num_layers: int, keep_ratio: float) -> float:
    """The per-layer ratio (a multiple of 0.001) whose final count is closest to int(N0 * keep_ratio^3)."""
    target = int(num_patches * keep_ratio ** 3)
    return min(reversed(_RATIO_GRID),
               key=lambda r: abs(final_image_tokens(num_patches, num_layers, r) - target))


class PiToMeBlock:
    """Mixin swapped into a stock timm `Block`: attention (proportional if asked), residual, merge, MLP."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        method, index, size = start_block(self, attn_mask, is_causal, "token merging")
        k = merge_count(x.shape[1] - method.geometry.num_prefix, method.ratio) if index in method.layers else 0
        if k == 0 and (size is None or not method.opts["prop_attn"]):
            return super().forward(x)

        x_in = self.norm1(x)
        q, key, v = project_qkv(self.attn, x_in)
        bias = size_bias(method, size, q.dtype)
        out = output_projection(self.attn, attend(self.attn, q, key, v, bias), x_in)
        x = x + self.drop_path1(self.ls1(out))
        if k > 0:
            x = method.merge(x, key.mean(dim=1), k, index, self.training)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@register
class PiToMe(Method):
    name = "pitome"
    summary = "merge high-energy (redundant) tokens by bipartite matching; protect isolated ones"
    needs_cls = False
    count_rule = "rel_floor"
    options = {
        "ratio": Option(None, float, "fraction of the image tokens kept by each reduction layer "
                                     "(0.5..1); default: derived from keep_ratio"),
        "margin": Option(0.9, float, "energy margin of block 0; block l uses margin * (1 - l / depth)"),
        "alpha": Option(1.0, float, "scale of the exponential branch below the margin"),
        "prop_attn": Option(False, bool, "proportional attention: add log(token size) to the logits"),
    }
    layer_presets = {"all": lambda depth: tuple(range(depth))}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ratio = self.opts["ratio"]
        if ratio is not None and not 0.5 <= ratio <= 1.0:
            raise MethodError(f"option ratio={ratio} is out of range; valid: 0.5 <= ratio <= 1")
        if self.opts["alpha"] <= 0:
            raise MethodError(f"option alpha={self.opts['alpha']} is not positive; valid: alpha > 0")
        self.ratio = ratio if ratio is not None else ratio_for_keep_ratio(
            self.geometry.num_patches, len(self.layers), self.keep_ratio)

    def margin(self, index: int) -> float:
        return self.opts["margin"] * (1 - index / self.geometry.depth)

    # --- schedule and cost --------------------------------------------------------------------
    def schedule(self) -> Schedule:
        prefix, n = self.geometry.num_prefix, self.geometry.num_tokens
        blocks = []
        for i in range(self.geometry.depth):
            k = merge_count(n - prefix, self.ratio) if i in self.layers else 0
            blocks.append(BlockTokens(n, n, n - k, n - k, "merge" if k else ""))
            n -= k
        return Schedule(tuple(blocks))

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """Plus the image tokens' cosine similarities W on the head-mean keys (n^2 d); the matching of A
        against B reads W."""
        macs = standard_block_macs(self.geometry, tokens.n_attn, tokens.n_mlp)
        if tokens.action == "merge":
            macs += (tokens.n_in - self.geometry.num_prefix) ** 2 * self.geometry.head_dim
        return macs

    def describe(self) -> dict:
        return dict(super().describe(), ratio=self.ratio)

    # --- patching -------------------------------------------------------------------------------
    def patch(self, model) -> None:
        patch_from_first_layer(self, model.blocks, PiToMeBlock)

    # --- the reduction itself ------------------------------------------------------------------
    def assign(self, metric: torch.Tensor, k: int, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Output slot of every input token (B, N) and the source mask (A tokens), for `k` merges."""
        prefix = self.geometry.num_prefix
        with torch.no_grad():
            unit = F.normalize(metric[:, prefix:], dim=-1)
            sim = unit @ unit.transpose(-1, -2)  # (B, n, n)
            energy = F.elu(sim - self.margin(index), alpha=self.opts["alpha"]).mean(dim=-1)
            order = energy.sort(dim=-1, descending=True, stable=True).indices
            batch, n = energy.shape
            a, b, protected = order[:, 0:2 * k:2], order[:, 1:2 * k:2], order[:, 2 * k:]
            best_b = sim.gather(1, a.unsqueeze(-1).expand(-1, -1, n)).gather(
                2, b.unsqueeze(1).expand(-1, k, -1)).argmax(dim=-1)  # (B, k) index into b
            num_out = prefix + n - k
            device = metric.device
            slot_img = torch.empty(batch, n, dtype=torch.long, device=device)
            slot_img.scatter_(1, protected, prefix + torch.arange(n - 2 * k, device=device).expand(batch, -1))
            b_slot = prefix + n - 2 * k + torch.arange(k, device=device).expand(batch, -1)
            slot_img.scatter_(1, b, b_slot)
            slot_img.scatter_(1, a, b_slot.gather(1, best_b))
            slot = torch.cat([torch.arange(prefix, device=device).expand(batch, -1), slot_img], dim=1)
            source = index_mask(prefix + a, prefix + n)
        return slot, source, num_out

    def merge(self, x: torch.Tensor, metric: torch.Tensor, k: int, index: int, training: bool) -> torch.Tensor:
        slot, source, num_out = self.assign(metric, k, index)
        carry = self.state.carry
        size = carry.get("size")
        if size is None:
            size = x.new_ones(x.shape[:2])
        x, carry["size"] = pool_slots(x, slot, num_out, size)
        record_slots(self.state, index, slot, source, num_out, self.geometry.num_prefix,
                     self.geometry.num_patches, training)
        return x
