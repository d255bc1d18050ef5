"""Slot reduction: the shared arithmetic of the methods that merge, prune or do both in one block (PiToMe, ToFu,
MCTF, PPT, Zero-TPrune). A reducing block says, for every token of its input, the output slot it goes to (-1:
dropped) and whether it is merged away into a slot that another token represents (a "source"). Every slot has
exactly one representative: a member that is no source."""
from __future__ import annotations

import torch

from .base import DROPPED, FUSED, KEPT, ForwardState
from .errors import MethodError


def index_mask(index: torch.Tensor, size: int, *more: torch.Tensor) -> torch.Tensor:
    """(B, size) bool, True at the positions in `index` (B, k) and in any further index tensors."""
    mask = torch.zeros(index.shape[0], size, dtype=torch.bool, device=index.device)
    for idx in (index, *more):  # a tensor source: torch.jit (fvcore) cannot trace a Python bool here
        mask = mask.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))
    return mask


def pool_slots(x: torch.Tensor, slot: torch.Tensor, num_out: int,
               weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean per output slot, out[s] = sum_{slot_i = s} w_i x_i / sum_{slot_i = s} w_i.

    x (B, N, C), slot (B, N) long in [-1, num_out), weight (B, N) > 0. Returns the pooled tokens
    (B, num_out, C) and the weight of every slot (B, num_out). Dropped tokens land in a spare slot
    that is cut off. Out of place: the inputs are left as they are."""
    batch, _, channels = x.shape
    target = torch.where(slot < 0, num_out, slot)
    total = weight.new_zeros(batch, num_out + 1).scatter_add(1, target, weight)
    pooled = x.new_zeros(batch, num_out + 1, channels).scatter_add(
        1, target.unsqueeze(-1).expand(-1, -1, channels), x * weight.unsqueeze(-1).to(x.dtype))
    return pooled[:, :num_out] / total[:, :num_out, None].to(x.dtype), total[:, :num_out]


def record_slots(state: ForwardState, index: int, slot: torch.Tensor, source: torch.Tensor, num_out: int,
                 num_prefix: int, num_patches: int, training: bool) -> None:
    """Aux outputs of a slot-reducing block (only while tracing or training):
    "kept" (B, num_out): the input position of every output token's representative;
    "patch_group" (B, N0): the output token now holding each original patch, or -1 - p for a patch
      p whose token was dropped (unique, so dropped patches never look like one merged group);
    "patch_state" (B, N0): FUSED once a patch's token was a source, DROPPED once it was dropped.
    The running group and state live in `state.carry` ("slot_group", "slot_state")."""
    if not (state.trace or training):
        return
    carry, (batch, num_tokens), device = state.carry, slot.shape, slot.device
    group = carry.get("slot_group")
    if group is None:
        group = (num_prefix + torch.arange(num_patches, device=device)).expand(batch, -1)
        carry["slot_state"] = torch.full((batch, num_patches), KEPT, dtype=torch.int8, device=device)
    alive = group >= 0
    position = group.clamp_min(0)
    target = slot.gather(1, position)
    dropped = alive & (target < 0)
    fused = alive & source.gather(1, position)
    patch_state = carry["slot_state"].masked_fill(fused, FUSED).masked_fill(dropped, DROPPED)
    gone = -1 - torch.arange(num_patches, device=device).expand(batch, -1)
    group = torch.where(alive & (target >= 0), target, torch.where(alive, gone, group))
    representative = torch.where((slot >= 0) & ~source, slot, num_out)
    kept = torch.zeros(batch, num_out + 1, dtype=torch.long, device=device).scatter(
        1, representative, torch.arange(num_tokens, device=device).expand(batch, -1))[:, :num_out]
    carry.update(slot_group=group, slot_state=patch_state)
    state.record("kept", index, kept, training)
    state.record("patch_group", index, group, training)
    state.record("patch_state", index, patch_state, training)


def start_block(block, attn_mask, is_causal: bool, what: str):
    """What every slot-reducing block does first: refuse attention masks (`what` changes the sequence
    length, so a mask no longer fits) and clear the per-pass carry at the method's first reduction block
    (a fresh pass, even when called without the model-level reset). Returns the method, the block's index
    and the running token sizes (None before any merge)."""
    if attn_mask is not None or is_causal:
        raise MethodError(f"{what} changes the sequence length; attention masks are not supported")
    method, index = block.token_reduction, block.token_reduction_index
    if index == method.layers[0]:
        method.state.carry.clear()
    return method, index, method.state.carry.get("size")


def merge_count(method, index: int, x: torch.Tensor) -> int:
    """Tokens block `index` removes: its scheduled count, at most half the image tokens it holds (bipartite
    matching pairs A with B; `r_schedule` caps the counts the same way)."""
    return min(method.merge_counts.get(index, 0), (x.shape[1] - method.geometry.num_prefix) // 2)


def stock_block_suffices(method, r: int, size: torch.Tensor | None) -> bool:
    """Nothing to remove and no proportional attention: the stock block computes exactly this block."""
    return r == 0 and (size is None or not method.opts["prop_attn"])


def size_bias(method, size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Proportional attention (docs/methods.md#tome-algorithm): log(token size) added to every key column,
    (B, 1, 1, N), when the method's `prop_attn` is on and tokens have been merged."""
    if size is None or not method.opts["prop_attn"]:
        return None
    return size.log().to(dtype)[:, None, None, :]
