"""Training data of a finetune job, in a deterministic, resumable order.

Batch `i` of epoch `e` is a function of (seed, e, i) alone: the order of an epoch is a permutation drawn
from a generator seeded with (seed, e), and the augmentation of a batch from one seeded with
(seed, e, i). A job resumed at any step therefore sees exactly the batches an uninterrupted one would,
with no data-loader state to save, and a DDP process takes its slice of the very same global batch.

- The embedded default (`fashion-mnist-train`): the shipped 20,000-image subset, kept as one tensor,
  augmented on the fly with a shift of up to 2 pixels and a horizontal flip (the recipe the embedded
  model was trained with, scripts/train_embedded.py).
- An ImageNet-style folder: timm's training transform for the model (`create_transform(is_training=True)`
  with the model's data config), images read per batch.
"""
from __future__ import annotations

import random

import numpy as np
import timm.data
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from .. import data
from .recipe import EMBEDDED_TRAIN

SHIFT_PIXELS, FLIP_PROBABILITY = 2, 0.5


def shift_and_flip(images: torch.Tensor, generator: torch.Generator, pad: int = SHIFT_PIXELS,
                   flip: float = FLIP_PROBABILITY) -> torch.Tensor:
    """Random shift by up to `pad` pixels and horizontal flip, batched, for (B, 1, H, W) normalised images.
    The border is padded with 0 in normalised units (the data mean), as the embedded model was trained."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    flipped = torch.rand(b, generator=generator) < flip
    out[flipped] = out[flipped].flip(-1)
    return out


def normalise(images_u8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float, normalised."""
    return (images_u8.float().div(255.0).unsqueeze(1) - mean) / std


class TrainSet:
    """Batches by (epoch, index); `len(self)` images, `num_classes` labels."""

    def __init__(self, source: str, model: torch.nn.Module, seed: int, limit: int | None = None, workers: int = 0):
        self.source, self.seed, self.workers = source, seed, workers
        config = data.data_config(model)
        if source == EMBEDDED_TRAIN:
            images, labels = data.load_fashion_mnist("train")
            self.images = normalise(images, config["mean"][0], config["std"][0])
            self.labels = labels
            self.folder = None
            self.num_classes = len(data.FASHION_MNIST_CLASSES)
        else:
            root = data.check_folder(source)
            transform = timm.data.create_transform(**dict(config, is_training=True))
            mode = {1: "L", 3: "RGB"}[config["input_size"][0]]
            self.folder = ImageFolder(str(root), transform=transform,
                                      loader=lambda path: data.load_image(path, mode))
            self.labels = torch.tensor(self.folder.targets)
            self.images = None
            self.num_classes = len(self.folder.classes)
        if limit is not None:
            self.labels = self.labels[:limit]
            if self.images is not None:
                self.images = self.images[:limit]

    def __len__(self) -> int:
        return len(self.labels)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Whole batches only: every step sees a full global batch (a DDP process its equal slice)."""
        return max(1, len(self) // batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(_seed(self.seed, epoch)))

    def batches(self, epoch: int, start: int, batch_size: int, part: slice = slice(None)):
        """Batches `start`, `start + 1`, ... of `epoch` (their slice `part`, for one DDP process), as
        (images, labels); every one the same whichever step the iteration started at."""
        order, steps = self.order(epoch), self.steps_per_epoch(batch_size)
        if self.images is not None:
            for index in range(start, steps):
                full = order[index * batch_size:(index + 1) * batch_size]
                generator = torch.Generator().manual_seed(_seed(self.seed, epoch, index))
                # the augmentation of the whole global batch, then the slice: the same for any process count
                yield shift_and_flip(self.images[full], generator)[part], self.labels[full][part]
            return
        plan = [[(int(i), _seed(self.seed, epoch, index, position))
                 for position, i in enumerate(order[index * batch_size:(index + 1) * batch_size])][part]
                for index in range(start, steps)]
        loader = DataLoader(_SeededSamples(self.folder), batch_sampler=plan, num_workers=self.workers)
        yield from loader


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class _SeededSamples(Dataset):
    """Folder samples whose random transform is seeded by their (epoch, step, position): the same image
    is augmented the same way in any worker process and after any resume."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        random.seed(seed)
        torch.manual_seed(seed)  # timm's transforms draw from torch's and python's global generators
        return self.folder[index]
