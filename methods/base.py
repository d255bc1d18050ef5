"""The method interface: options, count rules, schedules (the registry and `apply` are in methods.registry).

A method is a `Method` subclass that
- declares its name, aliases, options, default reduction layers and count rule,
- computes the tokens every block will process (`schedule`) before anything runs,
- patches a live, stock timm `VisionTransformer` in place (`patch`), ToMe `patch.timm` style:
  blocks get their `__class__` swapped to a subclass whose `forward` does the method, and
- adds its own overhead to the analytic multiply-accumulate count (`block_macs`).

Everything here is model-agnostic: no 196, no 224, no model-name parsing; what a model looks like
is read by `methods.geometry` (flat ViTs) and `methods.swin` (Swin). Beyond one flat token sequence
(docs/methods.md#method-interface):
- a block's tokens may be split into attention windows (`BlockTokens.windows`, Swin) and its keys may be
  more than its queries (`BlockTokens.n_kv`); a hierarchical model's cost is also given per stage
  (`Method.stage_macs`);
- an adaptive method (`Method.adaptive`, e.g. ATS) keeps a different number of tokens per image: its
  `schedule()` is then an upper bound, and after a forward with tracing on, `image_schedules()` holds one
  schedule per image and `macs_per_image()` their analytic costs (methods.flops.per_image_macs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
from torch import nn

from .errors import MethodError
from .geometry import Geometry, stock_type
from .options import Option, validate_options
from .tokens import BlockTokens, Schedule  # noqa: F401  (part of the interface: methods import them from here)

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
#   "tokens_in"   (B,) long      adaptive methods (ATS): tokens entering the block, per image (prefix included)
#   "tokens_out"  (B,) long      adaptive methods (ATS): tokens leaving it (= its queries and MLP tokens), per image
#   "window"      (N0,) long     Swin methods: the attention window of every original patch in this block
#                                (after the cyclic shift), to draw the window grid
KEPT, IDLE, DROPPED, FUSED = 0, 1, 2, 3  # values of "patch_state"


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


def patch_from_first_layer(method, blocks, block_class: type) -> None:
    """Swap `block_class` into every block from the method's first reduction layer to the last. Merging
    methods need it in the blocks after a merge as well, reducing or not: their tokens now have sizes
    (proportional attention)."""
    for index in range(method.layers[0], method.geometry.depth) if method.layers else ():
        swap_class(blocks[index], block_class)
        blocks[index].token_reduction = method
        blocks[index].token_reduction_index = index


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
    # Finetuning (docs/methods.md#training-summary): the paper's recipe settings where they differ from the
    # common recipe of bench/training/recipe.py (loss weights, distillation, frozen parameters, ...).
    finetune_defaults: ClassVar[dict[str, Any]] = {}
    # Whether `keep_ratio` may change between forwards (a keep-rate warm-up): the counts are computed
    # from it at forward time rather than fixed when the method is built.
    live_keep_ratio: ClassVar[bool] = False
    # The model families the method patches (`Geometry.family`): "vit" (methods.geometry), "swin" (methods.swin).
    families: ClassVar[tuple[str, ...]] = ("vit",)
    # Token counts that differ per image (ATS): `schedule()` is an upper bound, the per-image counts of a
    # traced forward are in `image_schedules()` (docs/methods.md#ats-counts-and-cost).
    adaptive: ClassVar[bool] = False
    # Raised when the method's outputs change for the same configuration (a fixed algorithm): job keys
    # include it when non-zero, so records made by an earlier revision are recomputed, not reused.
    revision: ClassVar[int] = 0

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
    def layers_for(cls, geometry, options: dict) -> tuple[int, ...]:
        """The default layers on this model: `resolve_layers(depth)`, unless the method reads more of the
        model than its depth (the Swin methods read the stage layout)."""
        return cls.resolve_layers(geometry.depth, options)

    @classmethod
    def refusal(cls, geometry) -> str | None:
        """Why this method cannot run on a model of this geometry (its family and CLS token already
        checked by `build`), or None. The base: nothing more to check."""
        return None

    @classmethod
    def canonical_config(cls, depth: int, layers: Sequence[int] | None, options: dict) -> "CanonicalConfig":
        """One spelling per configuration: layers None when they are the default ones for `depth` and
        the options, and only the options that differ from their defaults (values coerced)."""
        opts = validate_options(cls.options, options, cls.name)
        chosen = validate_layers(cls, layers, depth, opts)
        differing = {k: v for k, v in opts.items() if v != cls.options[k].coerce(k, cls.options[k].default)}
        return CanonicalConfig(None if chosen == cls.resolve_layers(depth, opts) else chosen, differing)

    def schedule(self) -> Schedule:
        """Token counts per block. The base: nothing is reduced (`geometry.stock_tokens`)."""
        return Schedule(tuple(self.geometry.stock_tokens(i) for i in range(self.geometry.depth)))

    def block_macs(self, index: int, tokens: BlockTokens) -> int:
        """Analytic MACs of block `index`; override to ADD the method's own overhead (predictors,
        scoring, matching) to `plain_block_macs(index, tokens)` (`standard_block_macs(n_attn, n_mlp)`
        on a ViT), which must stay the plain cost of the block on its scheduled tokens:
        `total_macs(include_overhead=False)` relies on it."""
        return self.plain_block_macs(index, tokens)

    def plain_block_macs(self, index: int, tokens: BlockTokens) -> int:
        """What the stock block costs on the scheduled tokens (docs/methods.md#block-cost), read from the
        geometry: `standard_block_macs(n_attn, n_mlp)` on a ViT; windows, keys and the stage's width on a
        Swin (methods.swin.swin_block_macs)."""
        return self.geometry.block_macs(index, tokens)

    def total_macs(self, include_overhead: bool = True, schedule: Schedule | None = None) -> int:
        """Stem + blocks + head (an attention-pool head on the tokens leaving the last block), plus the
        geometry's fixed parts (Swin's PatchMerging). Without overhead: only what stock blocks on the
        scheduled tokens cost, the convention of papers that leave a method's own overhead out
        (methods.flops). `schedule`: another schedule than `schedule()` (one image's, `image_schedules`)."""
        g, sched = self.geometry, schedule or self.schedule()
        cost = self.block_macs if include_overhead else self.plain_block_macs
        blocks = sum(cost(i, bt) for i, bt in enumerate(sched.blocks))
        return g.stem_macs + blocks + g.fixed_macs + g.head_cost(sched.blocks[-1].n_out)

    def stage_macs(self, include_overhead: bool = True, schedule: Schedule | None = None) -> list[int] | None:
        """Hierarchical models: MACs of the blocks of each stage, with the PatchMerging that starts it;
        None for a flat ViT (one stage: `total_macs` minus stem and head)."""
        stages = getattr(self.geometry, "stages", None)
        if stages is None:
            return None
        sched = schedule or self.schedule()
        cost = self.block_macs if include_overhead else self.plain_block_macs
        return [stage.merge_macs + sum(cost(i, sched.blocks[i]) for i in stage.blocks) for stage in stages]

    # --- per-image counts (adaptive methods) ----------------------------------------------------
    def image_schedules(self) -> list[Schedule] | None:
        """One schedule per image of the last forward run with tracing on (or in training). None: the
        method's counts do not depend on the image, every image follows `schedule()`."""
        return None

    def macs_per_image(self, include_overhead: bool = True) -> torch.Tensor | None:
        """(B,) int64 analytic MACs of every image of the last traced forward (`image_schedules`), each
        as if run alone; None for a method whose counts do not depend on the image."""
        schedules = self.image_schedules()
        if schedules is None:
            return None
        return torch.tensor([self.total_macs(include_overhead, schedule=s) for s in schedules], dtype=torch.int64)

    def tokens_per_image(self) -> torch.Tensor | None:
        """(B, depth) int64: the tokens every block attends over (n_attn), per image of the last traced
        forward; None for a method whose counts do not depend on the image."""
        schedules = self.image_schedules()
        if schedules is None:
            return None
        return torch.tensor([list(s.tokens_attn) for s in schedules], dtype=torch.int64)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """New modules the method adds (e.g. DynamicViT predictors), by name on the model."""
        return {}

    def training_losses(self, settings: dict, features: torch.Tensor,
                        teacher_features: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The method's own loss terms for the last training forward, unweighted; the finetune job weighs
        term `t` by `settings[f"{t}_weight"]`. `features` are the student's final normed tokens,
        `teacher_features` the unpatched teacher's (None without distillation). The base: none."""
        return {}

    @property
    def aux(self) -> dict[str, dict[int, torch.Tensor]]:
        return self.state.aux

    # --- patching ------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> None:
        """Patch `model` in place. The default swaps each reduction layer's block class via
        `patch_block`; methods that need model-level state override this."""
        blocks = self.geometry.blocks_of(model)
        for i in self.layers:
            self.patch_block(blocks[i], i)

    def patch_block(self, block: nn.Module, index: int) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-friendly description for records and reports."""
        out = dict(
            method=self.name, keep_ratio=self.keep_ratio, layers=list(self.layers),
            options=dict(self.opts), count_rule=self.count_rule,
            tokens_per_block=list(self.schedule().tokens_attn),
        )
        if self.geometry.family != "vit":
            out["family"] = self.geometry.family
        if self.adaptive:  # said where the counts are read, so that nobody takes the bound for the count
            out["adaptive"] = True
            out["notes"] = list(out.get("notes", [])) + [
                "token counts vary per image: the FLOPs job's GMACs are a mean over the eval images; "
                "tokens_per_block and the static count are upper bounds"]
        return out


def validate_layers(cls: type[Method], layers: Sequence[int] | None, depth: int, options: dict,
                    geometry=None) -> tuple[int, ...]:
    """Block indices, sorted; the method's default ones (for these validated options and, when given,
    this model's layout) when None."""
    if layers is None:
        return cls.resolve_layers(depth, options) if geometry is None else cls.layers_for(geometry, options)
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


class CanonicalConfig(NamedTuple):
    layers: tuple[int, ...] | None  # None: the method's default layers for that depth and options
    options: dict  # only the options that differ from their defaults, coerced
