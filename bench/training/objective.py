"""The finetune loss: cross-entropy, distillation from the unpatched teacher, and the method's own terms.

    total = CE(student, y) + w_kl KL(teacher || student) + 100 w_kl MSE(norm(cls_s), norm(cls_t))
            + sum over the method's terms t of w_t * t          (docs/methods.md#training-summary)

The KL term is the logits' KL divergence at temperature 1, teacher to student (the papers' choice); the
feature term compares the L2-normalised pre-logit features (the CLS token for DeiT), IdleViT's feature
distillation. The method's terms come from `Method.training_losses` (IdleViT's token-cut loss,
DynamicViT's ratio and token-distillation losses) and are weighed by the recipe's `<term>_weight`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

FEATURE_SCALE = 100.0  # IdleViT: the feature term weighs 100 times the logit term


def teacher_outputs(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final normed tokens, logits) of the frozen teacher."""
    with torch.no_grad():
        features = teacher.forward_features(images)
        return features, teacher.forward_head(features)


def loss_terms(forward: nn.Module, teacher: nn.Module | None, method, images: torch.Tensor, targets: torch.Tensor,
               recipe: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted total for one batch and each term's unweighted value (for the curve). `forward` gives
    the student's (final tokens, pre-logit features, logits), `method` is the student's token reduction."""
    method.state.reset()  # aux outputs of this forward only (forward_features bypasses the model's forward)
    features, pre_logits, logits = forward(images)
    if targets.ndim == 2:  # mixup / cutmix soft targets, smoothing already applied
        ce = SoftTargetCrossEntropy()(logits, targets)
    else:
        ce = F.cross_entropy(logits, targets, label_smoothing=recipe["label_smoothing"])
    terms, weights = {"ce": ce}, {"ce": 1.0}
    teacher_features = None
    if recipe["distill"] != "none":
        teacher_features, teacher_logits = teacher_outputs(teacher, images)
        terms["kl"] = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                               reduction="batchmean", log_target=True)
        weights["kl"] = recipe["distill_weight"]
        if recipe["distill"] == "kl+feature":
            with torch.no_grad():
                theirs = teacher.forward_head(teacher_features, pre_logits=True)
            terms["feature"] = F.mse_loss(F.normalize(pre_logits, dim=-1), F.normalize(theirs, dim=-1))
            weights["feature"] = FEATURE_SCALE * recipe["distill_weight"]
    for name, value in method.training_losses(recipe, features, teacher_features).items():
        terms[name], weights[name] = value, recipe[f"{name}_weight"]
    total = sum(weights[name] * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}
