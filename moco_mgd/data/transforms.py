"""MoCo's augmentations: the two-crop view pair, the v2 blur and the evaluation resize-and-crop."""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from PIL import Image, ImageFilter
from torchvision import transforms

# ImageNet statistics for every dataset, Fashion-MNIST included: a teacher pretrained on
# ImageNet expects its inputs normalised this way.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """MoCo-v2's Gaussian blur (from SimCLR): radius drawn uniformly from ``sigma`` per call.

    The radius comes from Python's ``random`` as in MoCo's code; torchvision's transforms draw
    from torch's RNG, so seeding both ``random`` and ``torch`` reproduces the augmentations.

    Args:
        sigma: ``(low, high)`` range of the blur radius in pixels.
    """

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = tuple(sigma)

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma[0], self.sigma[1])))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def blur_sigma(image_size: int) -> tuple[float, float]:
    """MoCo-v2's blur radius range, (0.1, 2.0) px at 224 px, scaled with the crop side.

    MoCo blurs the 224 px crop with a radius in pixels; the same radius on a 32 px crop is a
    7x stronger blur relative to the image (2 px is 6% of its side) and erases the detail
    that separates small images. Scaling keeps the blur MoCo-v2 applies to an ImageNet image,
    relative to the image: exactly MoCo's at 224 px, (0.014, 0.29) px at 32 px.
    """
    return 0.1 * image_size / 224, 2.0 * image_size / 224


def pretrain_transform(image_size: int = 224, aug_plus: bool = True, crop_min: float = 0.2) -> Callable:
    """MoCo's training augmentation of one view, as in the official ``main_moco.py``.

    At 224 px it is exactly MoCo's; at other sizes the blur scales with the crop
    (:func:`blur_sigma`).

    Args:
        image_size: side of the square crop.
        aug_plus: MoCo v2's augmentation (colour jitter with p=0.8, blur); otherwise MoCo v1's.
        crop_min: the smallest crop, as a fraction of the image's area (MoCo v2: 0.2; MoCo v3's
            ``--crop-min``).

    Returns:
        A callable mapping a PIL image to a normalised ``FloatTensor[3, image_size, image_size]``.
    """
    crop = transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.0))
    if aug_plus:
        augmentation = [
            crop,
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur(blur_sigma(image_size))], p=0.5),
        ]
    else:
        augmentation = [crop, transforms.RandomGrayscale(p=0.2), transforms.ColorJitter(0.4, 0.4, 0.4, 0.4)]
    return transforms.Compose(augmentation + [
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int = 224) -> Callable:
    """MoCo's deterministic validation transform (resize 256, centre crop 224), scaled to ``image_size``.

    Args:
        image_size: side of the square centre crop.

    Returns:
        A callable mapping a PIL image to a normalised ``FloatTensor[3, image_size, image_size]``.
    """
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoCropsTransform:
    """Two independent augmentations of one image: the query and the key views.

    Args:
        base_transform: the augmentation applied to each view.
    """

    def __init__(self, base_transform: Callable):
        self.base_transform = base_transform

    def __call__(self, x) -> list:
        return [self.base_transform(x), self.base_transform(x)]
