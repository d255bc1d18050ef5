"""Evaluation data: the embedded Fashion-MNIST default and ImageNet-style class folders."""
from __future__ import annotations

import gzip
import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
import timm.data
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .spec import EMBEDDED_DATA

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# The embedded default's data ships with the project (bench/assets/fashion-mnist/README.md): the whole
# test split and the first 20,000 images of the train split, each file checked against its sha256.
SHIPPED_FASHION_MNIST = Path(__file__).resolve().parent / "assets" / "fashion-mnist"
SHIPPED_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    "train20k-images-idx3-ubyte.gz": "8dd254dfb93a3533453a496b8e4fa2aa5d71d50f218059cdfa411c265ef3eecd",
    "train20k-labels-idx1-ubyte.gz": "2d783d6a6842beb5ab8fb6c20fd6db40a55a723a6adb5ed7122982083dfe0369",
}
_SHIPPED_SPLITS = {
    "train": ("train20k-images-idx3-ubyte.gz", "train20k-labels-idx1-ubyte.gz"),  # a subset: the first 20,000
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# A full copy (all 60,000 training images, for scripts/train_embedded.py): the folder named by
# $TOKENBENCH_FASHION_MNIST, Debian's dataset-fashion-mnist package, or torchvision's download folder.
FULL_COPY_ENV = "TOKENBENCH_FASHION_MNIST"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_ROOT = Path(os.environ.get("TOKENBENCH_CACHE", Path.home() / ".cache" / "tokenbench"))
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_verified: set[Path] = set()  # shipped files whose sha256 matched, in this process


class DataError(ValueError):
    """A data location the user gave (or the default) cannot be used."""


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): magic 0x0000 + dtype 0x08 (ubyte) + ndim, then big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} cannot be read: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
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


def shipped_file(name: str) -> Path:
    """One of the shipped Fashion-MNIST files, its sha256 checked on first use (about 10 ms for all four)."""
    path = SHIPPED_FASHION_MNIST / name
    if path in _verified:
        return path
    restore = "restore it from the repository (git checkout -- bench/assets/fashion-mnist)"
    if not path.is_file():
        raise DataError(f"shipped Fashion-MNIST file {path} is missing; {restore}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHIPPED_SHA256[name]:
        raise DataError(f"shipped Fashion-MNIST file {path} is damaged (sha256 {digest[:12]}..., expected "
                        f"{SHIPPED_SHA256[name][:12]}..., {path.stat().st_size} bytes); {restore}")
    _verified.add(path)
    return path


def fashion_mnist_dir(download: bool = False) -> Path:
    """The folder the embedded default's data is read from: the shipped files, checked.

    Nothing is downloaded (`download` is accepted for old callers and ignored). A full copy of
    Fashion-MNIST, for training, is `full_fashion_mnist_dir()`."""
    for name in _SHIPPED_SPLITS["test"]:
        shipped_file(name)
    return SHIPPED_FASHION_MNIST


def full_fashion_mnist_dir() -> Path:
    """A folder with the full Fashion-MNIST train split (60,000 images) as Zalando's IDX files.

    $TOKENBENCH_FASHION_MNIST when set (and then only it), else Debian's dataset-fashion-mnist
    package, else torchvision's download folder; a DataError saying where to get one otherwise."""
    stems = _SPLIT_FILES["train"]
    if os.environ.get(FULL_COPY_ENV):
        folder = Path(os.environ[FULL_COPY_ENV]).expanduser()
        missing = [stem for stem in stems if _find_idx(folder, stem) is None]
        if missing:
            raise DataError(f"{FULL_COPY_ENV}={folder} has no {' and no '.join(s + '(.gz)' for s in missing)} "
                            "(Zalando's full train split files)")
        return folder
    candidates = [DEBIAN_FASHION_MNIST, TORCHVISION_ROOT / "FashionMNIST" / "raw"]
    for folder in candidates:
        if all(_find_idx(folder, stem) for stem in stems):
            return folder
    raise DataError(
        "the full Fashion-MNIST train split is not in " + " or ".join(str(c) for c in candidates)
        + "; install Debian's 'dataset-fashion-mnist' package, or put Zalando's train-images-idx3-ubyte.gz "
        f"and train-labels-idx1-ubyte.gz (https://github.com/zalandoresearch/fashion-mnist) in a folder "
        f"and set {FULL_COPY_ENV} to it")


def fashion_mnist_files(split: str = "test", folder: Path | None = None) -> tuple[Path, Path]:
    """The (images, labels) files of one split: the shipped ones (checked) unless `folder` is given."""
    if split not in _SPLIT_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; valid: {', '.join(_SPLIT_FILES)}")
    if folder is None:
        return tuple(shipped_file(name) for name in _SHIPPED_SPLITS[split])
    folder = Path(folder).expanduser()
    image_file, label_file = (_find_idx(folder, stem) for stem in _SPLIT_FILES[split])
    if image_file is None or label_file is None:
        raise DataError(f"{folder} has no Fashion-MNIST {split} files ({' and '.join(_SPLIT_FILES[split])}, "
                        "optionally .gz)")
    return image_file, label_file


def load_fashion_mnist(split: str = "test", folder: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split ('train' or 'test').

    Without `folder`: the shipped files, the same on every machine: the 10,000 test images, or for
    'train' the first 20,000 training images. With `folder` (e.g. `full_fashion_mnist_dir()`): that
    folder's IDX files under Zalando's names, all 60,000 training images for a full copy."""
    image_file, label_file = fashion_mnist_files(split, folder)
    images, labels = _read_idx(image_file), _read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{image_file.parent}: images {images.shape} do not match labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def shipped_source(split: str = "test") -> str:
    """The shipped files a split is read from, for records: repository paths with sha256 prefixes."""
    return ", ".join(f"bench/assets/fashion-mnist/{name} (sha256 {SHIPPED_SHA256[name][:12]})"
                     for name in _SHIPPED_SPLITS[split])


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


UNREADABLE = -1  # the label of an image left out by skip_unreadable; `evaluate` drops such rows
SKIP_HINT = "valid: an image file PIL can decode, or --skip-unreadable to leave such images out (the record lists them)"


class UnreadableImage(DataError):
    """An image of an eval folder that cannot be decoded; the message names the file.

    A DataLoader worker re-raises an exception as `type(exc)(text)` with the worker's traceback as the
    text; this class keeps only its own line of it, so the job's error stays one line naming the file."""

    def __init__(self, message: str):
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "Original Traceback" in message:
            ours = [line[len(marker):] for line in message.splitlines() if line.startswith(marker)]
            message = ours[-1] if ours else message.strip().splitlines()[-1]
        super().__init__(message)


class EvalSet(Subset):
    """The images a job evaluates, in order, with the transform config and class names they used.

    With `skip_unreadable`, an image that cannot be decoded becomes a blank image labelled UNREADABLE,
    which `evaluate` leaves out (batches keep their shape, so workers need not tell the main process)."""

    def __init__(self, dataset: Dataset, indices: list[int], data_config: dict, classes, source: str,
                 skip_unreadable: bool = False):
        super().__init__(dataset, indices)
        self.data_config = data_config
        self.classes = list(classes)
        self.targets = [dataset.targets[i] for i in indices]
        self.source = source
        self.skip_unreadable = skip_unreadable

    def __getitem__(self, position: int):
        try:
            return super().__getitem__(position)
        except UnreadableImage:
            if not self.skip_unreadable:
                raise
            return torch.zeros(tuple(self.data_config["input_size"])), UNREADABLE

    def __getitems__(self, positions: list[int]) -> list:
        return [self[position] for position in positions]  # Subset's batched fetch would bypass the skip

    def file_of(self, position: int) -> str:
        """The file the image at `position` of the order was read from (its index for in-memory data)."""
        samples = getattr(self.dataset, "samples", None)
        index = self.indices[position]
        return samples[index][0] if samples is not None else f"image #{index}"


def eval_dataset(data: str, model: torch.nn.Module, limit: int | None = None,
                 skip_unreadable: bool = False) -> EvalSet:
    """(image tensor, label) pairs of `data` through `model`'s timm eval transform.

    `data` is "fashion-mnist" (the test split of the embedded default) or an ImageNet-style folder
    (torchvision ImageFolder: sorted class folders give the label ids). Grey and RGB images are
    converted to the model's input channels. `limit` keeps the first N images of the dataset's order:
    file order for Fashion-MNIST; for folders, classes interleaved (1st image of every class, then
    every 2nd, ...) so that a prefix covers the classes evenly. An image that cannot be decoded raises
    UnreadableImage naming it, or with `skip_unreadable` is left out (`EvalSet`).
    """
    config = data_config(model)
    transform = timm.data.create_transform(**config)
    mode = _pil_mode(config["input_size"][0])
    if data == EMBEDDED_DATA:
        images, labels = load_fashion_mnist("test")  # the shipped files, sha256 checked
        dataset = FashionMNISTImages(images, labels, mode, transform)
        order = list(range(len(dataset)))
        source = shipped_source("test")
    else:
        root = check_folder(data)
        dataset = ImageFolder(str(root), transform=transform, loader=partial(load_image, mode=mode),
                              allow_empty=True)  # an empty class keeps its label id; check_folder saw images
        order = class_interleaved(dataset.targets)
        source = str(root)
    return EvalSet(dataset, order[:_check_limit(limit)], config, dataset.classes, source, skip_unreadable)


def check_data(data: str) -> str:
    """Pre-flight without a model: the data can be found; returns a one-line description of it."""
    if data == EMBEDDED_DATA:
        return f"Fashion-MNIST test split ({len(load_fashion_mnist('test')[1])} images) from {shipped_source('test')}"
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
    """The image at `path` in PIL `mode`; UnreadableImage naming the file if it cannot be decoded.
    Decoding is the only check that finds a truncated file, so it happens here, not in pre-flight,
    which cannot afford to decode every image of a 50,000-image folder."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert(mode)  # convert loads: a truncated file fails here, not at open
    except UnidentifiedImageError:
        reason = "not an image format PIL knows"
    except Exception as exc:  # PIL raises many types for a damaged file (OSError, SyntaxError, zlib.error, ...)
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'damaged'}"
    raise UnreadableImage(f"image {path} cannot be read ({reason}); {SKIP_HINT}")


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
