"""Finetune recipes: the common settings, each method's paper settings over them, the user's over both.

A spec's `finetune` holds the whole resolved recipe: two spellings of one recipe share a job key, and a
changed default changes the key rather than silently reusing a record trained otherwise.

The common recipe is timm's usual finetune: AdamW, cosine schedule with a linear warm-up, label
smoothing 0.1, weight decay 0.05, no mixup (the papers' DeiT recipes use mixup/cutmix; set them for
ImageNet-scale runs). docs/methods.md#training-summary lists the per-method settings and their sources.
"""
from __future__ import annotations

import math
from typing import Any

import methods

from ..spec import pairs, regime_of

EMBEDDED_TRAIN = "fashion-mnist-train"  # the shipped 20k-image training subset of the embedded default

COMMON: dict[str, Any] = dict(
    epochs=1.0,  # passes over the training data (fractions allowed)
    train_data=EMBEDDED_TRAIN,  # or an ImageNet-style folder
    train_limit=None,  # first N training images only
    batch_size=128,  # global batch (split over the DDP processes)
    accum_steps=1,  # gradient accumulation: optimizer steps every accum_steps batches
    lr=5e-4, min_lr=1e-6, warmup_epochs=0.1, weight_decay=0.05, opt="adamw",
    label_smoothing=0.1, mixup=0.0, cutmix=0.0,
    ema_decay=0.0,  # 0: no EMA; else the EMA weights are the job's result
    distill="none",  # none | kl | kl+feature (logits KL to the unpatched teacher, + CLS pre-logit features)
    distill_weight=1.0,
    keep_warmup_epochs=0.0,  # EViT-style cosine keep-rate warm-up from 1 to the keep ratio (live-ratio methods)
    backbone_lr_scale=1.0,  # the backbone's lr relative to the method's own modules (predictors)
    predictor_only_fraction=0.0,  # the first fraction of the steps trains only the method's own modules
    freeze=(),  # parameters never trained (names on the model)
    checkpoint_every=0,  # optimizer steps between checkpoints inside an epoch; 0: once per epoch
    workers=0,  # data-loader processes for folder data
    # method loss settings (used by the methods that define them)
    cut_loss="both", cut_weight=20.0, cut_bug_compat=False,  # IdleViT
    ratio_weight=2.0, tokens_weight=0.5,  # DynamicViT
)
CHOICES = dict(distill=("none", "kl", "kl+feature"), cut_loss=("both", "intra", "inter", "none"), opt=("adamw", "sgd", "lamb"))


class RecipeError(ValueError):
    """A finetune setting that is unknown or out of range; the message names it and the valid values."""


def defaults(method: str) -> dict[str, Any]:
    """The common recipe with the method's paper settings over it."""
    return dict(COMMON, **methods.get_method(method).finetune_defaults)


def resolve(method: str, settings: dict) -> dict[str, Any]:
    """The whole recipe of a job: defaults, then the user's settings, checked and coerced."""
    out = defaults(method)
    unknown = sorted(set(settings) - set(out))
    if unknown:
        raise RecipeError(f"unknown finetune setting {unknown[0]!r}; valid: {', '.join(sorted(out))}")
    for name, value in settings.items():
        out[name] = _coerce(name, value, out[name])
    _check(method, out)
    return out


def canonical(method: str, settings: dict) -> tuple[tuple[str, Any], ...]:
    """What a spec holds: the whole resolved recipe, so two spellings of one recipe share a key and a
    change of a default changes the key (a record is never reused for a recipe it was not trained with)."""
    return pairs(resolve(method, settings))


def regime_label(method: str, finetune) -> str:
    """How reports name a model's training: 'off-the-shelf', 'finetuned N ep', and after it every
    setting that differs from the method's defaults (e.g. 'finetuned 2 ep, lr=0.01'), so two recipes of
    one method never share a row label, and a recipe run with changed settings says so."""
    settings, label = dict(finetune or ()), regime_of(finetune)
    if not settings:
        return label
    try:
        reference = defaults(method)
    except methods.MethodError:  # a record of a method this checkout no longer has: no defaults to compare
        return label
    changed = [f"{name}={_show(value)}" for name, value in sorted(settings.items())
               if name != "epochs" and name in reference and _same_form(value) != _same_form(reference[name])]
    return ", ".join([label, *changed])


def _same_form(value: Any) -> Any:
    """A setting as stored in a record (JSON lists, ints for whole floats) comparable with its default."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _coerce(name: str, value: Any, default: Any) -> Any:
    if value is None and default is None:
        return None
    kind = type(default) if default is not None else (int if name == "train_limit" else str)
    try:
        if kind is bool:
            text = str(value).strip().lower()
            if isinstance(value, bool) or text in ("true", "false", "1", "0", "yes", "no"):
                return value if isinstance(value, bool) else text in ("true", "1", "yes")
            raise ValueError(value)
        if kind is tuple:
            return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
        if kind in (int, float):
            number = float(value)
            if not math.isfinite(number) or (kind is int and number != int(number)):
                raise ValueError(value)
            return kind(number) if kind is int else number
        return str(value)
    except (TypeError, ValueError):
        raise RecipeError(f"finetune setting {name}={value!r} is not a {kind.__name__}") from None


def _check(method: str, recipe: dict) -> None:
    for name, choices in CHOICES.items():
        if recipe[name] not in choices:
            raise RecipeError(f"finetune setting {name}={recipe[name]!r} is not valid; valid: {', '.join(choices)}")
    positive = ("epochs", "batch_size", "accum_steps", "lr")
    for name in positive:
        if not recipe[name] > 0:
            raise RecipeError(f"finetune setting {name}={recipe[name]!r} is not valid; valid: a number > 0")
    for name in ("min_lr", "warmup_epochs", "weight_decay", "label_smoothing", "mixup", "cutmix", "ema_decay",
                 "distill_weight", "keep_warmup_epochs", "backbone_lr_scale", "checkpoint_every", "workers",
                 "cut_weight", "ratio_weight", "tokens_weight"):
        if recipe[name] < 0:
            raise RecipeError(f"finetune setting {name}={recipe[name]!r} is not valid; valid: a number >= 0")
    for name in ("label_smoothing", "ema_decay", "predictor_only_fraction"):
        if not 0 <= recipe[name] < 1:
            raise RecipeError(f"finetune setting {name}={recipe[name]!r} is not valid; valid: 0 <= value < 1")
    if recipe["train_limit"] is not None and recipe["train_limit"] < 1:
        raise RecipeError(f"finetune setting train_limit={recipe['train_limit']!r} is not valid; valid: an integer >= 1")
    cls = methods.get_method(method)
    if recipe["keep_warmup_epochs"] > 0 and not cls.live_keep_ratio:
        live = [m for m in methods.available() if methods.get_method(m).live_keep_ratio]
        raise RecipeError(f"finetune setting keep_warmup_epochs needs a method whose keep ratio can move "
                          f"during training; {method} fixes its counts when built; valid with: {', '.join(live)}")
