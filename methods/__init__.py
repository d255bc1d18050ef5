"""Token-reduction methods as patches over stock timm ViTs, behind one registry.

    import methods
    methods.available()                       # ['none', 'idle', 'evit', ...]; available("swin"): Swin ones
    methods.apply(model, "evit", keep_ratio=0.7, fuse=False)
    model.token_reduction.schedule()           # tokens per block, before any forward
    methods.canonical_config("idle", 12, layers=range(3, 12))   # (None, {}): the default spelled out

A new method is one module defining a `@register`ed `Method` subclass plus one import line below.
"""
from .base import DROPPED, FUSED, IDLE, KEPT, BlockTokens, CanonicalConfig, Method, Schedule  # noqa: F401
from .registry import (  # noqa: F401
    apply, available, build, canonical_config, canonical_name, get_method, model_geometry, register,
)
from .errors import MethodError  # noqa: F401
from .geometry import Geometry  # noqa: F401
from .options import Option  # noqa: F401

# Registration: one line per method module (import order = order in tables and --help).
from . import none  # noqa: E402,F401
from . import idle  # noqa: E402,F401
from . import evit  # noqa: E402,F401
from . import topk  # noqa: E402,F401
from . import dynamicvit  # noqa: E402,F401
from . import tome  # noqa: E402,F401
from . import random  # noqa: E402,F401
from . import pitome  # noqa: E402,F401
from . import tofu  # noqa: E402,F401
from . import mctf  # noqa: E402,F401
from . import ppt  # noqa: E402,F401
from . import zerotprune  # noqa: E402,F401
from . import ats  # noqa: E402,F401
from . import idle_swin  # noqa: E402,F401  (Swin: methods/swin.py reads the model)
from . import dynamicvit_swin  # noqa: E402,F401

from . import flops  # noqa: E402,F401  (package API: analytic MACs and the fvcore cross-check)
