"""IdleViT: token idling (docs/methods.md#idlevit).

In every idle layer the CLS query scores all image tokens; the top K take part in the block
(attention among themselves only, then the MLP) and are written back to their positions; the rest
are "idle": they skip the block untouched and are scored again by the next idle layer, so nothing
is dropped.

- Eval path (the official `test=True` path): gathers the selected tokens, so the block really runs
  on prefix + K tokens. As in the official code, K is projected for all N tokens to score them and
  q, v only for the selected ones; `cheap_score=True` scores with u = W_k^T q0 instead (docs/methods.md#idlevit-cheap-scoring).
- Training path (the official mask path): full attention with -1e5 on idle key columns and masked
  residuals; it records the raw logits for `token_cut_loss`.

K per idle layer is int(N0 * r^stage) (absolute, floored; N0 = image tokens at the input), with
stages of `layers_per_stage` consecutive idle layers (default ceil(len(layers) / 3): r, r^2, r^3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend, attention_logits, output_projection, project_qkv
from .base import (
    IDLE, KEPT, BlockTokens, CanonicalConfig, ForwardState, Method, Schedule, abs_floor, gather_tokens,
    register, stagewise_ratios, swap_class,
)
from .errors import MethodError
from .options import Option

# The official additive mask on idle key columns; exp(-1e5) is exactly 0 in fp32, so selected
# queries see exactly the selected keys, as in the gather path.
IDLE_KEY_BIAS = -1e5
NUM_STAGES = 3  # r, r^2, r^3 in both official configurations


def _infer_layers(depth: int) -> range:
    """infer.py (released checkpoints): the last 3/4 of the blocks, 3..11 for depth 12."""
    return range(depth // 4, depth)


def _main_layers(depth: int) -> range:
    """main.py (training and its speed test): the last 2/3 of the blocks, 4..11 for depth 12.

    Officially 8 layers index a 9-entry ratio list r,r,r,r^2,r^2,r^2,r^3,r^3,r^3, i.e. stages of 3,
    which ceil(8 / 3) reproduces."""
    return range(depth // 3, depth)


def stage_length(layers_per_stage: int | None, num_layers: int) -> int:
    """Idle layers per keep-ratio stage: as given, or ceil(num_layers / 3) (three stages)."""
    if layers_per_stage is None:
        return max(1, math.ceil(num_layers / NUM_STAGES))
    if layers_per_stage < 1:
        raise MethodError(f"option layers_per_stage={layers_per_stage} is not valid; valid: an integer >= 1")
    return layers_per_stage


@dataclass(frozen=True)
class IdleLayer:
    """What one idle block needs at forward time."""

    index: int  # block index, the key of its aux outputs
    keep: int  # K: image tokens selected in this block
    num_prefix: int  # CLS (+ dist, registers): always selected, never scored
    cheap_score: bool
    state: ForwardState  # the method's per-forward scratch, shared by all its blocks


@register
class IdleViT(Method):
    name = "idle"
    aliases = ("idlevit",)
    summary = "IdleViT: top-K tokens by CLS logits run each idle block, the rest pass through and can return"
    needs_cls = True
    count_rule = "abs_floor"
    options = {
        "preset": Option("infer", str, "default idle layers: infer (infer.py: depth//4..depth-1) or "
                         "main (main.py: depth//3..depth-1)", choices=("infer", "main")),
        "layers_per_stage": Option(None, int, "idle layers per keep-ratio stage (r, r^2, ...); "
                                   "default ceil(len(layers) / 3)"),
        "cheap_score": Option(False, bool, "score with u = W_k^T q0 (O(N*D) instead of projecting K "
                              "for all N tokens); same ranking up to rounding; not with k_norm"),
    }
    layer_presets = {"infer": _infer_layers, "main": _main_layers}

    @classmethod
    def resolve_layers(cls, depth: int, options: dict) -> tuple[int, ...]:
        return cls.default_layers(depth, options["preset"])

    @classmethod
    def canonical_config(cls, depth, layers, options) -> CanonicalConfig:
        """`preset` only picks the default layers, so the canonical form names the layers by the first
        preset that yields them (no option for the default `infer`) and drops the preset when the
        layers are explicit; `layers_per_stage` equal to its default ceil(len(layers) / 3) is dropped."""
        explicit, opts = super().canonical_config(depth, layers, options)
        default_preset = next(iter(cls.layer_presets))
        preset = opts.pop("preset", default_preset)
        chosen = cls.default_layers(depth, preset) if explicit is None else explicit
        if opts.get("layers_per_stage") is not None:
            if stage_length(opts["layers_per_stage"], len(chosen)) == stage_length(None, len(chosen)):
                del opts["layers_per_stage"]
        for name in cls.layer_presets:
            if chosen == cls.default_layers(depth, name):
                return CanonicalConfig(None, opts if name == default_preset else dict(opts, preset=name))
        return CanonicalConfig(chosen, opts)

    def __init__(self, geometry, keep_ratio, layers, options):
        super().__init__(geometry, keep_ratio, layers, options)
        self.layers_per_stage = per_stage = stage_length(options.get("layers_per_stage"), len(layers))
        ratios = stagewise_ratios(keep_ratio, layers, per_stage)
        self.keep_per_layer = {i: abs_floor(geometry.num_patches, r) for i, r in zip(layers, ratios)}

    def schedule(self) -> Schedule:
        g = self.geometry
        n = g.num_tokens
        blocks = []
        for i in range(g.depth):
            selected = g.num_prefix + self.keep_per_layer.get(i, g.num_patches)
            if selected < n:  # a layer selecting every token runs the stock block (no scoring)
                blocks.append(BlockTokens(n, selected, selected, n, "idle"))
            else:
                blocks.append(BlockTokens(n, n, n, n))
        return Schedule(tuple(blocks))

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """A stock block on the n selected tokens plus the scoring overhead (docs/methods.md#method-overheads).

        Official path: q0 (D^2), K for the other N - n tokens ((N - n) D^2) and the CLS logits
        q0.k_j (N D), i.e. N D^2 + D^2 + N D + 11 n D^2 + 2 n^2 D per DeiT idle block; the reference table
        includes the N D term that its formula line leaves out. cheap_score: q0 and u = W_k^T q0
        (2 D^2) and x_j.u (N D), then q, k, v for the selected as in a stock block."""
        g = self.geometry
        stock = super().block_macs(index, tokens)
        if tokens.action != "idle":
            return stock
        N, n = tokens.n_in, tokens.n_attn
        if self.opts["cheap_score"]:
            return stock + 2 * g.dim * g.attn_dim + N * g.dim
        return stock + g.dim * g.attn_dim + (N - n) * g.dim * g.attn_dim + N * g.attn_dim

    def patch_block(self, block: nn.Module, index: int) -> None:
        attn = block.attn
        if self.opts["cheap_score"] and not isinstance(attn.k_norm, nn.Identity):
            raise MethodError("option cheap_score=True is not exact with k_norm (qk_norm models); "
                              "valid: cheap_score=False for this model")
        block.idle_layer = IdleLayer(index, self.keep_per_layer[index], self.geometry.num_prefix,
                                     self.opts["cheap_score"], self.state)
        swap_class(block, IdleBlock)

    def describe(self) -> dict:
        out = super().describe()
        out.update(layers_per_stage=self.layers_per_stage,
                   keep_per_layer={str(i): k for i, k in self.keep_per_layer.items()})
        return out


# ---------------------------------------------------------------------------------------------
# Selection


def select_tokens(scores: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """Positions (B, num_prefix + keep) of the tokens that run the block: the prefix first, then the
    top `keep` image tokens by score, best first (the official descending argsort).

    scores: (B, N) over the whole sequence; the prefix entries are ignored."""
    B = scores.shape[0]
    top = scores[:, num_prefix:].topk(keep, dim=1, sorted=True).indices + num_prefix
    prefix = torch.arange(num_prefix, device=scores.device).expand(B, num_prefix)
    return torch.cat([prefix, top], dim=1)


def _split_qkv_weights(attn: nn.Module, which: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of the fused qkv projection for q (0), k (1) or v (2)."""
    rows = slice(which * attn.attn_dim, (which + 1) * attn.attn_dim)
    bias = attn.qkv.bias
    return attn.qkv.weight[rows], None if bias is None else bias[rows]


def _project(attn: nn.Module, x: torch.Tensor, which: int) -> torch.Tensor:
    """q, k or v of x (B, n, D) as (B, H, n, d), without the q/k norm."""
    B, n, _ = x.shape
    out = F.linear(x, *_split_qkv_weights(attn, which))
    return out.reshape(B, n, attn.num_heads, attn.head_dim).transpose(1, 2)


def _record_selection(layer: IdleLayer, idx: torch.Tensor, num_tokens: int, training: bool) -> None:
    state = layer.state
    if not (state.trace or training):
        return
    B = idx.shape[0]
    num_patches = num_tokens - layer.num_prefix
    patch_state = torch.full((B, num_patches), IDLE, dtype=torch.int8, device=idx.device)
    patch_state.scatter_(1, idx[:, layer.num_prefix:] - layer.num_prefix, KEPT)
    state.record("patch_state", layer.index, patch_state, training)
    state.record("kept", layer.index, idx, training)


# ---------------------------------------------------------------------------------------------
# The patched block


class IdleBlock:
    """Mixin over timm `Block`: the idle-layer forward (eval: gather; training: masks)."""

    idle_layer: IdleLayer

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise MethodError("IdleViT blocks choose their own attention set; attn_mask/is_causal "
                              "are not supported")
        if self.training:
            return self._masked_forward(x)
        layer = self.idle_layer
        if layer.keep == x.shape[1] - layer.num_prefix:
            # Every token is selected: the stock block gives the unpatched output bit for bit,
            # which the gather path (reordered tokens, split projections) only reaches to ~1e-7.
            idx = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            _record_selection(layer, idx, x.shape[1], False)
            return super().forward(x)
        return self._gather_forward(x)

    def _scores(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLS scores (B, N) and, unless cheap_score, keys of all tokens (B, H, N, d)."""
        attn = self.attn
        q_cls = attn.q_norm(_project(attn, x_norm[:, :1], 0))  # (B, H, 1, d)
        if self.idle_layer.cheap_score:
            # sum_h q0_h . (W_k x_j + b_k)_h = x_j . (W_k^T q0) + const: same order as the logits.
            weight, _ = _split_qkv_weights(attn, 1)
            u = q_cls.transpose(1, 2).flatten(1) @ weight  # (B, D)
            return (x_norm @ u.unsqueeze(-1)).squeeze(-1), None
        k_all = attn.k_norm(_project(attn, x_norm, 1))
        # Head mean of the unscaled pre-softmax logits, as official (scale does not change the order).
        return (q_cls @ k_all.transpose(-2, -1)).mean(1).squeeze(1), k_all

    def _gather_forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, attn = self.idle_layer, self.attn
        x_norm = self.norm1(x)  # per-token, so norm1 of the selected = selected of norm1
        scores, k_all = self._scores(x_norm)
        idx = select_tokens(scores, layer.keep, layer.num_prefix)
        _record_selection(layer, idx, x.shape[1], False)

        selected, selected_norm = gather_tokens(x, idx), gather_tokens(x_norm, idx)
        q = attn.q_norm(_project(attn, selected_norm, 0))
        if k_all is None:
            k = attn.k_norm(_project(attn, selected_norm, 1))
        else:
            k = k_all.gather(2, idx[:, None, :, None].expand(-1, k_all.shape[1], -1, k_all.shape[3]))
        v = _project(attn, selected_norm, 2)
        out = output_projection(attn, attend(attn, q, k, v), selected_norm)
        selected = selected + self.drop_path1(self.ls1(out))
        selected = selected + self.drop_path2(self.ls2(self.mlp(self.norm2(selected))))

        # Write back out of place: `x` belongs to the caller (a forward hook or forward_intermediates
        # may hold it as the previous block's output). One copy of x, as a stock block's residual add
        # allocates anyway; idle tokens are copied bit for bit.
        return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), selected)

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official training path: every token is projected and attends, but idle keys are
        masked with -1e5 for every query and idle tokens' residual updates are zeroed."""
        layer, attn = self.idle_layer, self.attn
        x_norm = self.norm1(x)
        q, k, v = project_qkv(attn, x_norm)
        logits = attention_logits(attn, q, k)  # (B, H, N, N), scaled, unmasked
        idx = select_tokens(logits[:, :, 0].mean(1), layer.keep, layer.num_prefix)
        mask = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device).scatter_(1, idx, 1.0)
        layer.state.record("idle_mask", layer.index, mask, True)
        layer.state.record("attn_logits", layer.index, logits, True)
        _record_selection(layer, idx, x.shape[1], True)

        bias = (1.0 - mask)[:, None, None, :] * IDLE_KEY_BIAS
        probs = attn.attn_drop((logits + bias).softmax(dim=-1))
        out = (probs @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], attn.attn_dim)
        out = output_projection(attn, out, x_norm)
        keep = mask.unsqueeze(-1)
        x = x + self.drop_path1(self.ls1(out)) * keep
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) * keep


# ---------------------------------------------------------------------------------------------
# Token cut loss (docs/methods.md#idlevit-token-cut-loss)


def bug_compat_layers(num_layers: int) -> list[int]:
    """Positions of the idle layers the official loss actually uses: it deletes list entries while
    enumerating the same list, so it visits every other entry (0, 2, 4, 6 of 8). Simulated, not
    derived, so any length behaves as the official loop does."""
    remaining, used = list(range(num_layers)), []
    i = 0
    while i < len(remaining):
        used.append(remaining[i])
        if i < len(remaining) - 1:
            del remaining[i]
        i += 1
    return used


def _layer_cut_loss(mask: torch.Tensor, logits: torch.Tensor, kind: str, num_prefix: int) -> torch.Tensor:
    """One idle layer: mask (B, N) with 1 = selected, logits (B, H, N, N) raw and unmasked."""
    weights = logits.mean(1).softmax(dim=-1)  # W: (B, N, N), rows = queries
    row, col = mask.unsqueeze(2), mask.unsqueeze(1)
    loss = logits.new_zeros(())
    if kind in ("both", "inter"):
        diffcut = (row - col).abs()
        diffcut[:, :, :num_prefix] = 0.0  # attending to CLS is never penalised
        inter = (diffcut * weights).sum(-1)
        loss = loss + F.mse_loss(inter, torch.zeros_like(inter))
    if kind in ("both", "intra"):
        intra = (row * col * weights).sum(-1)
        loss = loss + F.mse_loss(intra, mask)
    return loss


CUT_LOSS_KINDS = ("both", "intra", "inter", "none")


def token_cut_loss(aux: dict, num_idle_layers: int, kind: str = "both", bug_compat: bool = False,
                   num_prefix: int = 1) -> torch.Tensor:
    """The IdleViT token cut loss from a training forward's aux outputs, summed over idle layers and
    divided by `num_idle_layers` (the caller multiplies by the cut weight, officially 20).

    aux: `model.token_reduction.aux` ("idle_mask" and "attn_logits" per block).
    bug_compat: reproduce the official list-mutation bug (only idle layers 0, 2, 4, ... count; the
    sum is still divided by all of them).
    num_prefix: leading columns exempt from the inter term (the official code exempts CLS only)."""
    if kind not in CUT_LOSS_KINDS:
        raise MethodError(f"cut loss kind {kind!r} is not valid; valid: {', '.join(CUT_LOSS_KINDS)}")
    masks, logits = aux.get("idle_mask", {}), aux.get("attn_logits", {})
    blocks = sorted(masks)
    if not blocks:
        raise MethodError("no IdleViT training outputs in aux; run a forward in training mode first")
    if num_idle_layers < 1:
        raise MethodError(f"num_idle_layers={num_idle_layers} is not valid; valid: an integer >= 1")
    if bug_compat:
        blocks = [blocks[i] for i in bug_compat_layers(len(blocks))]
    total = logits[blocks[0]].new_zeros(())
    if kind == "none":
        return total
    for b in blocks:
        total = total + _layer_cut_loss(masks[b], logits[b], kind, num_prefix)
    return total / num_idle_layers
