"""The datasets: MoCo's image folders, Fashion-MNIST from its IDX files, and the held-out and random subsets.

Every bad input raises ``FileNotFoundError`` or ``ValueError`` with the fix in the message,
so ``main_moco_mgd.py`` refuses the run before any process starts. Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.datasets
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset


logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("imagefolder", "fashion-mnist")

# PIL raises SyntaxError and ValueError too for some malformed headers.
_UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


class ImageFolderDataset(torchvision.datasets.ImageFolder):
    """``ImageFolder`` that skips unreadable images instead of ending a multi-day run.

    A file that cannot be decoded is logged (WARNING, with its path) and replaced by the
    next readable sample. Too many of them means a broken dataset, not bad luck, so past
    ``max_skipped`` it raises. Each DataLoader worker holds its own copy of the dataset, so
    ``num_skipped`` and the limit are **per worker process**.

    Args:
        root: a folder of class folders, ``root/CLASS/*.jpg``.
        transform: applied to each PIL image.
        max_skipped: how many unreadable images one process may skip before raising.
    """

    def __init__(self, root: str, transform: Callable | None = None, max_skipped: int = 100):
        super().__init__(root, transform=transform)
        self.max_skipped = max_skipped
        self.num_skipped = 0

    def __getitem__(self, index: int):
        """``(transform(image), class_index)`` at ``index``, or at the next readable index (wrapping).

        Raises ``RuntimeError`` once more than ``max_skipped`` images were skipped in this process.
        """
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = self.loader(path)
            except _UNREADABLE as exc:
                self.num_skipped += 1
                logger.warning(f"skipping unreadable image {path}: {type(exc).__name__}: {exc} "
                               f"({self.num_skipped} skipped in this process)")
                if self.num_skipped > self.max_skipped:
                    raise RuntimeError(
                        f"skipped {self.num_skipped} unreadable images, more than max_skipped={self.max_skipped} "
                        f"(per loader process); last bad file: {path}. Check the dataset, or raise the limit "
                        f"(--max-skipped-images)") from exc
                continue
            # Transforms run outside the try: an error there is a bug, not a bad file.
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target
        raise RuntimeError(f"no readable image in {self.root}: all {len(self.samples)} files failed to load; "
                           f"check the dataset")


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: uint8, 3 dims; 0x0801: uint8, 1 dim


def _idx_name(prefix: str, kind: str) -> str:
    return f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"


def _idx_path(root: str, prefix: str, kind: str) -> str | None:
    """The plain or gzipped IDX file ``PREFIX-KIND-idxN-ubyte[.gz]`` in ``root``, if there."""
    base = os.path.join(root, _idx_name(prefix, kind))
    return next((path for path in (base, base + ".gz") if os.path.isfile(path)), None)


def _read_idx(path: str, kind: str) -> np.ndarray:
    """Parse one uint8 IDX file; raises ``ValueError`` naming ``path`` if it is not one."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # a truncated or fake .gz
        raise ValueError(f"cannot read the Fashion-MNIST file {path}: {exc}") from exc
    ndim = 3 if kind == "images" else 1
    header = 4 * (1 + ndim)  # big-endian int32 magic, then one int32 per dimension
    magic, *dims = np.frombuffer(raw[:header].ljust(header, b"\0"), dtype=">i4").tolist()
    if magic != _IDX_MAGIC[kind]:
        raise ValueError(f"{path} is not an IDX {kind} file: magic number {magic}, expected {_IDX_MAGIC[kind]}")
    expected = header + int(np.prod(dims))
    if min(dims) < 0 or len(raw) != expected:
        raise ValueError(f"{path}: header says dims {dims} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST read from its IDX files (plain or gzipped), as RGB PIL images.

    The uint8 array stays in memory (47 MB for the training set); PIL images are made per
    item. The grey image is replicated to 3 channels so that ImageNet networks and MoCo's
    colour augmentations apply unchanged.

    Args:
        root: directory holding ``train-*-ubyte[.gz]`` / ``t10k-*-ubyte[.gz]``.
        train: the 60,000 training images, else the 10,000 test images.
        transform: applied to each RGB PIL image.
    """

    def __init__(self, root: str, train: bool = True, transform: Callable | None = None):
        self.root, self.train, self.transform = root, train, transform
        self.classes = list(FASHION_MNIST_CLASSES)
        prefix = "train" if train else "t10k"
        paths = {kind: _idx_path(root, prefix, kind) for kind in _IDX_MAGIC}
        missing = [_idx_name(prefix, kind) + "[.gz]" for kind, path in paths.items() if path is None]
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST: {', '.join(missing)} not found in {root}")
        self.images = _read_idx(paths["images"], "images")
        labels = _read_idx(paths["labels"], "labels")
        if len(labels) != len(self.images):
            raise ValueError(f"{paths['labels']} has {len(labels)} labels but {paths['images']} "
                             f"has {len(self.images)} images")
        if len(labels) and labels.max() >= len(self.classes):
            raise ValueError(f"{paths['labels']} holds label {labels.max()}, Fashion-MNIST has 10 classes")
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        """Returns: ``(image, label)``, ``image`` an RGB PIL image passed through ``transform``."""
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def find_fashion_mnist(root: str | None = None) -> str:
    """The directory to read Fashion-MNIST from; never downloads.

    Args:
        root: a directory that may hold ``train-images-idx3-ubyte[.gz]`` and its labels.

    Returns:
        ``root`` (default :data:`FASHION_MNIST_DIR`) if it holds the training IDX files;
        otherwise raises ``FileNotFoundError`` saying how to install them.
    """
    def has_train_files(directory: str) -> bool:
        return all(_idx_path(directory, "train", kind) for kind in _IDX_MAGIC)

    # A directory the user named is never silently swapped for the system copy: a typo
    # would otherwise train on other data than asked for.
    candidate = root or FASHION_MNIST_DIR
    if has_train_files(candidate):
        return candidate
    looked = candidate
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {looked}: install Debian's package: sudo apt-get install "
        f"dataset-fashion-mnist, or pass a directory holding train-images-idx3-ubyte.gz, "
        f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")


def _image_folder(data: str, split: str, transform: Callable | None, max_skipped: int) -> ImageFolderDataset:
    """``DATA/SPLIT/CLASS/*`` as an :class:`ImageFolderDataset`, with the fix in every error."""
    if not data:
        raise FileNotFoundError(f"no data directory given: pass DATA holding {split}/CLASS/*.jpg")
    if not os.path.isdir(data):
        raise FileNotFoundError(f"data directory {data!r} does not exist")
    folder = os.path.join(data, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no {split}/ folder in {data}: expected DATA/{split}/CLASS/*.jpg "
                                f"(the ImageNet layout, as in MoCo)")
    if not any(entry.is_dir() for entry in os.scandir(folder)):
        raise ValueError(f"{folder} has no class folders: expected {folder}/CLASS/*.jpg")
    try:
        return ImageFolderDataset(folder, transform=transform, max_skipped=max_skipped)
    except FileNotFoundError as exc:  # torchvision's "found no valid file" for folders without images
        raise ValueError(f"no images in the class folders of {folder}: {exc}") from exc


VAL_HOLDOUT_HELP = ("hold out this fraction of the training images (stratified by class, the same split for every "
                    "run and seed) as the validation set: training and --max-images draw from the rest, and "
                    "every evaluation scores the held-out images instead of the val/test split (0: off). "
                    "Choose hyperparameters with it; score the test set once, without it")

# The held-out validation images are the same for every run and seed: the split is a property
# of the study, not of a run.
VAL_HOLDOUT_SEED = 0


class PartOfTrain(Subset):
    """A part of a labelled training set that keeps its ``classes`` and its ``targets``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        super().__init__(dataset, list(indices))
        self.classes = list(getattr(dataset, "classes", []))
        self.targets = [dataset.targets[i] for i in self.indices]


def holdout_split(targets: Sequence[int], fraction: float, seed: int = VAL_HOLDOUT_SEED
                  ) -> tuple[list[int], list[int]]:
    """Stratified split of a training set into (kept, held-out) indices, both sorted.

    Each class gives ``round(fraction * its size)`` images (at least one, and never all of them)
    to the held-out part, drawn from a generator seeded with ``seed`` alone.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-holdout {fraction}: must be > 0 and < 1 (the fraction of the training images "
                         "held out as the validation set, e.g. 0.1; 0 scores the val/test split instead)")
    labels = torch.as_tensor(list(targets), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    held = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    held_out = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    return keep.nonzero().flatten().tolist(), held_out.tolist()


def build_dataset(name: str, data: str | None, split: str = "train", transform: Callable | None = None,
                  max_skipped: int = 100, val_holdout: float = 0.0) -> Dataset:
    """The dataset a run reads, checked before any training starts.

    Args:
        name: one of :data:`DATASETS`.
        data: for ``imagefolder`` the root holding ``SPLIT/CLASS/*.jpg``; for ``fashion-mnist``
            the IDX directory, or ``""``/``None`` for :data:`FASHION_MNIST_DIR`.
        split: ``train``; ``val`` (image folders), or ``val``/``test`` (Fashion-MNIST's t10k files).
        transform: applied to each PIL image.
        max_skipped: unreadable images one process may skip (image folders only).
        val_holdout: if positive, this fraction of the training images, stratified by class
            (:func:`holdout_split`), is the validation set: ``train`` is the rest, and ``val`` or
            ``test`` is the held-out part, so hyperparameters are chosen without the test set.

    Returns:
        A dataset of ``(transform(image), label)``. Raises ``FileNotFoundError`` for missing
        directories or files, ``ValueError`` for an unknown name or split, or a folder without
        classes or images.
    """
    if val_holdout:
        train_set = build_dataset(name, data, "train", transform, max_skipped)
        kept, held_out = holdout_split(train_set.targets, val_holdout)
        return PartOfTrain(train_set, kept if split == "train" else held_out)
    if name == "imagefolder":
        return _image_folder(data or "", split, transform, max_skipped)
    if name == "fashion-mnist":
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown Fashion-MNIST split {split!r}: choose train, val or test")
        return FashionMNIST(find_fashion_mnist(data or None), train=split == "train", transform=transform)
    raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def evaluated_on(val_holdout: float) -> str:
    """What the evaluation scores, in words for logs and ``result.json``."""
    if val_holdout:
        return (f"validation: {val_holdout:g} of the training images held out (stratified, split seed "
                f"{VAL_HOLDOUT_SEED}); training used the rest")
    return "the val/test split"


def random_subset(dataset: Dataset, num_images: int, seed: int) -> Subset:
    """A random subset of ``min(num_images, len(dataset))`` distinct images.

    Used for the images of MGD's matching updates, and for ``--max-images`` runs.

    Drawn from a generator seeded with ``seed`` alone, so every rank draws the same subset
    (each then reads its own shard through a DistributedSampler).

    Args:
        dataset: the dataset to draw from.
        num_images: how many images to draw (at least 1).
        seed: the seed of the draw, the same on every rank.

    Returns:
        A ``Subset`` whose indices are sorted ascending, for more sequential reads.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    generator = torch.Generator().manual_seed(seed)
    count = min(num_images, len(dataset))
    indices = torch.randperm(len(dataset), generator=generator)[:count].sort().values
    return Subset(dataset, indices.tolist())


def check_same_classes(train_set: Dataset, val_set: Dataset) -> None:
    """Refuse a train/val pair whose class lists differ (labels would mean different things).

    Raises:
        ValueError: naming the classes found only in one of them.
    """
    train_classes = list(getattr(train_set, "classes", []))
    val_classes = list(getattr(val_set, "classes", []))
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ValueError(
            f"the classes of train/ and val/ differ (only in train: {only_train[:10]}, only in val: "
            f"{only_val[:10]}{', or the same names in another order' if not only_train and not only_val else ''}): "
            f"both splits need the same class folders"
        )
