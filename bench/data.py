"""Evaluation data: the embedded Fashion-MNIST default and ImageNet-style class folders."""
from __future__ import annotations

import gzip
import os
from functools import partial
from pathlib import Path

import numpy as np
import timm.data
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .spec import EMBEDDED_DATA

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


# ---------------------------------------------------------------------------------------------
# Eval datasets: images through the model's own timm eval transform, in a fixed order.

DATA_HINT = f"valid: {EMBEDDED_DATA!r} or an ImageNet-style folder (one sub-folder of images per class)"


class FashionMNISTImages(Dataset):
    """Fashion-MNIST images handed to a torchvision/timm transform as PIL images, like ImageFolder's."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mode: str, transform):
        self.images, self.targets = images.numpy(), labels.tolist()
        self.mode, self.transform = mode, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])  # (28, 28) uint8 -> mode 'L'
        if image.mode != self.mode:
            image = image.convert(self.mode)
        return self.transform(image), self.targets[index]


class EvalSet(Subset):
    """The images a job evaluates, in order, with the transform config and class names they used."""

    def __init__(self, dataset: Dataset, indices: list[int], data_config: dict, classes, source: str):
        super().__init__(dataset, indices)
        self.data_config = data_config
        self.classes = list(classes)
        self.targets = [dataset.targets[i] for i in indices]
        self.source = source


def eval_dataset(data: str, model: torch.nn.Module, limit: int | None = None) -> EvalSet:
    """(image tensor, label) pairs of `data` through `model`'s timm eval transform.

    `data` is "fashion-mnist" (the test split of the embedded default) or an ImageNet-style folder
    (torchvision ImageFolder: sorted class folders give the label ids). Grey and RGB images are
    converted to the model's input channels. `limit` keeps the first N images of the dataset's order:
    file order for Fashion-MNIST; for folders, classes interleaved (1st image of every class, then
    every 2nd, ...) so that a prefix covers the classes evenly.
    """
    config = data_config(model)
    transform = timm.data.create_transform(**config)
    mode = _pil_mode(config["input_size"][0])
    if data == EMBEDDED_DATA:
        images, labels = load_fashion_mnist("test")
        dataset = FashionMNISTImages(images, labels, mode, transform)
        order = list(range(len(dataset)))
        source = str(fashion_mnist_dir(download=False))
    else:
        root = check_folder(data)
        dataset = ImageFolder(str(root), transform=transform, loader=partial(load_image, mode=mode),
                              allow_empty=True)  # an empty class keeps its label id; check_folder saw images
        order = class_interleaved(dataset.targets)
        source = str(root)
    return EvalSet(dataset, order[:_check_limit(limit)], config, dataset.classes, source)


def check_data(data: str) -> str:
    """Pre-flight without a model: the data can be found; returns a one-line description of it."""
    if data == EMBEDDED_DATA:
        folder = fashion_mnist_dir()
        return f"Fashion-MNIST test split ({len(load_fashion_mnist('test', folder)[1])} images) from {folder}"
    root = check_folder(data)
    with os.scandir(root) as scan:
        classes = [entry.name for entry in scan if entry.is_dir()]
    return f"{root}: {len(classes)} class folders"


def check_folder(data) -> Path:
    """An ImageNet-style folder, or a DataError naming what is wrong with it."""
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"data folder {str(data)!r} does not exist; {DATA_HINT}")
    if not root.is_dir():
        raise DataError(f"data {str(data)!r} is a file, not a folder; {DATA_HINT}")
    with os.scandir(root) as scan:
        entries = list(scan)
    if not entries:
        raise DataError(f"data folder {str(data)!r} is empty; {DATA_HINT}")
    class_dirs = sorted((e for e in entries if e.is_dir()), key=lambda e: e.name)
    if not class_dirs:
        example = sorted(e.name for e in entries)[0]
        raise DataError(f"data folder {str(data)!r} has no class sub-folders (only files, e.g. {example!r}); "
                        f"{DATA_HINT}")
    if not any(_has_image(d.path) for d in class_dirs):
        raise DataError(f"data folder {str(data)!r} has {len(class_dirs)} class folders but no images "
                        f"({' '.join(IMG_EXTENSIONS)}); {DATA_HINT}")
    return root.resolve()


def _has_image(folder: str) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):  # ImageFolder also looks in sub-folders
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def data_config(model: torch.nn.Module) -> dict:
    """timm's eval transform config of `model` (crop_pct, interpolation, mean/std, input_size).

    The pretrained config does not follow `img_size`/`in_chans` overrides, so the input size is the
    one the model was built for; channel statistics are averaged when the channel count changed."""
    from .models import input_size

    config = timm.data.resolve_data_config({}, model=model)
    built = input_size(model)
    if tuple(config["input_size"]) != built:
        args = dict(input_size=built)
        if len(config["mean"]) != built[0]:
            args.update(mean=(float(np.mean(config["mean"])),), std=(float(np.mean(config["std"])),))
        config = timm.data.resolve_data_config(args, model=model)
    return config


def load_image(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def class_interleaved(targets: list[int]) -> list[int]:
    """Indices ordered by rank within their class, then class: a prefix is class-balanced."""
    rank, seen = [], {}
    for label in targets:
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    return sorted(range(len(targets)), key=lambda i: (rank[i], targets[i], i))


def _pil_mode(in_chans: int) -> str:
    modes = {1: "L", 3: "RGB"}
    if in_chans not in modes:
        raise DataError(f"the model takes {in_chans} input channels; valid: 1 (grey) or 3 (RGB)")
    return modes[in_chans]


def _check_limit(limit) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DataError(f"image limit {limit!r} is not valid; valid: an integer >= 1 (or no limit)")
    return limit
