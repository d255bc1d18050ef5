"""The method interface: options, count rules, schedules, the registry and `apply`.

A method is a `Method` subclass that
- declares its name, aliases, options, default reduction layers and count rule,
- computes the tokens every block will process (`schedule`) before anything runs,
- patches a live, stock timm `VisionTransformer` in place (`patch`), ToMe `patch.timm` style:
  blocks get their `__class__` swapped to a subclass whose `forward` does the method, and
- adds its own overhead to the analytic multiply-accumulate count (`block_macs`).

Everything here is model-agnostic: no 196, no 224, no model-name parsing; what a model looks like
is read by `methods.geometry`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
from torch import nn

from .errors import MethodError
from .geometry import Geometry, standard_block_macs, stock_type
from .options import Option, validate_options

# Per-forward auxiliary outputs kept on the model (`model.token_reduction.aux[kind][block_index]`).
# Recorded only while `model.token_reduction.state.trace` is on or the model is training, so
# benchmarks pay nothing for them. Every method records "patch_state" at each reduction block;
# the others are method-specific:
#   "patch_state" (B, N0) int8   per ORIGINAL patch after this block: KEPT, IDLE, DROPPED or FUSED
#                                (for visualisation; prefix tokens are not included)
#   "patch_group" (B, N0) long   ToMe: index of the output token that now holds each original patch
#   "kept"        (B, n) long    positions, in this block's input sequence, of the kept/selected tokens
#   "idle_mask"   (B, N) float   IdleViT: 1 = selected in this layer, 0 = idle (prefix always 1)
#   "attn_logits" (B, H, N, N)   IdleViT training: raw, unmasked attention logits for the token-cut loss
#   "decision"    (B, N0) float  DynamicViT training: the stage's hard keep decision per original patch
KEPT, IDLE, DROPPED, FUSED = 0, 1, 2, 3  # values of "patch_state"


@dataclass(frozen=True)
class BlockTokens:
    """Token counts one block processes; all counts include the prefix tokens."""

    n_in: int  # tokens in the stream entering the block
    n_attn: int  # tokens taking part in attention (queries and keys)
    n_mlp: int  # tokens going through the MLP
    n_out: int  # tokens leaving the block
    action: str = ""  # "", "idle", "prune", "fuse", "merge": what the block does to the rest


@dataclass(frozen=True)
class Schedule:
    blocks: tuple[BlockTokens, ...]

    @property
    def tokens_out(self) -> tuple[int, ...]:
        return tuple(b.n_out for b in self.blocks)

    @property
    def tokens_attn(self) -> tuple[int, ...]:
        return tuple(b.n_attn for b in self.blocks)


# ---------------------------------------------------------------------------------------------
# Count rules (docs/methods.md#count-rules). Counts are of *image* tokens; prefix tokens are added by callers.

def abs_floor(num_patches: int, ratio: float) -> int:
    """IdleViT / DynamicViT: K = int(N0 * ratio), absolute w.r.t. the input patch count, floored."""
    return int(num_patches * ratio)


def rel_ceil(current_image_tokens: int, keep_ratio: float) -> int:
    """EViT / Top-K: ceil(keep_ratio * current image tokens), compounding stage over stage."""
    return math.ceil(keep_ratio * current_image_tokens)


def quarter_layers(depth: int) -> tuple[int, ...]:
    """Blocks depth/4, depth/2, 3 depth/4: EViT's and DynamicViT's (3, 6, 9) for 12 blocks,
    (4, 8, 12) for 16 and (5, 10, 15) for 20 (the official LV-ViT-S/M locations)."""
    return (depth // 4, depth // 2, 3 * depth // 4)


def stagewise_ratios(keep_ratio: float, layers: Sequence[int], layers_per_stage: int) -> list[float]:
    """IdleViT / DynamicViT: r, r, r, r^2, r^2, ... : stage s = position // layers_per_stage."""
    return [keep_ratio ** (i // layers_per_stage + 1) for i in range(len(layers))]


# ---------------------------------------------------------------------------------------------
# Helpers the method modules share.

def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, n) long -> (B, n, C)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def swap_class(module: nn.Module, mixin: type, name: str | None = None) -> None:
    """Make `module` an instance of a subclass of its own class with `mixin`'s forward (ToMe style).

    The subclass keeps every parameter and buffer, so state dicts and `.to()` are untouched.
    """
    base = type(module)
    # `_stock_class` lets the geometry check see the timm class behind a patched module.
    cls = type(name or f"{mixin.__name__}{base.__name__}", (mixin, base), {"_stock_class": stock_type(module)})
    module.__class__ = cls


@dataclass
class ForwardState:
    """Scratch shared by the patched blocks of one model during one forward pass."""

    trace: bool = False  # keep auxiliary outputs in eval mode too (visualisation, reports)
    aux: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    carry: dict[str, Any] = field(default_factory=dict)  # per-forward token state (ToMe sizes, ...)

    def reset(self) -> None:
        self.aux = {}
        self.carry = {}

    def record(self, kind: str, block: int, value: torch.Tensor, training: bool) -> None:
        if self.trace or training:
            self.aux.setdefault(kind, {})[block] = value


class Method:
    """Base class of every token-reduction method. Subclasses set the class attributes and override
    `schedule`, `patch_block` (or `patch`) and, where the method has overhead, `block_macs`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""  # one line for the README table and --help
    needs_cls: ClassVar[bool] = False  # scores come from the CLS token
    count_rule: ClassVar[str] = "none"  # "abs_floor" | "rel_ceil" | "remove_r" | "none"
    options: ClassVar[dict[str, Option]] = {}
    # Named layer presets: name -> function(depth) -> block indices. The first one is the default.
    layer_presets: ClassVar[dict[str, Any]] = {}

    def __init__(self, geometry: Geometry, keep_ratio: float, layers: tuple[int, ...], options: dict):
        self.geometry = geometry
        self.keep_ratio = keep_ratio
        self.layers = layers
        self.opts = options
        self.state = ForwardState()

    # --- declared behaviour ------------------------------------------------------------------
    @classmethod
    def default_layers(cls, depth: int, preset: str | None = None) -> tuple[int, ...]:
        if not cls.layer_presets:
            return ()
        preset = preset or next(iter(cls.layer_presets))
        if preset not in cls.layer_presets:
            raise MethodError(
                f"unknown layer preset {preset!r} for {cls.name}; valid: {', '.join(cls.layer_presets)}"
            )
        return tuple(cls.layer_presets[preset](depth))

    @classmethod
    def resolve_layers(cls, depth: int, options: dict) -> tuple[int, ...]:
        """The reduction layers used when none are given, for validated `options`: the first preset.
        A method whose options pick among its presets overrides this."""
        return cls.default_layers(depth)

    @classmethod
    def canonical_config(cls, depth: int, layers: Sequence[int] | None, options: dict) -> "CanonicalConfig":
        """One spelling per configuration: layers None when they are the default ones for `depth` and
        the options, and only the options that differ from their defaults (values coerced)."""
        opts = validate_options(cls.options, options, cls.name)
        chosen = validate_layers(cls, layers, depth, opts)
        differing = {k: v for k, v in opts.items() if v != cls.options[k].coerce(k, cls.options[k].default)}
        return CanonicalConfig(None if chosen == cls.resolve_layers(depth, opts) else chosen, differing)

    def schedule(self) -> Schedule:
        """Token counts per block. The base: nothing is reduced."""
        n = self.geometry.num_tokens
        return Schedule(tuple(BlockTokens(n, n, n, n) for _ in range(self.geometry.depth)))

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """Analytic MACs of block `index`; override to ADD the method's own overhead (predictors,
        scoring, matching) to `standard_block_macs(n_attn, n_mlp)`, which must stay the plain cost
        of the block on its scheduled tokens: `total_macs(include_overhead=False)` relies on it."""
        return standard_block_macs(self.geometry, tokens.n_attn, tokens.n_mlp)

    def total_macs(self, include_overhead: bool = True) -> int:
        """Stem + blocks + head (an attention-pool head on the tokens leaving the last block). Without
        overhead: only what stock blocks on the scheduled tokens cost, the convention of papers that
        leave a method's own overhead out (methods.flops)."""
        g, sched = self.geometry, self.schedule()
        if include_overhead:
            blocks = (self.block_macs(i, bt) for i, bt in enumerate(sched.blocks))
        else:
            blocks = (standard_block_macs(g, bt.n_attn, bt.n_mlp) for bt in sched.blocks)
        return g.stem_macs + sum(blocks) + g.head_cost(sched.blocks[-1].n_out)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """New modules the method adds (e.g. DynamicViT predictors), by name on the model."""
        return {}

    @property
    def aux(self) -> dict[str, dict[int, torch.Tensor]]:
        return self.state.aux

    # --- patching ------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> None:
        """Patch `model` in place. The default swaps each reduction layer's block class via
        `patch_block`; methods that need model-level state override this."""
        for i in self.layers:
            self.patch_block(model.blocks[i], i)

    def patch_block(self, block: nn.Module, index: int) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-friendly description for records and reports."""
        return dict(
            method=self.name, keep_ratio=self.keep_ratio, layers=list(self.layers),
            options=dict(self.opts), count_rule=self.count_rule,
            tokens_per_block=list(self.schedule().tokens_attn),
        )


class _ReducedModelMixin:
    """Model-level patch: reset per-forward state so auxiliary outputs belong to this pass."""

    def forward(self, *args, **kwargs):
        self.token_reduction.state.reset()
        return super().forward(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Registry

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


def available() -> list[str]:
    """Canonical method names, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> type[Method]:
    key = str(name).strip().lower()
    if key not in _ALIASES:
        valid = ", ".join(f"{n} ({', '.join(_REGISTRY[n].aliases)})" if _REGISTRY[n].aliases else n
                          for n in _REGISTRY)
        raise MethodError(f"unknown method {name!r}; valid: {valid}")
    return _REGISTRY[_ALIASES[key]]


def canonical_name(name: str) -> str:
    return get_method(name).name


def validate_layers(cls: type[Method], layers: Sequence[int] | None, depth: int, options: dict) -> tuple[int, ...]:
    """Block indices, sorted; the method's default ones (for these validated options) when None."""
    if layers is None:
        return cls.resolve_layers(depth, options)
    try:
        out = tuple(int(i) for i in layers)
    except (TypeError, ValueError):
        raise MethodError(f"layers must be block indices (integers); got {layers!r}") from None
    bad = [i for i in out if not 0 <= i < depth]
    if bad:
        raise MethodError(f"layer {bad[0]} is outside the model's blocks; valid: 0..{depth - 1}")
    dup = sorted({i for i in out if out.count(i) > 1})
    if dup:
        raise MethodError(f"layer {dup[0]} is given more than once in {list(out)}")
    return tuple(sorted(out))


def validate_keep_ratio(keep_ratio: Any) -> float:
    try:
        r = float(keep_ratio)
    except (TypeError, ValueError):
        raise MethodError(f"keep ratio {keep_ratio!r} is not a number; valid: 0 < ratio <= 1") from None
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise MethodError(f"keep ratio {keep_ratio!r} is out of range; valid: 0 < ratio <= 1")
    return r


def build(model_or_geometry, name: str, keep_ratio: float = 1.0, layers: Sequence[int] | None = None,
          **options) -> Method:
    """A configured (not yet applied) method: its schedule and MACs are available without a forward."""
    cls = get_method(name)
    g = model_or_geometry if isinstance(model_or_geometry, Geometry) else Geometry.from_model(model_or_geometry)
    if cls.needs_cls and not g.has_cls:
        raise MethodError(
            f"method {cls.name} scores tokens by the CLS token, but this model has none "
            "(it pools its image tokens); use a model with a class token or a method that needs none "
            f"({', '.join(n for n, c in _REGISTRY.items() if not c.needs_cls)})"
        )
    opts = validate_options(cls.options, options, cls.name)
    return cls(g, validate_keep_ratio(keep_ratio), validate_layers(cls, layers, g.depth, opts), opts)


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


class CanonicalConfig(NamedTuple):
    layers: tuple[int, ...] | None  # None: the method's default layers for that depth and options
    options: dict  # only the options that differ from their defaults, coerced


def canonical_config(name: str, depth: int, layers: Sequence[int] | None = None, **options) -> CanonicalConfig:
    """The canonical spelling of a method configuration on a model of `depth` blocks, so that equal
    configurations compare equal: `layers=(3, ..., 11)` for IdleViT on 12 blocks (its default) gives
    layers None like no layers, and `fuse=True` for EViT (its default) gives no option, like none.
    Raises MethodError for an unknown method or option, a value of the wrong type or outside its
    choices, or a layer outside 0..depth-1 (checks that need the model are left to `build`)."""
    return get_method(name).canonical_config(int(depth), layers, options)
