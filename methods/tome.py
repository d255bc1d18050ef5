"""ToMe (Bolya et al., ICLR 2023, facebookresearch/ToMe): merge r tokens per block by bipartite soft
matching on the keys (docs/methods.md#tome-algorithm).

In every reduction block, after attention and its residual and before the MLP:
1. metric = keys averaged over heads, L2-normalised;
2. split the WHOLE sequence alternately: A = positions 0, 2, 4, ..., B = 1, 3, 5, ...;
3. every A token picks its most similar B token; the r best-matched A tokens are merged into their
   B token by a size-weighted average (sizes are carried from block to block);
4. prefix tokens (CLS, distillation, registers) are protected: one in A is never a source, one in B
   never a destination, and r is clamped to (N - prefix) // 2.
The output is [prefix tokens in their original order, unmerged A tokens, B tokens]; this is the
official order for CLS and CLS + distillation models. Unmerged A tokens are re-sorted by position
when the model has prefix tokens and stay in match-score order when it has none, as in the
official code. With `prop_attn` (default True) every attention adds log(size) to the key logits
("proportional attention"); on the fused path that is SDPA with a float mask, so baseline and
method run the same kernel family. Unlike the official timm patch, LayerScale (ls1/ls2), q/k norms
and drop_path are honoured, so a DeiT-III at r = 0 is the stock model.

Options: `r` - tokens merged per reduction block: one int for every block, or a tuple of per-block
values for the reduction layers in order (padded with 0 when shorter, as the official list form).
When `r` is not given it comes from keep_ratio: the constant r whose image-token count after the
last reduction block is closest to int(N0 * keep_ratio^3), the final count of the three-stage
IdleViT / DynamicViT schedules (ties go to the smaller r; clamping included; keep_ratio 1 -> r = 0).
For DeiT-S at 224 px (12 blocks) that gives r = 4 / 8 / 11 / 13 / 14 for keep 0.9 / 0.8 / 0.7 /
0.6 / 0.5.
"""
from __future__ import annotations

import math

import torch

from .attention import attend, batch_rows, head_sum, output_projection, project_qkv, take_rows
from .base import FUSED, KEPT, BlockTokens, Method, Schedule, patch_from_first_layer
from .registry import register
from .errors import MethodError
from .geometry import standard_block_macs
from .options import Option
from .slots import merge_count, size_bias, start_block


class MergeCount(Option):
    """The `r` option: None (derive from keep_ratio), an int, or per-layer ints ("8,8,4" or (8, 8, 4))."""

    def coerce(self, name, value):
        if value is None:
            return None
        single = not isinstance(value, (list, tuple))
        try:
            if isinstance(value, str):
                parts = [p for p in value.replace(";", ",").split(",") if p.strip()]
                single = len(parts) == 1 and not any(sep in value for sep in ",;")
                counts = tuple(int(p) for p in parts)
            else:
                counts = tuple(_whole_number(v) for v in ((value,) if single else value))
        except (TypeError, ValueError):
            counts = ()
        if not counts or any(c < 0 for c in counts):
            raise MethodError(f"option {name}={value!r} is not valid; valid: an integer >= 0 or a "
                              "comma-separated list of them (one per reduction layer)")
        return counts[0] if single else counts


def _whole_number(value) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    number = int(value)
    if isinstance(value, float) and value != number:
        raise ValueError(value)
    return number


def _show_r(r) -> str:
    return ",".join(map(str, r)) if isinstance(r, (list, tuple)) else str(r)


def final_image_tokens(num_patches: int, merge_counts) -> int:
    """Image tokens left after merging `merge_counts` tokens in turn, each clamped to half."""
    for r in merge_counts:
        num_patches -= min(r, num_patches // 2)
    return num_patches


def r_for_keep_ratio(num_patches: int, num_layers: int, keep_ratio: float) -> int:
    """The constant r whose final count is closest to int(N0 * keep_ratio^3) (ties: smaller r)."""
    target = int(num_patches * keep_ratio ** 3)
    return min(range(num_patches + 1),
               key=lambda r: (abs(final_image_tokens(num_patches, [r] * num_layers) - target), r))


def r_per_layer(method) -> dict[int, int]:
    """Tokens removed per reduction layer (before clamping) from the option `r` of a ToMe-style method: one
    r for every layer, one per layer (missing ones 0), or, unset, the constant r for the keep ratio."""
    r, layers = method.opts["r"], method.layers
    if r is None:
        r = r_for_keep_ratio(method.geometry.num_patches, len(layers), method.keep_ratio)
    if isinstance(r, int):
        return {i: r for i in layers}
    if len(r) > len(layers):
        raise MethodError(f"option r={','.join(map(str, r))} gives {len(r)} values for "
                          f"{len(layers)} reduction layers; valid: at most one per layer")
    return dict(zip(layers, (*r, *[0] * (len(layers) - len(r)))))


def r_schedule(geometry, removed: dict[int, int], action: str, before_mlp: bool = True) -> Schedule:
    """The token schedule of removing `removed[i]` tokens in block i, at most half the image tokens a
    block holds (bipartite matching pairs A with B); before the MLP (ToMe) or after it (MCTF)."""
    prefix, n = geometry.num_prefix, geometry.num_tokens
    blocks = []
    for i in range(geometry.depth):
        r = min(removed.get(i, 0), (n - prefix) // 2)
        blocks.append(BlockTokens(n, n, n - r if before_mlp else n, n - r, action if r else ""))
        n -= r
    return Schedule(tuple(blocks))


class MergingBlock:
    """Mixin swapped into a stock timm `Block`: proportional attention, residual, merge, MLP."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        method, index, size = start_block(self, attn_mask, is_causal, "token merging")
        x_in = self.norm1(x)
        q, k, v = project_qkv(self.attn, x_in)
        out = output_projection(self.attn, attend(self.attn, q, k, v, size_bias(method, size, q.dtype)), x_in)
        x = x + self.drop_path1(self.ls1(out))
        r = merge_count(method, index, x)
        if r > 0:  # the head sum, not the mean: the metric is L2-normalised, and the sum is cheaper on CPU
            x = method.merge(x, head_sum(k), r, index, self.training)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@register
class ToMe(Method):
    name = "tome"
    summary = "merge r similar tokens per block (bipartite soft matching on the keys)"
    needs_cls = False
    count_rule = "remove_r"
    options = {
        "r": MergeCount(None, int, "tokens merged per reduction block (int or per-layer list); "
                                   "default: derived from keep_ratio"),
        "prop_attn": Option(True, bool, "proportional attention: add log(token size) to the logits"),
    }
    layer_presets = {"all": lambda depth: tuple(range(depth))}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.merge_counts = r_per_layer(self)

    # --- schedule and cost --------------------------------------------------------------------
    def schedule(self) -> Schedule:
        return r_schedule(self.geometry, self.merge_counts, "merge")

    def matching_macs(self, tokens: BlockTokens) -> int:
        """Cosine similarities of A against B on the head-mean keys (width head_dim)."""
        if tokens.n_out == tokens.n_in:
            return 0
        n = tokens.n_in
        return math.ceil(n / 2) * (n // 2) * self.geometry.head_dim

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        return standard_block_macs(self.geometry, tokens.n_attn, tokens.n_mlp) + self.matching_macs(tokens)

    def merge_counts_used(self) -> list[int]:
        """r of each reduction layer after clamping to half the image tokens that reach it."""
        blocks = self.schedule().blocks
        return [blocks[i].n_in - blocks[i].n_out for i in self.layers]

    def describe(self) -> dict:
        asked, used = [self.merge_counts.get(i, 0) for i in self.layers], self.merge_counts_used()
        notes = []
        if self.opts["r"] is not None and used != asked:  # a derived r counts the clamping in already
            notes.append(f"tome r={_show_r(self.opts['r'])} is more than a block can merge (half its image "
                         f"tokens): merged {','.join(map(str, used))} per reduction layer")
        return dict(super().describe(), merge_counts=asked, merge_counts_used=used, notes=notes)

    # --- patching -------------------------------------------------------------------------------
    def patch(self, model) -> None:
        # Every block after the first merge needs proportional attention, reducing or not.
        patch_from_first_layer(self, model.blocks, MergingBlock)

    # --- the reduction itself ------------------------------------------------------------------
    def match(self, metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bipartite soft matching. Returns, as positions in the input sequence,
        kept (B, N - r) in output order, sources (B, r), and each source's output slot (B, r).

        Static shapes and no host synchronisation: r and the prefix are Python ints, every index is
        made on the metric's device, so the matching stays inside one compiled graph."""
        prefix = self.geometry.num_prefix
        protected_a, protected_b = (prefix + 1) // 2, prefix // 2
        with torch.no_grad():
            metric = metric / metric.norm(dim=-1, keepdim=True)
            a, b = metric[:, ::2], metric[:, 1::2]
            scores = a @ b.transpose(-1, -2)
            if protected_b:
                scores[:, :, :protected_b] = -math.inf  # a protected B token is never a destination
            best, best_b = scores.max(dim=-1)
            if protected_a:  # on the row maxima, not the (A, B) scores: a protected A token is never a source
                best[:, :protected_a] = -math.inf
            order = best.argsort(dim=-1, descending=True)
            src_a, unmerged_a = order[:, :r], order[:, r:]
            if prefix:
                unmerged_a = unmerged_a.sort(dim=1).values  # protected A rows (lowest) come first
            dst_b = best_b.gather(1, src_a)

            batch, num_b = metric.shape[0], b.shape[1]
            device = metric.device
            unmerged_a = unmerged_a[:, protected_a:]
            image_b = torch.arange(protected_b, num_b, device=device).expand(batch, -1)
            kept = torch.cat([torch.arange(prefix, device=device).expand(batch, -1),
                              2 * unmerged_a, 2 * image_b + 1], dim=1)
            first_image_b_slot = prefix + unmerged_a.shape[1]
            dst_slot = torch.where(dst_b < protected_b, 2 * dst_b + 1,
                                   first_image_b_slot + dst_b - protected_b)
        return kept, 2 * src_a, dst_slot

    def merge(self, x: torch.Tensor, metric: torch.Tensor, r: int, index: int, training: bool) -> torch.Tensor:
        """Size-weighted average of every source into its destination; sizes are updated in carry.

        Written as x_dst + Σ_src s_src (x_src - x_dst) / s_new, which equals
        (s_dst x_dst + Σ s_src x_src) / s_new but touches only the r sources and their destinations:
        unmerged tokens are copied bit for bit instead of being multiplied and divided by their size."""
        kept, src, dst_slot = self.match(metric, r)
        carry = self.state.carry
        batch, num_tokens, _ = x.shape
        num_out = num_tokens - r
        size = carry.get("size")
        if size is None:
            size = x.new_ones(batch, num_tokens)
        src_size = size.gather(1, src)
        new_size = size.gather(1, kept).scatter_add(1, dst_slot, src_size)
        dst_rows = batch_rows(dst_slot, num_out)
        merged = take_rows(x, batch_rows(kept, num_tokens), num_out)  # a new tensor: ours to write into
        sources = take_rows(x, batch_rows(src, num_tokens), r)
        share = (src_size / new_size.gather(1, dst_slot)).unsqueeze(-1).to(x.dtype)
        update = (sources - take_rows(merged, dst_rows, r)) * share
        merged.view(-1, x.shape[-1]).index_add_(0, dst_rows, update.reshape(-1, x.shape[-1]))
        carry["size"] = new_size
        if self.state.trace or training:
            self._record(kept, src, dst_slot, num_tokens, index, training)
        return merged

    def _record(self, kept, src, dst_slot, num_tokens: int, index: int, training: bool) -> None:
        """Aux "kept", "patch_group" and "patch_state" (FUSED once a patch's token was a source)."""
        carry, (batch, num_out), device = self.state.carry, kept.shape, kept.device
        num_patches = self.geometry.num_patches
        group = carry.get("group")
        if group is None:
            group = (self.geometry.num_prefix + torch.arange(num_patches, device=device)).expand(batch, -1)
            carry["patch_state"] = torch.full((batch, num_patches), KEPT, dtype=torch.int8, device=device)
        new_index = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        new_index.scatter_(1, kept, torch.arange(num_out, device=device).expand(batch, -1))
        new_index.scatter_(1, src, dst_slot)
        was_source = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device).scatter(1, src, True)
        patch_state = carry["patch_state"].masked_fill(was_source.gather(1, group), FUSED)
        group = new_index.gather(1, group)
        carry.update(group=group, patch_state=patch_state)
        self.state.record("kept", index, kept, training)
        self.state.record("patch_group", index, group, training)
        self.state.record("patch_state", index, patch_state, training)
