"""Random keep-K: the Top-K baseline with a random ranking instead of the CLS attention (docs/methods.md#random-keep-k).

Same layers and count rule as Top-K (ceil(keep_ratio * current image tokens), dropped, no fusion),
so it needs no CLS token. The ranking at reduction block `l` is one fixed random permutation of the
current image-token slots, drawn from numpy's SeedSequence of (seed, l) and shared by every sample:
the output is reproducible for a given `seed`, independent of the other samples in the batch (and of
the batch size, the device and torch's global RNG), and costs nothing per sample. The kept tokens
are in that random order, as Top-K keeps them in score order.
"""
from __future__ import annotations

import numpy as np
import torch

from .registry import register
from .errors import MethodError
from .evit import TokenPruning
from .options import Option


@register
class RandomKeep(TokenPruning):
    name = "random"
    summary = "keep a seeded random subset of the image tokens; drop the rest"
    needs_cls = False
    options = {"seed": Option(0, int, "seed of the per-layer random ranking")}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.opts["seed"] < 0:
            raise MethodError(f"option seed={self.opts['seed']} is negative; valid: an integer >= 0")
        # Drawn now for the scheduled counts, so a forward (and a torch.compile graph) only looks them up.
        prefix, blocks = self.geometry.num_prefix, self.schedule().blocks
        self._rankings: dict[tuple, torch.Tensor] = {
            (i, blocks[i].n_in - prefix, torch.device("cpu")): self.ranking(i, blocks[i].n_in - prefix)
            for i in self.layers if blocks[i].action}

    def ranking(self, index: int, num_image: int) -> torch.Tensor:
        """(num_image,) distinct float priorities for block `index`; the top ones are kept."""
        rng = np.random.default_rng([self.opts["seed"], index])
        return torch.from_numpy(rng.permutation(num_image).astype(np.float32))

    @torch.compiler.disable
    def _draw(self, index: int, num_image: int, device: torch.device) -> torch.Tensor:
        # Kept out of torch.compile graphs: numpy's generator cannot be traced (dynamo fails on the
        # from_numpy tensor under inference_mode), and this runs once per (block, count, device) anyway.
        return self.ranking(index, num_image).to(device)

    def token_scores(self, attn, q, k, index):
        batch, num_image = q.shape[0], int(k.shape[2]) - self.geometry.num_prefix
        key = (index, num_image, q.device)
        if key not in self._rankings:
            self._rankings[key] = self._draw(index, num_image, q.device)
        return self._rankings[key].expand(batch, -1)
