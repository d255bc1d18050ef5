"""The unpatched baseline, so that callers never special-case it."""
from __future__ import annotations

from .base import Method
from .registry import register


@register
class NoReduction(Method):
    name = "none"
    aliases = ("baseline", "base")
    summary = "the stock model: every block sees every token"
    families = ("vit", "swin")

    def patch(self, model) -> None:  # nothing to change
        return None
