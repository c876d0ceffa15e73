import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck

from moco_mgd.models.resnet import build_resnet
from moco_mgd.models.taps import FeatureTaps, pre_relu_bns, stage_channels
from tests.helpers import randomize_bn

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _block_pre_relu(block, x):
    """torchvision's residual block written out by hand, stopping before the last ReLU."""
    out = torch.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = torch.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    identity = x if block.downsample is None else block.downsample(x)
    return out + identity


def _hand_written_stage_features(model, x):
    x = model.maxpool(torch.relu(model.bn1(model.conv1(x))))
    feats = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage[:-1]:
            x = block(x)
        pre = _block_pre_relu(stage[-1], x)
        feats.append(pre)
        x = torch.relu(pre)
    return feats


@pytest.mark.parametrize("arch", ARCHS)
def test_taps_are_the_pre_relu_block_outputs(arch):
    torch.manual_seed(0)
    model = randomize_bn(build_resnet(arch), 0).eval()
    reference_model = copy.deepcopy(model)
    names_before = list(model.state_dict().keys())
    taps = FeatureTaps(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        feats = taps.pop()
        expected = _hand_written_stage_features(reference_model, x)
        assert torch.allclose(out, reference_model(x), atol=1e-5)
    assert list(model.state_dict().keys()) == names_before
    assert [f.shape[1] for f in feats] == stage_channels(model)
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want)
        assert (got < 0).any(), "pre-ReLU features must keep their negative values"


def test_stage_channels_and_bns():
    r18, r50 = build_resnet("resnet18"), build_resnet("resnet50")
    assert stage_channels(r18) == [64, 128, 256, 512]
    assert stage_channels(r50) == [256, 512, 1024, 2048]
    assert pre_relu_bns(r18)[2] is r18.layer3[-1].bn2
    assert pre_relu_bns(r50)[3] is r50.layer4[-1].bn3


def test_taps_carry_gradients_and_are_forgotten_after_pop():
    model = build_resnet("resnet18").train()
    taps = FeatureTaps(model)
    model(torch.randn(2, 3, 32, 32))
    feats = taps.pop()
    sum(f.sum() for f in feats).backward()
    assert model.layer1[0].conv1.weight.grad is not None
    with pytest.raises(RuntimeError, match="no features recorded"):
        taps.pop()


def test_taps_reject_a_model_that_is_not_a_resnet():
    with pytest.raises(TypeError, match="torchvision ResNets"):
        FeatureTaps(nn.Sequential(nn.Conv2d(3, 8, 3)))
