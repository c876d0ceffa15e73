"""The stage features MGD distils (paper section 3.4, Fig. 3a), returned by a forward as values.

The distillation position of a ResNet stage is the output of its last residual block *before*
the final ReLU: ``bn(conv(...)) + identity``. :func:`forward_with_stages` runs a torchvision
ResNet's own modules in torchvision's order and returns that tensor of each stage beside the
output, so nothing is recorded in hooks and nothing is left for a later step to collect. The
network is not modified: its parameter names stay those of torchvision and MoCo, and its
ordinary forward is untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["STAGES", "last_blocks", "stage_channels", "pre_relu_bns", "forward_with_stages"]

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
