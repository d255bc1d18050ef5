"""Top-K: EViT without the fused token (docs/methods.md#top-k; Haurum et al., ICCVW 2023).

Same layers (depth//4, depth//2, 3*depth//4), same ceil count rule and same place in the block as
EViT; the inattentive image tokens are simply dropped. Option `score` picks what ranks them:
  "prob"  - head-mean of the CLS row of the softmax attention (EViT's score, the default);
  "logit" - head-mean of the CLS row of the scaled pre-softmax logits (IdleViT's kind of score).
"""
from __future__ import annotations

from .attention import cls_logits
from .registry import register
from .options import Option
from .evit import EViT


@register
class TopK(EViT):
    name = "topk"
    aliases = ("top-k",)
    summary = "keep the tokens the CLS token attends to most; drop the rest"
    options = {"score": Option("prob", str, "CLS score that ranks the image tokens", ("prob", "logit"))}

    @property
    def fuses(self) -> bool:
        return False

    def token_scores(self, attn, q, k, index):
        if self.opts["score"] == "prob":
            return super().token_scores(attn, q, k, index)
        prefix = self.geometry.num_prefix
        return cls_logits(attn, q[:, :, :1], k).mean(dim=1)[:, prefix:]
