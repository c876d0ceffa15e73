"""moco_mgd.data on real files: tiny IDX files and image folders written under tmp_path."""
import logging
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from moco_mgd import data
from moco_mgd.data import datasets
from tests.helpers import cannot_run_here, write_fashion_mnist as _write_fashion, write_idx as _write_idx
from moco_mgd.data import (FASHION_MNIST_DIR, FashionMNIST, GaussianBlur, ImageFolderDataset, TwoCropsTransform,
                           build_dataset, eval_transform, find_fashion_mnist, random_subset, pretrain_transform)


def _image_folder(root, classes=2, per_class=3, size=40):
    """``root/train/classC/imgI.{png,jpg}`` of random colour images."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = os.path.join(root, "train", f"class{c}")
        os.makedirs(folder)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"img{i}.{'png' if i % 2 else 'jpg'}"))
    return str(root)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_fashion_mnist_reads_idx_files_exactly(tmp_path, gz, train):
    images, labels = _write_fashion(str(tmp_path), "train" if train else "t10k", n=5, gz=gz)
    dataset = FashionMNIST(str(tmp_path), train=train)
    assert len(dataset) == 5
    assert dataset.targets == labels.tolist()
    assert len(dataset.classes) == 10 and dataset.classes[0] == "T-shirt/top" and dataset.classes[9] == "Ankle boot"
    for i in range(5):
        image, label = dataset[i]
        assert isinstance(label, int) and label == labels[i]
        assert image.mode == "RGB" and image.size == (28, 28)
        pixels = np.asarray(image)
        for channel in range(3):
            np.testing.assert_array_equal(pixels[:, :, channel], images[i])


def test_fashion_mnist_applies_transform(tmp_path):
    _write_fashion(str(tmp_path))
    image, _ = FashionMNIST(str(tmp_path), transform=eval_transform(32))[0]
    assert image.shape == (3, 32, 32)


def test_fashion_mnist_bad_files(tmp_path):
    images, labels = _write_fashion(str(tmp_path), gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    _write_idx(bad, 2049, images, gz=False)  # the labels' magic
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic number 2049"):
        FashionMNIST(str(tmp_path))
    _write_idx(bad, 2051, images, gz=False)
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        FashionMNIST(str(tmp_path))
    _write_idx(bad, 2051, images[:3], gz=False)
    with pytest.raises(ValueError, match="3 images"):
        FashionMNIST(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        FashionMNIST(str(tmp_path), train=False)


def test_find_fashion_mnist(tmp_path, monkeypatch):
    _write_fashion(str(tmp_path / "mine"))
    assert find_fashion_mnist(str(tmp_path / "mine")) == str(tmp_path / "mine")
    # Without Debian's copy, a directory lacking the files must say how to get them.
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "not_installed"))
    for root in (str(tmp_path / "missing"), None):
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            find_fashion_mnist(root)
    # With it, an empty root falls back to it (as main_moco_mgd.py's default DIR "").
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "mine"))
    assert find_fashion_mnist(None) == str(tmp_path / "mine")
    _write_fashion(str(tmp_path / "mine"), "t10k", n=3)
    assert len(build_dataset("fashion-mnist", "", "test")) == 3
    assert len(build_dataset("fashion-mnist", None, "train")) == 5
    # A directory the user named but that lacks the files is an error even then, never swapped.
    with pytest.raises(FileNotFoundError, match="missing"):
        find_fashion_mnist(str(tmp_path / "missing"))


def test_real_fashion_mnist():
    if not os.path.isdir(FASHION_MNIST_DIR):
        cannot_run_here(f"{FASHION_MNIST_DIR} absent: apt-get install dataset-fashion-mnist")
    train = build_dataset("fashion-mnist", "", "train")
    test = build_dataset("fashion-mnist", FASHION_MNIST_DIR, "val")
    assert (len(train), len(test)) == (60000, 10000)
    for dataset in (train, test):
        assert set(dataset.targets) == set(range(10))
    image, label = test[0]
    assert image.size == (28, 28) and image.mode == "RGB" and 0 <= label <= 9


def test_two_crops_and_eval_transform(tmp_path):
    root = _image_folder(tmp_path)
    random.seed(0)
    torch.manual_seed(0)
    dataset = build_dataset("imagefolder", root, "train", TwoCropsTransform(pretrain_transform(32)))
    assert len(dataset) == 6 and dataset.classes == ["class0", "class1"]
    (query, key), label = dataset[0]
    assert query.shape == key.shape == (3, 32, 32) and label == 0
    assert not torch.equal(query, key)
    v1 = ImageFolderDataset(os.path.join(root, "train"), TwoCropsTransform(pretrain_transform(32, aug_plus=False)))
    (query, key), _ = v1[4]
    assert query.shape == key.shape == (3, 32, 32) and not torch.equal(query, key)

    evaluation = build_dataset("imagefolder", root, "train", eval_transform(32))
    image, label = evaluation[5]
    assert image.shape == (3, 32, 32) and label == 1
    assert torch.equal(image, evaluation[5][0])


def test_augmentations_are_reproducible_from_the_seeds(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    transform = pretrain_transform(32)
    views = []
    for _ in range(2):
        random.seed(3)
        torch.manual_seed(3)
        views.append(torch.stack([transform(image) for _ in range(4)]))
    assert torch.equal(views[0], views[1])


def _corrupt_folder(tmp_path):
    root = _image_folder(tmp_path)
    (tmp_path / "train" / "class0" / "bad.jpg").write_bytes(np.random.default_rng(2).bytes(500))
    return root


@pytest.fixture
def data_log(caplog):
    caplog.set_level(logging.WARNING, logger="moco_mgd.data.datasets")
    return caplog


def test_corrupt_image_is_skipped(tmp_path, data_log):
    root = _corrupt_folder(tmp_path)
    dataset = build_dataset("imagefolder", root, "train", eval_transform(32))
    paths = [path for path, _ in dataset.samples]
    bad = paths.index(os.path.join(root, "train", "class0", "bad.jpg"))
    image, label = dataset[bad]
    assert image.shape == (3, 32, 32) and label == dataset.samples[bad + 1][1]
    assert torch.equal(image, dataset[bad + 1][0])  # the next file's sample
    assert dataset.num_skipped == 1
    warnings = [r for r in data_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bad.jpg" in warnings[0].getMessage()


def test_corrupt_last_image_wraps_around(tmp_path, data_log):
    root = _image_folder(tmp_path)
    (tmp_path / "train" / "class1" / "zz_bad.jpg").write_bytes(b"not an image")
    dataset = ImageFolderDataset(os.path.join(root, "train"), eval_transform(32))
    assert dataset.samples[-1][0].endswith("zz_bad.jpg")
    image, label = dataset[len(dataset) - 1]
    assert torch.equal(image, dataset[0][0]) and label == 0 and dataset.num_skipped == 1


def test_too_many_corrupt_images_raise(tmp_path, data_log):
    root = _corrupt_folder(tmp_path)
    dataset = build_dataset("imagefolder", root, "train", eval_transform(32), max_skipped=0)
    bad = [path for path, _ in dataset.samples].index(os.path.join(root, "train", "class0", "bad.jpg"))
    with pytest.raises(RuntimeError, match=r"skipped 1 .*bad\.jpg.*[Cc]heck the dataset"):
        dataset[bad]
    dataset[bad + 1]  # good files still load


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset("imagefolder", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="data directory"):
        build_dataset("imagefolder", "")
    with pytest.raises(FileNotFoundError, match=r"DATA/train/CLASS/\*\.jpg"):
        build_dataset("imagefolder", str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="train"):
        build_dataset("imagefolder", str(tmp_path))
    (tmp_path / "train" / "class0").mkdir()
    (tmp_path / "train" / "class0" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=str(tmp_path / "train")):
        build_dataset("imagefolder", str(tmp_path))
    with pytest.raises(ValueError, match="imagefolder, fashion-mnist"):
        build_dataset("cifar10", str(tmp_path))


def test_random_subset():
    dataset = torch.utils.data.TensorDataset(torch.arange(50))
    first, again, other = (random_subset(dataset, 20, seed) for seed in (7, 7, 8))
    assert first.indices == again.indices and first.indices != other.indices
    assert len(first) == 20 and len(set(first.indices)) == 20
    assert first.indices == sorted(first.indices) and all(0 <= i < 50 for i in first.indices)
    assert first[0][0].item() == first.indices[0]
    everything = random_subset(dataset, 1000, 0)
    assert everything.indices == list(range(50))
    with pytest.raises(ValueError):
        random_subset(dataset, 0, 0)


def test_gaussian_blur_blurs():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    random.seed(0)
    blurred = GaussianBlur((1.0, 2.0))(noise)
    assert isinstance(blurred, Image.Image) and blurred.size == noise.size and blurred.mode == "RGB"
    assert np.asarray(blurred).astype(float).var() < 0.5 * np.asarray(noise).astype(float).var()
    random.seed(5)
    first = np.asarray(GaussianBlur()(noise))
    random.seed(5)
    assert np.array_equal(first, np.asarray(GaussianBlur()(noise)))


def test_transforms_are_mocos():
    resize, crop, _, normalize = eval_transform(224).transforms
    assert resize.size == 256 and crop.size == (224, 224)
    assert eval_transform(32).transforms[0].size == 37
    assert normalize.mean == data.IMAGENET_MEAN and normalize.std == data.IMAGENET_STD
    v2 = pretrain_transform(64).transforms
    assert [type(t) for t in v2] == [T.RandomResizedCrop, T.RandomApply, T.RandomGrayscale, T.RandomApply,
                                     T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert v2[0].size == (64, 64) and v2[0].scale == (0.2, 1.0) and v2[2].p == 0.2
    jitter, blur = v2[1].transforms[0], v2[3].transforms[0]
    assert v2[1].p == 0.8 and (jitter.brightness, jitter.hue) == ((0.6, 1.4), (-0.1, 0.1))
    assert v2[3].p == 0.5 and isinstance(blur, GaussianBlur)
    # The blur is MoCo's relative to the image: (0.1, 2.0) px at 224 px, scaled with the crop elsewhere.
    assert pretrain_transform(224).transforms[3].transforms[0].sigma == (0.1, 2.0)
    assert blur.sigma == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))
    v1 = pretrain_transform(64, aug_plus=False).transforms
    assert [type(t) for t in v1] == [T.RandomResizedCrop, T.RandomGrayscale, T.ColorJitter,
                                     T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert v1[2].hue == (-0.4, 0.4)


def test_holdout_split_is_stratified_disjoint_and_fixed():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    kept, held = data.holdout_split(targets, 0.1)
    assert sorted(kept + held) == list(range(100)) and not set(kept) & set(held)
    assert [sum(targets[i] == c for i in held) for c in range(3)] == [5, 3, 2]
    assert data.holdout_split(targets, 0.1) == (kept, held)          # the same for every run
    assert data.holdout_split(targets, 0.1, seed=1)[1] != held       # drawn, not the first of each class
    # A class of 2 images still keeps one for training; one of 1 gives nothing.
    kept, held = data.holdout_split([0, 0, 1], 0.9)
    assert held == [0] and kept == [1, 2]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_holdout_fraction_out_of_range_is_refused(fraction):
    with pytest.raises(ValueError, match="--val-holdout .*must be > 0 and < 1"):
        data.holdout_split([0, 1, 0, 1], fraction)


def test_build_dataset_with_holdout_validates_on_held_out_training_images(tmp_path):
    images, labels = _write_fashion(str(tmp_path), "train", n=200, gz=False)
    _write_fashion(str(tmp_path), "t10k", n=7, gz=False, seed=1)
    train = build_dataset("fashion-mnist", str(tmp_path), "train", val_holdout=0.25)
    for split in ("val", "test"):
        val = build_dataset("fashion-mnist", str(tmp_path), split, val_holdout=0.25)
        assert len(val) == 200 - len(train) and 40 <= len(val) <= 60   # a quarter of each class, rounded
        assert not set(train.indices) & set(val.indices)
    assert val.classes == train.classes and val.targets == labels[val.indices].tolist()
    image, label = val[0]   # a training image, not one of the 7 test images
    assert np.array_equal(np.asarray(image)[..., 0], images[val.indices[0]]) and label == labels[val.indices[0]]
    # --max-images then draws from the kept images only.
    subset = random_subset(train, 50, seed=0)
    assert {train.indices[i] for i in subset.indices} <= set(train.indices)
    assert data.evaluated_on(0.25).startswith("validation: 0.25 of the training images")


def test_crop_min_sets_the_smallest_crop():
    assert pretrain_transform(32).transforms[0].scale == (0.2, 1.0)            # MoCo v2's
    assert pretrain_transform(32, crop_min=0.5).transforms[0].scale == (0.5, 1.0)
    assert pretrain_transform(32, aug_plus=False, crop_min=0.6).transforms[0].scale == (0.6, 1.0)


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_crop_min_out_of_range_is_refused(tmp_path, capsys, value):
    import main_moco_mgd

    with pytest.raises(SystemExit):
        main_moco_mgd.main([str(tmp_path), "--crop-min", value, "--output-dir", str(tmp_path / "out")])
    assert f"--crop-min {float(value)}: must be" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
