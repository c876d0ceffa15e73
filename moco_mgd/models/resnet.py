"""ResNet backbones: torchvision's networks, the small stem for 32 px images, the trunk and stage widths.

Reading their weights from the checkpoint layouts on disk is :mod:`moco_mgd.checkpoints.formats`.
"""
from __future__ import annotations

import torch.nn as nn
from torchvision.models import resnet as tv_resnet

__all__ = [
    "RESNET_ARCHS",
    "BASIC_BLOCK_ARCHS",
    "STEMS",
    "apply_small_stem",
    "build_resnet",
    "resnet_trunk",
    "head_dim",
    "arch_stage_channels",
]

RESNET_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
)

# Stage output widths of torchvision's ResNets: 64, 128, 256, 512 times the block's expansion
# (1 for BasicBlock, 4 for Bottleneck; ResNeXt and wide ResNets widen only inside the block).
BASIC_BLOCK_ARCHS = ("resnet18", "resnet34")


def arch_stage_channels(arch: str) -> list[int]:
    """Channels of the four stage features of ``arch``, without building the network."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(RESNET_ARCHS)}")
    expansion = 1 if arch in BASIC_BLOCK_ARCHS else 4
    return [width * expansion for width in (64, 128, 256, 512)]


STEMS = ("imagenet", "small")


def apply_small_stem(model: nn.Module) -> nn.Module:
    """Replace the ImageNet stem (7x7/2 conv + 3x3/2 max-pool) by a 3x3/1 conv, no pool.

    For 28-64 px images (CIFAR ResNets do the same): with the ImageNet stem a 32 px input
    leaves 1x1 maps in the last stage, where channel matching has nothing spatial to
    compare. Parameter names are unchanged (``conv1.weight`` only changes shape).
    """
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def build_resnet(arch: str, num_classes: int = 1000, stem: str = "imagenet",
                 zero_init_residual: bool = False) -> nn.Module:
    """A torchvision ResNet with random weights (never downloads anything).

    Args:
        arch: one of :data:`RESNET_ARCHS`.
        num_classes: outputs of ``fc``.
        stem: ``"imagenet"`` (torchvision's) or ``"small"`` (:func:`apply_small_stem`).
        zero_init_residual: torchvision's option: each residual branch's last BN starts at
            zero, so every block starts as the identity (what lets a deep ResNet train fast
            from scratch on few steps; the official MoCo does not use it).
    """
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(RESNET_ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}: choose one of {STEMS}")
    model = getattr(tv_resnet, arch)(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    return apply_small_stem(model) if stem == "small" else model


def resnet_trunk(model: nn.Module) -> nn.Module:
    """A view of a torchvision ResNet without its head: images -> pooled features ``[B, D]``.

    The modules are shared, not copied, so it always reflects the current weights (the kNN
    monitor reads the student through it while it trains).
    """
    return nn.Sequential(*[child for name, child in model.named_children() if name != "fc"], nn.Flatten(1))


def head_dim(model: nn.Module) -> int:
    """The output size of a ResNet's head ``fc`` (its last linear layer): its embedding size."""
    linears = [m for m in model.fc.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}.fc has no linear layer: the model was loaded without its head")
    return linears[-1].out_features
