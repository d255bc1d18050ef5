"""What a block processes: token counts per block (`BlockTokens`) and for a whole model (`Schedule`).

Plain values with no behaviour, so that the geometry of a model (methods.geometry, methods.swin) and the
method interface (methods.base) can both speak of them without importing each other."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockTokens:
    """Token counts one block processes; all counts include the prefix tokens."""

    n_in: int  # tokens in the stream entering the block
    n_attn: int  # tokens taking part in attention (queries and keys)
    n_mlp: int  # tokens going through the MLP
    n_out: int  # tokens leaving the block
    action: str = ""  # "", "idle", "prune", "fuse", "merge", "sample", "fast": what the block does to the rest
    windows: int = 1  # attention groups the n_attn queries (and the keys) are split into equally (Swin windows)
    n_kv: int = 0  # tokens serving as keys and values when they are not the n_attn queries (0: the same tokens)
    stage: int = 0  # hierarchical models: the stage of the block (its width and token grid)

    @property
    def keys(self) -> int:
        """Tokens serving as keys and values (all windows together)."""
        return self.n_kv or self.n_attn


@dataclass(frozen=True)
class Schedule:
    blocks: tuple[BlockTokens, ...]

    @property
    def tokens_out(self) -> tuple[int, ...]:
        return tuple(b.n_out for b in self.blocks)

    @property
    def tokens_attn(self) -> tuple[int, ...]:
        return tuple(b.n_attn for b in self.blocks)

    @property
    def stages(self) -> tuple[int, ...]:
        """The stage of every block (all 0 for a flat ViT)."""
        return tuple(b.stage for b in self.blocks)
