"""DynamicViT (Rao et al., NeurIPS 2021) as a patch over a stock timm ViT (docs/methods.md#dynamicvit).

A small MLP predictor per pruning location scores the image tokens that are still alive; the
block at that location and every later one see fewer tokens.
- Eval: before each pruning block keep the K_s = int(N0 * r^s) tokens with the highest keep
  log-probability (absolute w.r.t. the input patch count N0, floored), drop the rest for good.
- Training: keep every token; Gumbel-softmax straight-through decisions, multiplied by the
  previous stage's, gate every block's attention through the policy softmax (docs/methods.md#dynamicvit-training-path), so the
  gradient reaches the predictors. The decisions are recorded as aux "decision" for the ratio loss.

The predictors live on the model as `score_predictor` (the official checkpoint's name), so
released weights load into them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention_logits, output_projection, project_qkv
from .base import (
    DROPPED, KEPT, BlockTokens, Method, Schedule, abs_floor, gather_tokens, quarter_layers,
    stagewise_ratios, swap_class,
)
from .registry import register
from .geometry import standard_block_macs


class PredictorLG(nn.Module):
    """Local-global keep/drop predictor (docs/methods.md#dynamicvit-predictor).

    Submodule names (`in_conv`, `out_conv`) and layer order follow the official checkpoint, so a
    released `score_predictor.<stage>.*` state dict loads unchanged.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """x (B, n, D) image tokens, policy (B, n, 1) previous keep decision -> (B, n, 2) log-probs;
        channel 0 is log p(keep)."""
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        local_feat = h[..., :half]
        # The global half is a mean over the tokens still kept, so dropped ones stop informing decisions.
        # (The clamp only matters once a sample has dropped every token, where the official code gives NaN.)
        kept = policy.sum(dim=1, keepdim=True).clamp_min(torch.finfo(policy.dtype).tiny)
        global_feat = (h[..., half:] * policy).sum(dim=1, keepdim=True) / kept
        return self.out_conv(torch.cat([local_feat, global_feat.expand(-1, h.shape[1], -1)], dim=-1))

    def macs(self, num_tokens: int) -> int:
        """Linear layers only (norms, GELU and the masked mean are not counted, as everywhere)."""
        return num_tokens * sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))


def new_predictor(dim: int, seed: int) -> PredictorLG:
    """A predictor with the official init (truncated normal std 0.02 for Linear weights, zero biases,
    unit LayerNorm) drawn from a private generator: building a method never touches the global RNG
    (the modules are created on the meta device, so PyTorch's own init does not run either)."""
    with torch.device("meta"):
        predictor = PredictorLG(dim)
    predictor.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    for module in predictor.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return predictor


def policy_softmax(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Softmax over keys where dropped keys (policy 0) are invisible to every query but their own
    (docs/methods.md#dynamicvit-training-path). Multiplicative rather than an additive -inf mask, so the straight-through
    gradient reaches the decisions. In fp32 for stability, as in the official code.

    logits (B, H, N, N), policy (B, N, 1) -> attention weights (B, H, N, N).
    """
    B, _, N, _ = logits.shape
    keep = policy.reshape(B, 1, 1, N).float()
    eye = torch.eye(N, dtype=torch.float32, device=logits.device)
    gate = keep + (1.0 - keep) * eye
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    weights = shifted.float().exp() * gate
    return ((weights + eps / N) / (weights.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


class DynamicViTBlock:
    """Forward of every block of a DynamicViT-patched model (mixed into the block's own class)."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        method: DynamicViT = self.dynamicvit
        if self.block_index == 0:
            method.start_pass(x, self.training)
        if self.training:
            if self.block_index in method.stage_of:
                method.decide(x, self.block_index)
            return self.policy_forward(x, method.state.carry["policy"])
        if self.block_index in method.prune_counts:
            x = method.prune(x, self.block_index)
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def policy_forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """The stock block with explicit policy-gated attention; every token goes through the MLP."""
        attn = self.attn
        B, N, _ = x.shape
        x_in = self.norm1(x)
        q, k, v = project_qkv(attn, x_in)
        weights = attn.attn_drop(policy_softmax(attention_logits(attn, q, k), policy))
        out = (weights @ v).transpose(1, 2).reshape(B, N, attn.attn_dim)
        x = x + self.drop_path1(self.ls1(output_projection(attn, out, x_in)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@register
class DynamicViT(Method):
    name = "dynamicvit"
    aliases = ("dyvit",)
    summary = "learned MLP predictors drop tokens before 3 blocks (keep int(N0 * r^s) patches at stage s)"
    needs_cls = True
    count_rule = "abs_floor"
    layer_presets = {"official": quarter_layers}  # pruning happens BEFORE these blocks
    # The official recipe (docs/methods.md#dynamicvit-finetuning): lr 1e-3 for the predictors, ratio loss
    # (weight 2), KL and token distillation (0.5 each), the backbone at 1/100 of the predictors' learning
    # rate and frozen for the first 5 of 30 epochs (predictor-only), cls_token and pos_embed frozen.
    finetune_defaults = dict(lr=1e-3, ratio_weight=2.0, distill="kl", distill_weight=0.5, tokens_weight=0.5,
                             backbone_lr_scale=0.01, predictor_only_fraction=5 / 30,
                             freeze=("cls_token", "pos_embed"))

    def __init__(self, geometry, keep_ratio, layers, options):
        super().__init__(geometry, keep_ratio, layers, options)
        self.stage_of = {layer: stage for stage, layer in enumerate(self.layers)}
        ratios = stagewise_ratios(keep_ratio, self.layers, layers_per_stage=1)
        self.keep_counts = [abs_floor(geometry.num_patches, ratio) for ratio in ratios]
        self.predictors = nn.ModuleList(
            new_predictor(geometry.dim, seed=stage) for stage in range(len(self.layers))
        )
        # Blocks that really drop tokens at inference -> image tokens they keep. A stage keeping every
        # token (keep ratio 1) is skipped: its predictor's ranking would change nothing.
        prefix = geometry.num_prefix
        self.prune_counts = {
            i: bt.n_attn - prefix for i, bt in enumerate(self.schedule().blocks) if bt.action == "prune"
        }

    # --- counts and cost -----------------------------------------------------------------------
    def schedule(self) -> Schedule:
        g = self.geometry
        n = g.num_tokens
        blocks = []
        for i in range(g.depth):
            n_in, action = n, ""
            if i in self.stage_of:
                kept = g.num_prefix + self.keep_counts[self.stage_of[i]]
                if kept < n:
                    n, action = kept, "prune"
            blocks.append(BlockTokens(n_in, n, n, n, action))
        return Schedule(tuple(blocks))

    def predictor_macs(self, index: int, tokens: BlockTokens) -> int:
        """The predictor at a pruning block runs on the image tokens entering it (docs/methods.md#method-overheads)."""
        if tokens.action != "prune":
            return 0
        return self.predictors[self.stage_of[index]].macs(tokens.n_in - self.geometry.num_prefix)

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        return standard_block_macs(self.geometry, tokens.n_attn, tokens.n_mlp) + self.predictor_macs(index, tokens)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"score_predictor": self.predictors}

    def training_losses(self, settings, features, teacher_features) -> dict:
        """Ratio loss: per stage, the squared gap between the kept fraction of each sample and the
        stage's target r^s, averaged over samples and stages. Token distillation: MSE between the
        student's and the teacher's final image tokens that the last decision keeps."""
        decisions = self.aux.get("decision", {})
        if not decisions:
            return {}
        targets = stagewise_ratios(self.keep_ratio, self.layers, layers_per_stage=1)
        ratio = sum(((decisions[layer].mean(dim=1) - target) ** 2).mean()
                    for layer, target in zip(self.layers, targets) if layer in decisions) / len(self.layers)
        out = {"ratio": ratio}
        if teacher_features is not None:
            prefix = self.geometry.num_prefix
            keep = decisions[max(decisions)].unsqueeze(-1)  # (B, N0, 1), 1 = kept by the last stage
            squared = (features[:, prefix:] - teacher_features[:, prefix:]) ** 2 * keep
            out["tokens"] = squared.sum() / (keep.sum() * features.shape[-1]).clamp_min(1.0)
        return out

    # --- patching ------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> None:
        reference = model.patch_embed.proj.weight
        self.predictors.to(device=reference.device, dtype=reference.dtype)
        # Every block is patched: in training all of them use the policy softmax, as in the official model.
        for i, block in enumerate(model.blocks):
            swap_class(block, DynamicViTBlock)
            block.block_index = i
            block.dynamicvit = self  # a plain attribute: the predictors stay registered on the model only

    # --- per-forward steps, called by the blocks ------------------------------------------------
    def start_pass(self, x: torch.Tensor, training: bool) -> None:
        g, carry = self.geometry, self.state.carry
        B = x.shape[0]
        carry.clear()
        if training:
            carry["decision"] = x.new_ones(B, g.num_patches, 1)
            carry["policy"] = x.new_ones(B, g.num_tokens, 1)
        if self.state.trace and not training:  # original patch index of every image token still alive
            carry["positions"] = torch.arange(g.num_patches, device=x.device).expand(B, -1)

    def prune(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Eval: keep the prefix and the top-K image tokens by predicted keep log-probability."""
        prefix = self.geometry.num_prefix
        image = x[:, prefix:]
        # Every surviving token has decision 1 at inference, so the policy is all ones.
        policy = image.new_ones(image.shape[0], image.shape[1], 1)
        keep_logprob = self.predictors[self.stage_of[index]](image, policy)[..., 0]
        keep = keep_logprob.topk(self.prune_counts[index], dim=1, sorted=True).indices
        if self.state.trace:
            positions = self.state.carry["positions"].gather(1, keep)
            self.state.carry["positions"] = positions
            self._record_state(index, positions, training=False)
            prefix_idx = torch.arange(prefix, device=x.device).expand(x.shape[0], -1)
            self.state.record("kept", index, torch.cat([prefix_idx, keep + prefix], dim=1), False)
        return torch.cat([x[:, :prefix], gather_tokens(image, keep)], dim=1)

    def decide(self, x: torch.Tensor, index: int) -> None:
        """Training: a hard, straight-through Gumbel keep decision per patch; multiplying by the
        previous decision makes a drop permanent. Updates the policy the blocks attend with."""
        carry, prefix = self.state.carry, self.geometry.num_prefix
        log_probs = self.predictors[self.stage_of[index]](x[:, prefix:], carry["decision"])
        decision = F.gumbel_softmax(log_probs, hard=True)[..., :1] * carry["decision"]
        carry["decision"] = decision
        carry["policy"] = torch.cat([decision.new_ones(x.shape[0], prefix, 1), decision], dim=1)
        self.state.record("decision", index, decision.squeeze(-1), training=True)
        kept = decision.squeeze(-1).detach() > 0.5
        self.state.record("patch_state", index, torch.where(kept, KEPT, DROPPED).to(torch.int8), training=True)

    def _record_state(self, index: int, positions: torch.Tensor, training: bool) -> None:
        B = positions.shape[0]
        state = torch.full((B, self.geometry.num_patches), DROPPED, dtype=torch.int8, device=positions.device)
        state.scatter_(1, positions, KEPT)
        self.state.record("patch_state", index, state, training)
