"""Feature taps: where MGD reads the networks (paper section 3.4, Fig. 3a).

The distillation position of a ResNet stage is the output of its last residual block
*before* the final ReLU: ``bn(conv(...)) + identity``. This module is the one place that
decides which stages and which tensor; the loss never reaches into the networks.

torchvision blocks apply one shared ``nn.ReLU(inplace=True)`` several times, the last
time to ``out += identity``. A hook cannot read that tensor after the fact (the in-place
ReLU has already clipped it), so each tapped block gets its own non-inplace ReLU, whose
forward pre-hook keeps the input of its latest call. ReLU has no parameters or buffers:
state-dict keys stay those of torchvision and MoCo.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["STAGES", "last_blocks", "stage_channels", "pre_relu_bns", "FeatureTaps"]

STAGES = ("layer1", "layer2", "layer3", "layer4")


def last_blocks(model: nn.Module) -> list[nn.Module]:
    """The last residual block of each of the four stages of a torchvision ResNet."""
    blocks = []
    for name in STAGES:
        stage = getattr(model, name, None)
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            raise TypeError(
                f"{type(model).__name__} has no ResNet stage {name!r}: feature taps support "
                f"torchvision ResNets (resnet18/34/50/101/152, resnext, wide_resnet)"
            )
        block = stage[-1]
        if not isinstance(block, (BasicBlock, Bottleneck)):
            raise TypeError(f"{name}[-1] is a {type(block).__name__}, not a torchvision "
                            f"BasicBlock or Bottleneck")
        blocks.append(block)
    return blocks


def pre_relu_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN whose output feeds each tapped ReLU (bn3 of a Bottleneck, bn2 of a BasicBlock).

    Its weight and bias give the teacher's margins (:func:`moco_mgd.losses.mgd.bn_margin`).
    """
    return [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in last_blocks(model)]


def stage_channels(model: nn.Module) -> list[int]:
    """Channels of the tapped feature of each stage."""
    return [bn.num_features for bn in pre_relu_bns(model)]


class FeatureTaps:
    """Records the four pre-ReLU stage features of a torchvision ResNet during its forward.

    Usage::

        taps = FeatureTaps(model)
        out = model(x)          # any forward, also inside MoCo or DDP
        feats = taps.pop()      # [layer1, layer2, layer3, layer4] pre-ReLU features

    The recorded tensors are part of the autograd graph of that forward: a loss on them
    trains the model. ``pop`` hands them over and forgets them, so nothing is kept alive
    past the step.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._blocks = last_blocks(model)
        self._recorded: list[torch.Tensor | None] = [None] * len(self._blocks)
        self._handles = []
        for i, block in enumerate(self._blocks):
            if not getattr(block, "_mgd_tapped", False):
                block.relu = nn.ReLU(inplace=False)
                block._mgd_tapped = True
            self._handles.append(block.relu.register_forward_pre_hook(partial(self._record, i)))

    def _record(self, index: int, module: nn.Module, inputs: tuple[torch.Tensor]) -> None:
        # The block calls its ReLU more than once; the last call is on the block output.
        self._recorded[index] = inputs[0]

    @property
    def channels(self) -> list[int]:
        return stage_channels(self.model)

    def pop(self) -> list[torch.Tensor]:
        """Return the features of the latest forward and forget them."""
        if any(f is None for f in self._recorded):
            raise RuntimeError("no features recorded: run a forward of the tapped model first")
        feats = list(self._recorded)
        self._recorded = [None] * len(self._blocks)
        return feats

    def clear(self) -> None:
        self._recorded = [None] * len(self._blocks)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Run the model on ``images`` and return its stage features."""
        self.model(images)
        return self.pop()

    def remove(self) -> None:
        """Detach the hooks (the non-inplace ReLUs stay; they compute the same thing)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
