"""The registry: methods by name and alias, and `build`/`apply`, which check a configuration against a
model and patch it (docs/methods.md#method-interface). Method modules register themselves with
`@register`; `methods/__init__.py` imports each one once, which is the registration line."""
from __future__ import annotations

import math
from typing import Any, Sequence

from torch import nn

from .base import CanonicalConfig, Method, swap_class, validate_layers
from .errors import MethodError
from .geometry import read_geometry, stock_type
from .swin import SwinGeometry
from .options import validate_options

_REGISTRY: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: `@register` on a Method subclass makes it available by name and aliases."""
    for key in (cls.name, *cls.aliases):
        if key in _ALIASES and _ALIASES[key] != cls.name:
            raise ValueError(f"method name {key!r} registered twice")
        _ALIASES[key] = cls.name
    _REGISTRY[cls.name] = cls
    return cls


def available(family: str | None = None) -> list[str]:
    """Canonical method names, in registration order; with `family` ("vit", "swin") only the methods that
    patch models of that family (`Method.families`)."""
    return [n for n, c in _REGISTRY.items() if family is None or family in c.families]


def get_method(name: str) -> type[Method]:
    key = str(name).strip().lower()
    if key not in _ALIASES:
        valid = ", ".join(f"{n} ({', '.join(_REGISTRY[n].aliases)})" if _REGISTRY[n].aliases else n
                          for n in _REGISTRY)
        raise MethodError(f"unknown method {name!r}; valid: {valid}")
    return _REGISTRY[_ALIASES[key]]


def canonical_name(name: str) -> str:
    return get_method(name).name


def model_geometry(model: nn.Module):
    """The geometry of any modelled family: `methods.swin.SwinGeometry` for a timm SwinTransformer, else
    `Geometry` (which refuses what neither models, naming the part)."""
    from timm.models.swin_transformer import SwinTransformer

    if stock_type(model) is SwinTransformer:
        return SwinGeometry.from_model(model)
    return read_geometry(model)


def validate_keep_ratio(keep_ratio: Any) -> float:
    try:
        r = float(keep_ratio)
    except (TypeError, ValueError):
        raise MethodError(f"keep ratio {keep_ratio!r} is not a number; valid: 0 < ratio <= 1") from None
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise MethodError(f"keep ratio {keep_ratio!r} is out of range; valid: 0 < ratio <= 1")
    return r


class _ReducedModelMixin:
    """Model-level patch: reset per-forward state so auxiliary outputs belong to this pass."""

    def forward(self, *args, **kwargs):
        self.token_reduction.state.reset()
        return super().forward(*args, **kwargs)


def build(model_or_geometry, name: str, keep_ratio: float = 1.0, layers: Sequence[int] | None = None,
          **options) -> Method:
    """A configured (not yet applied) method: its schedule and MACs are available without a forward."""
    cls = get_method(name)
    g = model_geometry(model_or_geometry) if isinstance(model_or_geometry, nn.Module) else model_or_geometry
    if g.family not in cls.families:
        raise MethodError(
            f"method {cls.name} patches {'/'.join(cls.families)} models, but this model is a {g.family} model; "
            f"valid for it: {', '.join(available(g.family))}"
        )
    if cls.needs_cls and not g.has_cls:
        raise MethodError(
            f"method {cls.name} scores tokens by the CLS token, but this model has none "
            "(it pools its image tokens); use a model with a class token or a method that needs none "
            f"({', '.join(n for n, c in _REGISTRY.items() if not c.needs_cls and g.family in c.families)})"
        )
    refusal = cls.refusal(g)
    if refusal:
        raise MethodError(f"method {cls.name}: {refusal}")
    opts = validate_options(cls.options, options, cls.name)
    return cls(g, validate_keep_ratio(keep_ratio), validate_layers(cls, layers, g.depth, opts, g), opts)


def apply(model: nn.Module, name: str, keep_ratio: float = 1.0, layers: Sequence[int] | None = None,
          **options) -> nn.Module:
    """Patch a stock timm ViT in place with method `name` and return it.

    `model.token_reduction` is then the configured `Method`: its `schedule()`, `total_macs()`,
    `aux` (auxiliary outputs of the last forward) and `state.trace` switch.
    """
    if getattr(model, "token_reduction", None) is not None:
        raise MethodError("model is already patched; create a fresh model to apply another method")
    method = build(model, name, keep_ratio, layers, **options)
    method.patch(model)
    for mod_name, module in method.trainable_modules().items():
        model.add_module(mod_name, module)
    model.token_reduction = method
    swap_class(model, _ReducedModelMixin, f"{type(method).__name__}{type(model).__name__}")
    return model


def canonical_config(name: str, depth: int, layers: Sequence[int] | None = None, **options) -> CanonicalConfig:
    """The canonical spelling of a method configuration on a model of `depth` blocks, so that equal
    configurations compare equal: `layers=(3, ..., 11)` for IdleViT on 12 blocks (its default) gives
    layers None like no layers, and `fuse=True` for EViT (its default) gives no option, like none.
    Raises MethodError for an unknown method or option, a value of the wrong type or outside its
    choices, or a layer outside 0..depth-1 (checks that need the model are left to `build`)."""
    return get_method(name).canonical_config(int(depth), layers, options)
