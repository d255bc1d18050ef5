"""Evaluation data: the embedded Fashion-MNIST default and ImageNet-style class folders."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Debian's dataset-fashion-mnist package, then torchvision's download folder.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_ROOT = Path(os.environ.get("TOKENBENCH_CACHE", Path.home() / ".cache" / "tokenbench"))
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(ValueError):
    """A data location the user gave (or the default) cannot be used."""


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): magic 0x0000 + dtype 0x08 (ubyte) + ndim, then big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_dir(download: bool = True) -> Path:
    """The folder holding the Fashion-MNIST IDX files: Debian's package, else torchvision's download."""
    candidates = []
    if os.environ.get("TOKENBENCH_FASHION_MNIST"):
        candidates.append(Path(os.environ["TOKENBENCH_FASHION_MNIST"]))
    candidates += [DEBIAN_FASHION_MNIST, TORCHVISION_ROOT / "FashionMNIST" / "raw"]
    for folder in candidates:
        if all(_find_idx(folder, f) for files in _SPLIT_FILES.values() for f in files):
            return folder
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(TORCHVISION_ROOT), train=False, download=True)
            FashionMNIST(str(TORCHVISION_ROOT), train=True, download=True)
        except Exception as exc:  # no network, no package: say where we looked
            raise DataError(
                "Fashion-MNIST not found in "
                + ", ".join(str(c) for c in candidates)
                + f" and torchvision could not download it ({exc}). Install Debian's "
                "'dataset-fashion-mnist' package or pass --data-dir."
            ) from exc
        return fashion_mnist_dir(download=False)
    raise DataError("Fashion-MNIST not found in " + ", ".join(str(c) for c in candidates))


def load_fashion_mnist(split: str = "test", folder: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split ('train' or 'test')."""
    if split not in _SPLIT_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; valid: {', '.join(_SPLIT_FILES)}")
    folder = Path(folder) if folder is not None else fashion_mnist_dir()
    image_file, label_file = (_find_idx(folder, stem) for stem in _SPLIT_FILES[split])
    if image_file is None or label_file is None:
        raise DataError(f"{folder} has no Fashion-MNIST {split} files")
    images, labels = _read_idx(image_file), _read_idx(label_file)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
