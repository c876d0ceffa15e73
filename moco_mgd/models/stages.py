"""The stage features MGD distils (paper section 3.4, Fig. 3a), returned by a forward as values.

The distillation position of a ResNet stage is the output of its last residual block *before*
the final ReLU: ``bn(conv(...)) + identity``. :func:`forward_with_stages` runs a torchvision
ResNet's own modules in torchvision's order and returns that tensor of each stage beside the
output, so nothing is recorded in hooks and nothing is left for a later step to collect. The
network is not modified: its parameter names stay those of torchvision and MoCo, and its
ordinary forward is untouched.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["STAGES", "last_blocks", "stage_channels", "pre_relu_bns", "forward_with_stages", "stage_map_sizes",
           "smallest_image_size", "check_image_size", "degenerate_image_size"]

STAGES = ("layer1", "layer2", "layer3", "layer4")


def last_blocks(model: nn.Module) -> list[nn.Module]:
    """The last residual block of each of the four stages of a torchvision ResNet."""
    blocks = []
    for name in STAGES:
        stage = getattr(model, name, None)
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            raise TypeError(
                f"{type(model).__name__} has no ResNet stage {name!r}: stage features are defined for "
                f"torchvision ResNets (resnet18/34/50/101/152, resnext, wide_resnet)"
            )
        block = stage[-1]
        if not isinstance(block, (BasicBlock, Bottleneck)):
            raise TypeError(f"{name}[-1] is a {type(block).__name__}, not a torchvision "
                            f"BasicBlock or Bottleneck")
        blocks.append(block)
    return blocks


def pre_relu_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN whose output is the residual branch of each stage feature (bn3 of a Bottleneck,
    bn2 of a BasicBlock). Its weight and bias give the teacher's margins
    (:func:`moco_mgd.losses.mgd.bn_margin`)."""
    return [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in last_blocks(model)]


def stage_channels(model: nn.Module) -> list[int]:
    """Channels of the stage feature of each stage."""
    return [bn.num_features for bn in pre_relu_bns(model)]


def _block_before_relu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision residual block's output before its last ReLU, by the block's own modules."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return out + identity


def forward_with_stages(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(model(images), [layer1, layer2, layer3, layer4] pre-ReLU features)`` of a torchvision ResNet.

    The output equals the model's own forward (the same modules, in the same order); the stage
    features are part of its autograd graph, so a loss on them trains the model.
    """
    last_blocks(model)  # a clear error for a network that is not a torchvision ResNet
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    stages = []
    for name in STAGES:
        stage = getattr(model, name)
        for block in stage[:-1]:
            x = block(x)
        before_relu = _block_before_relu(stage[-1], x)
        stages.append(before_relu)
        x = F.relu(before_relu)
    return model.fc(torch.flatten(model.avgpool(x), 1)), stages


def stage_map_sizes(image_size: int, stem: str = "imagenet") -> dict[str, int]:
    """The side of each stage's feature map for ``image_size`` px inputs.

    Each stride-2 layer (the ImageNet stem's 7x7 conv and max-pool, the first block of layer2,
    layer3 and layer4) maps a side n to ceil(n / 2); the small stem keeps the size.
    """
    side = image_size if stem == "small" else math.ceil(math.ceil(image_size / 2) / 2)
    sizes = {}
    for name in STAGES:
        if name != "layer1":
            side = math.ceil(side / 2)
        sizes[name] = side
    return sizes


def _maps_text(sizes: dict[str, int]) -> str:
    return ", ".join(f"{name} {side}x{side}" for name, side in sizes.items())


def smallest_image_size(stem: str = "imagenet", stage: str = "layer2") -> int:
    """The smallest input at which ``stage``'s map is still larger than 1x1."""
    return next(size for size in range(1, 1024) if stage_map_sizes(size, stem)[stage] > 1)


def check_image_size(image_size: int, stem: str = "imagenet") -> None:
    """Refuse an input so small that every stage from layer2 on is a single pixel.

    Raises:
        ValueError: with the stage map sizes and the smallest size that works.
    """
    sizes = stage_map_sizes(image_size, stem)
    if sizes["layer2"] > 1:
        return
    other = "" if stem == "small" else f", or --stem small (from {smallest_image_size('small')} px)"
    raise ValueError(f"--image-size {image_size} is too small for the {stem} stem: every stage from layer2 on "
                     f"would be 1x1 ({_maps_text(sizes)}), so their stride-2 layers and MGD's channel "
                     f"matching see one position; use --image-size {smallest_image_size(stem)} or more{other}")


def degenerate_image_size(image_size: int, stem: str = "imagenet") -> str | None:
    """A warning when layer3 is already 1x1 (legal, but layer4 then has nothing to downsample); else None."""
    sizes = stage_map_sizes(image_size, stem)
    if sizes["layer3"] > 1:
        return None
    return (f"--image-size {image_size} with the {stem} stem leaves layer3 and layer4 at 1x1 ({_maps_text(sizes)}): "
            f"the last stages see a single position; {smallest_image_size(stem, 'layer3')} px or more keeps layer3 "
            f"larger" + ("" if stem == "small" else ", as does --stem small"))
