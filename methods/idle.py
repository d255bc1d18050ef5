"""IdleViT: token idling (docs/methods.md#idlevit).

In every idle layer the CLS query scores all image tokens; the top K take part in the block
(attention among themselves only, then the MLP) and are written back to their positions; the rest
are "idle": they skip the block untouched and are scored again by the next idle layer, so nothing
is dropped.

- Eval path: gathers the selected tokens, so the block really runs on prefix + K tokens. Scoring
  (`cheap_score`, docs/methods.md#idlevit-cheap-scoring): by default x_j . (W_k^T q0), the official
  logits up to a per-sample constant, so q, k, v are projected for the selected tokens only, in one
  GEMM like the stock block; where that is not exact (k_norm) or with `cheap_score=False`, the official
  `test=True` path: K for all N tokens to score them, q and v for the selected ones.
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

from .attention import (
    attend, attention_logits, batch_rows, output_projection, project_qkv, replace_rows, take_rows,
)
from .base import (
    IDLE, KEPT, BlockTokens, CanonicalConfig, ForwardState, Method, Schedule, abs_floor, stagewise_ratios,
    swap_class,
)
from .registry import register
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


def preset_canonical_config(cls, depth: int, explicit, opts: dict) -> CanonicalConfig:
    """The canonical form of a method whose `preset` only picks default layers (IdleViT on ViTs and on
    Swin): the layers named by the first preset that yields them, the preset dropped when the layers are
    explicit, and `layers_per_stage` dropped when it equals its default."""
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
    cheap_score: bool  # resolved: True = x_j . (W_k^T q0), False = the official keys of all N tokens
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
        "cheap_score": Option(None, bool, "score with u = W_k^T q0 (O(N*D) instead of projecting K for "
                              "all N tokens; the official ranking up to exact ties); default: on unless the "
                              "model has k_norm (qk_norm), where it is not exact; false: the official path"),
    }
    layer_presets = {"infer": _infer_layers, "main": _main_layers}
    # The official recipe (docs/methods.md#idlevit-finetuning): CE + 20 x token-cut loss (both terms),
    # logit distillation (weight 5) and CLS-feature distillation (100 x 5); cls_token and pos_embed frozen.
    finetune_defaults = dict(cut_loss="both", cut_weight=20.0, cut_bug_compat=False, distill="kl+feature",
                             distill_weight=5.0, freeze=("cls_token", "pos_embed"))

    @classmethod
    def resolve_layers(cls, depth: int, options: dict) -> tuple[int, ...]:
        return cls.default_layers(depth, options["preset"])

    @classmethod
    def canonical_config(cls, depth, layers, options) -> CanonicalConfig:
        """`preset` only picks the default layers, so the canonical form names the layers by the first
        preset that yields them (no option for the default `infer`) and drops the preset when the
        layers are explicit; `layers_per_stage` equal to its default ceil(len(layers) / 3) is dropped."""
        explicit, opts = super().canonical_config(depth, layers, options)
        return preset_canonical_config(cls, depth, explicit, opts)

    def __init__(self, geometry, keep_ratio, layers, options):
        super().__init__(geometry, keep_ratio, layers, options)
        self.layers_per_stage = per_stage = stage_length(options.get("layers_per_stage"), len(layers))
        ratios = stagewise_ratios(keep_ratio, layers, per_stage)
        self.keep_per_layer = {i: abs_floor(geometry.num_patches, r) for i, r in zip(layers, ratios)}
        # The default (None) is settled by `patch`, which sees the attention modules; a count made from a
        # geometry alone assumes what every DeiT / ViT has, no k_norm, hence cheap scoring.
        self.cheap_score = options.get("cheap_score") is not False

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
        if self.cheap_score:
            return stock + 2 * g.dim * g.attn_dim + N * g.dim
        return stock + g.dim * g.attn_dim + (N - n) * g.dim * g.attn_dim + N * g.attn_dim

    def patch(self, model: nn.Module) -> None:
        blocks = self.geometry.blocks_of(model)
        key_norm = any(not isinstance(blocks[i].attn.k_norm, nn.Identity) for i in self.layers)
        if key_norm and self.opts["cheap_score"]:
            raise MethodError("option cheap_score=True is not exact with k_norm (qk_norm models); "
                              "valid: cheap_score=False (or leave it unset) for this model")
        self.cheap_score = self.opts["cheap_score"] is not False and not key_norm
        super().patch(model)

    def patch_block(self, block: nn.Module, index: int) -> None:
        block.idle_layer = IdleLayer(index, self.keep_per_layer[index], self.geometry.num_prefix,
                                     self.cheap_score, self.state)
        swap_class(block, IdleBlock)

    def training_losses(self, settings, features, teacher_features) -> dict:
        """The token-cut loss over the idle layers of the last training forward (mask path)."""
        if settings["cut_loss"] == "none":
            return {}
        idle_layers = sum(1 for block in self.schedule().blocks if block.action == "idle")
        return {"cut": token_cut_loss(self.aux, max(idle_layers, 1), kind=settings["cut_loss"],
                                      bug_compat=settings["cut_bug_compat"], num_prefix=self.geometry.num_prefix)}

    def describe(self) -> dict:
        out = super().describe()
        out.update(layers_per_stage=self.layers_per_stage, scoring="cheap" if self.cheap_score else "official",
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


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, n, H*d) -> (B, H, n, d)."""
    B, n, _ = x.shape
    return x.view(B, n, attn.num_heads, attn.head_dim).transpose(1, 2)


def _row_dot(vector: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, C) . (B, N, C) -> (B, N) as a row-vector bmm: the column form (B, N, C) @ (B, C, 1) takes a slow
    CPU path (3.9 ms against 0.3 ms for DeiT-S at batch 32, one thread)."""
    return torch.bmm(vector.unsqueeze(1), tokens.transpose(1, 2)).squeeze(1)


def _per_head(norm: nn.Module, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A q/k norm (over head_dim) on full-width vectors (..., H*d); skipped when it is the Identity."""
    if isinstance(norm, nn.Identity):
        return x
    return norm(x.unflatten(-1, (num_heads, -1))).flatten(-2)


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
        """CLS scores (B, N) in the official order (the head sum of the unscaled pre-softmax logits: the
        official head mean times H) and, on the official path, the keys of all tokens (B, N, H*d)."""
        attn = self.attn
        weight_q, bias_q = _split_qkv_weights(attn, 0)
        weight_k, bias_k = _split_qkv_weights(attn, 1)
        q_cls = _per_head(attn.q_norm, F.linear(x_norm[:, 0], weight_q, bias_q), attn.num_heads)  # (B, H*d)
        if self.idle_layer.cheap_score:
            # sum_h q0_h . (W_k x_j + b_k)_h = x_j . (W_k^T q0) + q0 . b_k: the constant does not move the order.
            u = q_cls @ weight_k  # (B, D)
            return _row_dot(u, x_norm), None
        k_all = _per_head(attn.k_norm, F.linear(x_norm, weight_k, bias_k), attn.num_heads)
        return _row_dot(q_cls, k_all), k_all

    def _gather_forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, attn = self.idle_layer, self.attn
        x_norm = self.norm1(x)  # per-token, so norm1 of the selected = selected of norm1
        scores, k_all = self._scores(x_norm)
        idx = select_tokens(scores, layer.keep, layer.num_prefix)
        _record_selection(layer, idx, x.shape[1], False)

        n = idx.shape[1]
        rows = batch_rows(idx, x.shape[1])  # the one index of this block: gathers and write-back
        selected, selected_norm = take_rows(x, rows, n), take_rows(x_norm, rows, n)
        if k_all is None:  # q, k, v of the selected tokens only, in one GEMM as in the stock block
            q, k, v = project_qkv(attn, selected_norm)
        else:  # official: the keys were projected for every token to score them
            q = attn.q_norm(_heads(attn, F.linear(selected_norm, *_split_qkv_weights(attn, 0))))
            k = _heads(attn, take_rows(k_all, rows, n))
            v = _heads(attn, F.linear(selected_norm, *_split_qkv_weights(attn, 2)))
        out = output_projection(attn, attend(attn, q, k, v), selected_norm)
        selected = selected + self.drop_path1(self.ls1(out))
        selected = selected + self.drop_path2(self.ls2(self.mlp(self.norm2(selected))))
        return replace_rows(x, rows, selected)  # out of place: x belongs to the caller

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
