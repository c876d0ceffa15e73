import argparse

import pytest
import torch
import torch.nn as nn

from moco_mgd.losses import mgd
from moco_mgd.checkpoints.formats import backbone_state_dict, load_frozen_teacher
from moco_mgd.models.resnet import build_resnet
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.models.stages import pre_relu_bns
from tests.helpers import moco_v2_checkpoint


def _assert_backbone_equal(model, encoder):
    expected = {k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
    got = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("mlp", [True, False])
def test_teacher_from_official_moco_layout(tmp_path, mlp):
    checkpoint, encoder_q = moco_v2_checkpoint("resnet50", mlp=mlp)
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save(checkpoint, path)
    teacher = load_frozen_teacher("resnet50", path)
    _assert_backbone_equal(teacher, encoder_q)     # encoder_q, never encoder_k
    assert isinstance(teacher.fc, nn.Identity)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("mlp", [True, False])
def test_teacher_with_its_head_outputs_the_moco_embedding(tmp_path, mlp):
    from moco_mgd.models.resnet import head_dim

    checkpoint, encoder_q = moco_v2_checkpoint("resnet50", mlp=mlp, dim=32)
    path = tmp_path / "moco_v2.pth.tar"
    torch.save(checkpoint, path)
    teacher = load_frozen_teacher("resnet50", path, with_head=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), encoder_q.eval()(images))
    assert head_dim(teacher) == 32
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_teacher_head_is_required_where_the_checkpoint_has_none(tmp_path):
    path = tmp_path / "torchvision.pth"
    torch.save({k: v for k, v in build_resnet("resnet50").state_dict().items() if not k.startswith("fc.")}, path)
    with pytest.raises(ValueError, match="has no projection head"):
        load_frozen_teacher("resnet50", path, with_head=True)
    load_frozen_teacher("resnet50", path)        # MGD alone does not need it


@pytest.mark.parametrize("prefix,wrap", [("", None), ("module.", None), ("encoder_q.", "state_dict"),
                                         ("", "state_dict"), ("module.", "model")])
def test_teacher_from_torchvision_and_prefixless_layouts(tmp_path, prefix, wrap):
    encoder = build_resnet("resnet18")
    state = {prefix + k: v for k, v in encoder.state_dict().items()}
    torch.save(state if wrap is None else {wrap: state}, tmp_path / "w.pth")
    _assert_backbone_equal(load_frozen_teacher("resnet18", tmp_path / "w.pth"), encoder)


def test_layout_description_names_the_head():
    checkpoint, _ = moco_v2_checkpoint("resnet18", mlp=True)
    backbone, head, layout = backbone_state_dict(checkpoint)
    assert sorted(head) == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]
    assert "module.encoder_q." in layout and "MLP head" in layout
    assert not any(k.startswith("fc") for k in backbone)


def test_margins_come_from_the_loaded_weights(tmp_path):
    checkpoint, encoder_q = moco_v2_checkpoint("resnet50")
    torch.save(checkpoint, tmp_path / "t.pth")
    teacher = load_frozen_teacher("resnet50", tmp_path / "t.pth")
    distiller = MGDistiller.from_models(teacher, build_resnet("resnet18"))
    for got, bn in zip(distiller.margins(), pre_relu_bns(encoder_q)):
        torch.testing.assert_close(got, mgd.bn_margin(bn))
    # A freshly initialised BN (weight 1, bias 0) would give -sqrt(2/pi) everywhere.
    assert not torch.allclose(distiller.margins()[0], torch.full_like(distiller.margins()[0], -0.7979), atol=1e-3)


def test_missing_teacher_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher checkpoint .* does not exist"):
        load_frozen_teacher("resnet50", tmp_path / "nope.pth")


def test_teacher_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_frozen_teacher("resnet50", tmp_path / "junk.pth")


def test_teacher_file_with_arbitrary_pickled_objects_is_refused(tmp_path):
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": {}}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_frozen_teacher("resnet50", tmp_path / "pickled.pth")


def test_teacher_architecture_mismatch_lists_keys_and_guesses(tmp_path):
    checkpoint, _ = moco_v2_checkpoint("resnet18")
    torch.save(checkpoint, tmp_path / "r18.pth")
    with pytest.raises(ValueError) as info:
        load_frozen_teacher("resnet50", tmp_path / "r18.pth")
    message = str(info.value)
    assert "does not fit resnet50" in message and "look like a resnet18" in message
    assert "missing 198 keys" in message and "layer1.0.bn3.weight" in message
    assert "another shape" in message


def test_checkpoint_without_backbone_lists_what_it_found(tmp_path):
    torch.save({"state_dict": {"head.weight": torch.zeros(2), "head.bias": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"no ResNet backbone found.*head\.bias, head\.weight"):
        load_frozen_teacher("resnet50", tmp_path / "x.pth")


def test_unknown_teacher_architecture(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'vit_b_16'"):
        load_frozen_teacher("vit_b_16", tmp_path / "x.pth")
