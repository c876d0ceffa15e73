import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck

from moco_mgd.models.resnet import build_resnet
from moco_mgd.models.stages import forward_with_stages, last_blocks, pre_relu_bns, stage_channels
from tests.helpers import randomize_bn

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _observed_by_hooks(model, x):
    """What the network's own forward shows: each last block's input and output, and its last BN's output."""
    seen = {"input": [], "output": [], "branch": []}
    handles = []
    for block in last_blocks(model):
        handles.append(block.register_forward_pre_hook(lambda m, args: seen["input"].append(args[0].clone())))
        handles.append(block.register_forward_hook(lambda m, args, out: seen["output"].append(out.clone())))
        bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        handles.append(bn.register_forward_hook(lambda m, args, out: seen["branch"].append(out.clone())))
    out = model(x)
    for h in handles:
        h.remove()
    return out, seen


@pytest.mark.parametrize("arch", ARCHS)
def test_stage_features_are_the_pre_relu_block_outputs_of_the_networks_own_forward(arch):
    torch.manual_seed(0)
    model = randomize_bn(build_resnet(arch), 0).eval()
    names_before = list(model.state_dict().keys())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected_out, seen = _observed_by_hooks(model, x)
        out, stages = forward_with_stages(model, x)
    assert torch.equal(out, expected_out)
    assert list(model.state_dict().keys()) == names_before
    assert [f.shape[1] for f in stages] == stage_channels(model)
    for block, feature, block_in, block_out, branch in zip(last_blocks(model), stages, seen["input"],
                                                           seen["output"], seen["branch"]):
        identity = block_in if block.downsample is None else block.downsample(block_in)
        assert torch.equal(feature, branch + identity)
        assert torch.equal(torch.relu(feature), block_out)
        assert (feature < 0).any(), "pre-ReLU features must keep their negative values"


def test_train_mode_forward_updates_bn_like_the_plain_forward_and_carries_gradients():
    torch.manual_seed(0)
    model = build_resnet("resnet18", stem="small").train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    out, stages = forward_with_stages(model, x)
    assert torch.equal(out, twin(x))
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    (out.sum() + sum(f.sum() for f in stages)).backward()
    assert model.layer1[0].conv1.weight.grad is not None
    assert model.layer4[-1].bn2.weight.grad is not None


def test_stage_channels_and_bns():
    r18, r50 = build_resnet("resnet18"), build_resnet("resnet50")
    assert stage_channels(r18) == [64, 128, 256, 512]
    assert stage_channels(r50) == [256, 512, 1024, 2048]
    assert pre_relu_bns(r18)[2] is r18.layer3[-1].bn2
    assert pre_relu_bns(r50)[3] is r50.layer4[-1].bn3


def test_a_model_that_is_not_a_resnet_is_refused():
    with pytest.raises(TypeError, match="torchvision ResNets"):
        forward_with_stages(nn.Sequential(nn.Conv2d(3, 8, 3)), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_stage_map_sizes_are_those_of_a_real_forward(stem):
    from moco_mgd.models.stages import stage_map_sizes

    model = build_resnet("resnet18", stem=stem).eval()
    for size in (3, 7, 8, 9, 16, 17, 28, 32, 33):
        with torch.no_grad():
            _, stages = forward_with_stages(model, torch.randn(1, 3, size, size))
        assert [f.shape[-1] for f in stages] == list(stage_map_sizes(size, stem).values()), size
