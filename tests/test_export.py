"""python -m moco_mgd.export: round trips into torchvision, timm and detectron2 from three layouts, stems, bad input.

Every round trip loads the exported file the way the export's printed instructions say (the printed
torchvision / timm lines are executed as they are) and compares the forward with moco_mgd.models.resnet's
own loader on the source checkpoint. detectron2 is not on PyPI: its names are checked against a set
built here from the ResNet's structure, and a test-side inverse mapping rebuilds the torchvision model.
"""
import os
import pickle
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import Bottleneck

from moco_mgd.checkpoints.formats import load_frozen_backbone
from moco_mgd.models.resnet import build_resnet
from moco_mgd.checkpoints.files import with_module_prefix
from moco_mgd.checkpoints.export import detectron2_name, head_path, main
from tests.helpers import moco_v2_checkpoint, randomize_bn, tmpfs_mounted

CLOSE = dict(atol=1e-6, rtol=1e-5)
NUM_CLASSES = 10


def _lincls_checkpoint(arch="resnet18", stem="imagenet", seed=3, num_classes=NUM_CLASSES):
    """What moco_mgd/evaluation/lincls.py saves: the whole model under ``module.``, its trained fc, and fc's SGD state."""
    torch.manual_seed(seed)
    model = randomize_bn(build_resnet(arch, num_classes=num_classes, stem=stem), seed)
    optimizer = torch.optim.SGD(model.fc.parameters(), 30.0, momentum=0.9)
    model.fc(torch.randn(2, model.fc.in_features)).sum().backward()
    optimizer.step()  # momentum buffers: the optimizer entry holds tensors, as a real one does
    return {"epoch": 3, "arch": arch, "state_dict": with_module_prefix(model.state_dict()), "best_acc1": 41.5,
            "optimizer": optimizer.state_dict(), "config": {"arch": arch, "stem": stem, "lr": 30.0}}


def _pretrain_checkpoint():
    """This project's pretraining checkpoint: MoCo's layout plus the MGD state and the rest of pretrain.py's entries."""
    checkpoint, _ = moco_v2_checkpoint("resnet18", mlp=True, seed=1)
    checkpoint.update(mgd={"assignments": [torch.zeros(64, dtype=torch.long), torch.zeros(512, dtype=torch.long)],
                           "student_bn": {"weight": torch.ones(64)}},
                      embedding=None, scaler={"scale": 1.0}, config={"arch": "resnet18", "stem": "imagenet"})
    return checkpoint


@pytest.fixture(scope="module")
def sources(module_dir):
    """Checkpoint files of three layouts (resnet18), and whether their fc is a trained classifier."""
    root = module_dir("sources")
    plain = randomize_bn(build_resnet("resnet18"), 5).state_dict()  # torchvision's layout: fc is its classifier
    files = {}
    for name, checkpoint in (("moco", _pretrain_checkpoint()), ("lincls", _lincls_checkpoint()),
                             ("torchvision", plain), ("small", _lincls_checkpoint(stem="small"))):
        files[name] = str(root / f"{name}.pth")
        torch.save(checkpoint, files[name])
    return files


def _export(capsys, *argv):
    """Run the CLI; returns its stdout."""
    main([str(a) for a in argv])
    return capsys.readouterr().out


def _fails(capsys, *argv) -> str:
    """Run the CLI expecting exit 2; returns its stderr."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


def _printed_model(output: str) -> nn.Module:
    """Execute the load instructions the export printed, as a user would paste them."""
    code = "\n".join(line[2:] for line in output.split("load it with:\n", 1)[1].splitlines())
    namespace = {}
    exec(code, namespace)  # noqa: S102 - the text under test is the code a user runs
    return namespace["model"].eval()


def _reference(path, classifier, stem="imagenet", arch="resnet18"):
    """The project's own loader: pooled features, or logits when the checkpoint has a trained classifier."""
    return load_frozen_backbone(arch, path, stem=stem, with_head=classifier)


def _expected_detectron2_names(model: nn.Module) -> set[str]:
    """detectron2's names for a torchvision ResNet, built from its blocks (not from the export's rules)."""
    names = set()

    def conv_norm(prefix):
        names.add(f"{prefix}.weight")
        names.update(f"{prefix}.norm.{p}" for p in ("weight", "bias", "running_mean", "running_var"))

    conv_norm("stem.conv1")
    for stage in range(1, 5):
        for index, block in enumerate(getattr(model, f"layer{stage}")):
            for conv in range(1, 4 if isinstance(block, Bottleneck) else 3):
                conv_norm(f"res{stage + 1}.{index}.conv{conv}")
            if block.downsample is not None:
                conv_norm(f"res{stage + 1}.{index}.shortcut")
    return names


def _from_detectron2(name: str) -> str:
    """The test's inverse of detectron2's naming: back to torchvision's."""
    name = re.sub(r"^res([2-5])\.", lambda m: f"layer{int(m.group(1)) - 1}.", name).removeprefix("stem.")
    name = name.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    return re.sub(r"conv([1-3])\.norm\.", r"bn\1.", name)


def _detectron2_model(path, arch) -> nn.Module:
    """A torchvision ResNet (no fc) rebuilt from the pickle; checks its format and names on the way."""
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] and data["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    model = build_resnet(arch)
    model.fc = nn.Identity()
    assert set(data["model"]) == _expected_detectron2_names(model)
    model.load_state_dict({_from_detectron2(k): torch.from_numpy(v) for k, v in data["model"].items()})
    return model.eval()


def test_detectron2_names():
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.running_var") == "stem.conv1.norm.running_var"
    assert detectron2_name("layer1.0.bn2.bias") == "res2.0.conv2.norm.bias"
    assert detectron2_name("layer4.1.conv3.weight") == "res5.1.conv3.weight"
    assert detectron2_name("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert detectron2_name("layer3.0.downsample.1.running_mean") == "res4.0.shortcut.norm.running_mean"


@pytest.mark.parametrize("source", ["moco", "lincls", "torchvision"])
@pytest.mark.parametrize("target", ["torchvision", "timm", "detectron2"])
def test_round_trip(sources, source, target, tmp_path, capsys):
    classifier = source != "moco"
    out = tmp_path / ("student.pkl" if target == "detectron2" else "student.pth")
    printed = _export(capsys, sources[source], "--to", target, "-o", out)
    assert f"as resnet18 (imagenet stem) for {target}" in printed
    reference = _reference(sources[source], classifier and target != "detectron2")  # detectron2 drops fc
    exported = _detectron2_model(out, "resnet18") if target == "detectron2" else _printed_model(printed)
    if target == "detectron2":
        assert "MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64" in printed
        assert "STRIDE_IN_1X1 False" in printed
    elif target == "timm":
        assert isinstance(exported, timm.models.ResNet)
    elif target == "torchvision":
        assert isinstance(exported, torchvision.models.ResNet)
        state = torch.load(out, weights_only=True)
        assert ("fc.weight" in state) == classifier and not any(k.startswith("fc.0") for k in state)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = reference(images), exported(images)
    logits = classifier and target != "detectron2"
    assert got.shape == ((2, 1000 if source == "torchvision" else NUM_CLASSES) if logits else (2, 512))
    torch.testing.assert_close(got, expected, **CLOSE)


def test_detectron2_bottleneck_resnet50(tmp_path, capsys):
    """ResNet-50's Bottleneck blocks (conv3, bn3, a shortcut in every stage) under their detectron2 names."""
    path, out = tmp_path / "r50.pth", tmp_path / "r50.pkl"
    torch.save(randomize_bn(build_resnet("resnet50"), 7).state_dict(), path)
    printed = _export(capsys, path, "--to", "detectron2", "-o", out)
    assert "as resnet50" in printed and "MODEL.RESNETS.DEPTH 50" in printed and "RES2_OUT_CHANNELS" not in printed
    exported = _detectron2_model(out, "resnet50")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), _reference(path, False, arch="resnet50")(images), **CLOSE)


def test_report_and_keep_head(sources, tmp_path, capsys):
    """What is kept and dropped is listed; --keep-head writes the MLP head, which gives MoCo's embedding."""
    out = tmp_path / "student.pth"
    printed = _export(capsys, sources["moco"], "--to", "torchvision", "-o", out, "--keep-head")
    dropped = printed.split("dropped: ", 1)[1].splitlines()[0]
    for group in ("encoder_k (124 tensors)", "queue (2 tensors)", "optimizer (0 tensors)", "MGD state (3 tensors)",
                  "AMP scaler (0 tensors)", "metadata epoch, arch, config"):
        assert group in dropped
    assert "kept: 120 backbone tensors" in printed and "head fc.*" not in dropped
    head = torch.load(head_path(out), weights_only=True)
    assert sorted(head) == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]
    model = _printed_model(printed)
    model.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    model.fc.load_state_dict({k.removeprefix("fc."): v for k, v in head.items()})
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = load_frozen_backbone("resnet18", sources["moco"], with_head=True)(images)
        torch.testing.assert_close(model.eval()(images), expected, **CLOSE)

    printed = _export(capsys, sources["lincls"], "--to", "detectron2", "-o", tmp_path / "l.pkl")
    assert "head fc.* (2 tensors)" in printed and "optimizer (2 tensors)" in printed
    assert "num_batches_tracked (20 tensors)" in printed
    assert "no head" in _fails(capsys, sources["lincls"], "--to", "timm", "-o", tmp_path / "t.pth", "--keep-head")


def test_moco_v1_linear_head_is_not_a_classifier(tmp_path, capsys):
    """MoCo v1's fc is linear but a projection (the checkpoint has a key encoder): it is not exported as fc."""
    path, out = tmp_path / "moco_v1.pth", tmp_path / "v1.pth"
    torch.save(moco_v2_checkpoint("resnet18", mlp=False)[0], path)
    printed = _export(capsys, path, "--to", "torchvision", "-o", out)
    assert "head fc.* (2 tensors)" in printed and "fc.weight" not in torch.load(out, weights_only=True)


@pytest.mark.parametrize("target", ["torchvision", "timm"])
def test_small_stem_says_what_the_model_needs(sources, target, tmp_path, capsys):
    out = tmp_path / "small.pth"
    printed = _export(capsys, sources["small"], "--to", target, "-o", out)  # no --stem: read from conv1's 3x3
    assert "(small stem)" in printed
    assert "model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)" in printed
    assert "model.maxpool = torch.nn.Identity()" in printed
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _reference(sources["small"], True, stem="small")(images)
        torch.testing.assert_close(_printed_model(printed)(images), expected, **CLOSE)
    _export(capsys, sources["small"], "--to", target, "-o", out, "--stem", "small", "--force")


def test_small_stem_refused_for_detectron2_and_stem_checked(sources, tmp_path, capsys):
    out = tmp_path / "small.pkl"
    for extra in ([], ["--stem", "small"]):
        err = _fails(capsys, sources["small"], "--to", "detectron2", "-o", out, *extra)
        assert "small stem" in err and "7x7" in err and "--to torchvision or timm" in err
    assert not out.exists()
    assert "pass --stem small" in _fails(capsys, sources["small"], "--to", "timm", "-o", out, "--stem", "imagenet")
    assert "pass --stem imagenet" in _fails(capsys, sources["lincls"], "--to", "timm", "-o", out, "--stem", "small")


def test_arch_checked_against_the_weights(sources, tmp_path, capsys):
    err = _fails(capsys, sources["lincls"], "--to", "torchvision", "-o", tmp_path / "a.pth", "-a", "resnet34")
    assert "does not fit resnet34" in err and "look like a resnet18" in err
    assert "as resnet18" in _export(capsys, sources["lincls"], "--to", "torchvision", "-o", tmp_path / "a.pth",
                                    "-a", "resnet18")
    assert "invalid choice: 'resnet7'" in _fails(capsys, sources["lincls"], "--to", "timm", "-o", "x", "-a", "resnet7")


def test_bad_input(sources, tmp_path, capsys):
    out = tmp_path / "out.pth"
    src = sources["lincls"]
    assert "does not exist" in _fails(capsys, tmp_path / "nope.pth", "--to", "timm", "-o", out)
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "empty.pth")
    err = _fails(capsys, tmp_path / "empty.pth", "--to", "timm", "-o", out)
    assert "empty.pth" in err and "no ResNet backbone found" in err and "encoder.weight" in err
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert "not a PyTorch checkpoint" in _fails(capsys, tmp_path / "text.pth", "--to", "timm", "-o", out)
    assert "invalid choice: 'onnx'" in _fails(capsys, src, "--to", "onnx", "-o", out)
    err = _fails(capsys, src, "--to", "timm", "-o", tmp_path / "missing" / "out.pth")
    assert "does not exist: create it" in err
    (tmp_path / "afile").write_text("")
    assert "does not exist" in _fails(capsys, src, "--to", "timm", "-o", tmp_path / "afile" / "out.pth")
    assert "is a directory" in _fails(capsys, src, "--to", "timm", "-o", tmp_path)
    if os.path.isdir("/proc"):  # cannot be written, even by root
        assert "cannot be written" in _fails(capsys, src, "--to", "timm", "-o", "/proc/out.pth")
    assert "-o " + str(tmp_path / "d2.pkl") in _fails(capsys, src, "--to", "detectron2", "-o", tmp_path / "d2.pth")
    assert not list(tmp_path.glob("*out.pth*"))


def test_read_only_directory(sources, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)                       # enough for a user
    with ExitStack() as mounted:
        if os.geteuid() == 0:                      # root writes through the mode, not to a read-only mount
            mounted.enter_context(tmpfs_mounted(locked, "ro"))
        err = _fails(capsys, sources["lincls"], "--to", "timm", "-o", locked / "out.pth")
        assert "cannot be written" in err and str(locked) in err, err
        assert list(locked.iterdir()) == []


def test_existing_output_needs_force(sources, tmp_path, capsys):
    out = tmp_path / "out.pth"
    out.write_bytes(b"precious")
    assert "pass --force" in _fails(capsys, sources["lincls"], "--to", "torchvision", "-o", out)
    assert out.read_bytes() == b"precious"
    _export(capsys, sources["lincls"], "--to", "torchvision", "-o", out, "--force")
    assert "fc.weight" in torch.load(out, weights_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]  # no temporary file left behind
    head = head_path(tmp_path / "m.pth")
    head.write_bytes(b"")
    assert "m.head.pth" in _fails(capsys, sources["moco"], "--to", "timm", "-o", tmp_path / "m.pth", "--keep-head")


def _readme_section(title: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_use_the_student_commands_as_written(tmp_path, monkeypatch):
    """The README's export commands and loading code, verbatim, on checkpoints at the paths they name."""
    section = _readme_section("Use the student")
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()
                if line.startswith("python -m moco_mgd.export")]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(commands) == 4 and len(snippets) == 2
    (tmp_path / "runs" / "r18_mgd").mkdir(parents=True)
    (tmp_path / "runs" / "r18_mgd_lincls").mkdir()
    torch.save(_pretrain_checkpoint(), tmp_path / "runs" / "r18_mgd" / "checkpoint_0199.pth.tar")
    torch.save(_lincls_checkpoint(num_classes=1000), tmp_path / "runs" / "r18_mgd_lincls" / "model_best.pth.tar")
    for command in commands:
        result = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    monkeypatch.chdir(tmp_path)
    batch = torch.randn(2, 3, 64, 64)
    namespace = {}   # one session: the second snippet goes on from the first's imports
    for snippet, expected in zip(snippets, [(2, 512), (2, 128)]):
        exec(snippet, namespace)  # noqa: S102 - the README's code, as a user pastes it
        assert namespace["model"].eval()(batch).shape == expected
