"""Random keep-K: the Top-K baseline with a random ranking instead of the CLS attention (docs/methods.md#random-keep-k).

Same layers and count rule as Top-K (ceil(keep_ratio * current image tokens), dropped, no fusion),
so it needs no CLS token. Every sample gets its own uniformly random subset at every reduction block:

- eval: the ranking of sample `n` at block `l` is a counter-based hash of (seed, l, n, slot), where `n`
  counts the samples this patched model has ranked in eval mode. The draw is reproducible for a given
  `seed` and independent of the batch size, the other samples, the device and torch's RNG; an
  accuracy job's image i always sees the same subset.
- training: fresh draws from torch's global RNG every step, which the finetune loop seeds and
  checkpoints, so a resumed run draws what an uninterrupted one would.

Why per sample: one ranking shared by every image is a fixed set of positions, an input-independent
spatial prior that a finetuned model learns to route information into; on centred, aligned images it
beat every pruning method, which is not what a random control should measure
(docs/methods.md#random-keep-k). The kept tokens are in the random order, as Top-K keeps them in score
order.
"""
from __future__ import annotations

import torch

from .errors import MethodError
from .evit import TokenPruning
from .options import Option
from .registry import register

_LOW32 = 0xFFFFFFFF


def _times(h, c: int):
    """(h * c) mod 2**32 for 32-bit h (a Python int or an int64 tensor): split into 16-bit halves so
    that no intermediate leaves int64's range."""
    return ((h & 0xFFFF) * c + (((h >> 16) * (c & 0xFFFF)) << 16)) & _LOW32


def mix32(h):
    """A bijection of the 32-bit integers with full avalanche (the "lowbias32" finaliser), applied
    elementwise to a Python int or an int64 tensor."""
    h = h ^ (h >> 16)
    h = _times(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _times(h, 0x846CA68B)
    return h ^ (h >> 16)


@register
class RandomKeep(TokenPruning):
    name = "random"
    summary = "keep a seeded random subset of the image tokens per sample; drop the rest"
    needs_cls = False
    revision = 1  # 0 drew one ranking shared by every sample: its records are not reused
    options = {"seed": Option(0, int, "seed of the per-sample random rankings")}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        seed = self.opts["seed"]
        if not 0 <= seed <= _LOW32:
            raise MethodError(f"option seed={seed} is out of range; valid: an integer from 0 to {_LOW32}")
        self._layer_keys = {i: mix32(mix32(seed) ^ i) for i in self.layers}

    def patch_block(self, block, index: int) -> None:
        super().patch_block(block, index)
        if index == self.layers[0]:
            # The eval stream position. A buffer: it follows .to(device), and torch.compile sees a
            # mutated tensor rather than a Python constant that changes every batch. Not persistent:
            # checkpoints stay those of the stock model.
            block.register_buffer("random_samples_seen", torch.zeros((), dtype=torch.int64), persistent=False)
            self._stream_block = block

    def restart_stream(self, first_sample: int = 0) -> None:
        """Rank the next eval sample as sample `first_sample` (a fresh `methods.apply` starts at 0)."""
        self._stream_block.random_samples_seen.fill_(first_sample)

    def sample_ranks(self, first_sample: torch.Tensor, batch: int, index: int, num_image: int) -> torch.Tensor:
        """(batch, num_image) int64 distinct priorities of eval samples first_sample, first_sample + 1,
        ... at block `index`; the highest are kept. Distinct because mix32 is a bijection."""
        device = first_sample.device
        samples = (first_sample + torch.arange(batch, device=device)) & _LOW32
        per_sample = mix32(samples ^ self._layer_keys[index])
        slots = torch.arange(num_image, device=device)
        return mix32(mix32(per_sample[:, None] ^ slots))

    def token_scores(self, attn, q, k, index):
        batch, num_image = q.shape[0], int(k.shape[2]) - self.geometry.num_prefix
        if attn.training:
            return torch.rand(batch, num_image, device=q.device)
        carry = self.state.carry  # cleared by the first reduction block of every pass
        if "first_sample" not in carry:
            seen = self._stream_block.random_samples_seen
            carry["first_sample"] = seen.clone()
            seen.add_(batch)
        return self.sample_ranks(carry["first_sample"], batch, index, num_image)
