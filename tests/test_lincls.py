"""Linear classification (main_lincls.py): frozen backbone, weight layouts, end to end, 2 processes, bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import main_lincls
from moco_mgd.models.resnet import build_resnet
from moco_mgd.checkpoints.files import with_module_prefix
from moco_mgd.data import build_dataset
from moco_mgd.evaluation.lincls import build_linear_model, check_frozen_weights, frozen_state, train_epoch, train_transform
from moco_mgd.models.moco import MoCo
from tests.helpers import free_port, make_image_folder, moco_v2_checkpoint, randomize_bn, write_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(module_dir):
    root = make_image_folder(str(module_dir("data")), splits=("train", "val"), per_class=8, size=40)
    # 15 val images: a padded shard (DistributedSampler's) would count one of them twice on 2 ranks.
    os.remove(os.path.join(root, "val", "class1", "img7.png"))
    return root


@pytest.fixture(scope="module")
def moco_path(module_dir):
    checkpoint, _ = moco_v2_checkpoint("resnet18", mlp=True)
    path = module_dir("moco") / "moco_v2_pretrain.pth.tar"
    torch.save(checkpoint, path)
    return str(path)


def _args(data, out, pretrained=None, epochs=2, extra=()):
    args = [str(data), "-a", "resnet18", "--epochs", str(epochs), "-b", "8", "-j", "0", "--image-size", "32",
            "--seed", "0", "-p", "1", "--output-dir", str(out)]
    return args + (["--pretrained", pretrained] if pretrained else []) + list(extra)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _backbone_equal(model, reference):
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in reference.state_dict().items() if not k.startswith("fc."))


# --- the model: what is loaded, what trains ---------------------------------------

def test_only_fc_trains_and_is_reinitialised(moco_path):
    model, description = build_linear_model("resnet18", 10, moco_path)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert abs(model.fc.weight.std().item() - 0.01) < 0.001 and abs(model.fc.weight.mean().item()) < 0.001
    assert torch.all(model.fc.bias == 0)
    assert "120 tensors" in description and "module.encoder_q." in description and "MLP head" in description


def test_official_moco_checkpoint_loads_encoder_q(moco_path):
    checkpoint, encoder_q = moco_v2_checkpoint("resnet18", mlp=True)
    model, _ = build_linear_model("resnet18", 2, moco_path)
    assert _backbone_equal(model, encoder_q)
    assert not torch.equal(model.conv1.weight, checkpoint["state_dict"]["module.encoder_k.conv1.weight"])


def test_project_and_torchvision_layouts(tmp_path):
    moco = MoCo("resnet18", dim=16, K=16, mlp=True)
    randomize_bn(moco.encoder_q, seed=5)  # distinct from encoder_k, which MoCo copies at init
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": with_module_prefix(moco.state_dict()), "mgd": None},
               tmp_path / "project.pth.tar")
    model, description = build_linear_model("resnet18", 2, str(tmp_path / "project.pth.tar"))
    assert _backbone_equal(model, moco.encoder_q) and "module.encoder_q." in description
    torchvision_model = randomize_bn(build_resnet("resnet18"), seed=7)
    torch.save(torchvision_model.state_dict(), tmp_path / "torchvision.pth")
    model, description = build_linear_model("resnet18", 2, str(tmp_path / "torchvision.pth"))
    assert _backbone_equal(model, torchvision_model) and "plain torchvision keys" in description


def test_one_epoch_leaves_backbone_and_bn_statistics_alone(data_dir, moco_path):
    model, _ = build_linear_model("resnet18", 2, moco_path)
    reference, fc_before = frozen_state(model), model.fc.weight.detach().clone()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    loader = DataLoader(build_dataset("imagefolder", data_dir, "train", train_transform(32)), batch_size=8)
    optimizer = torch.optim.SGD(model.fc.parameters(), 30.0, momentum=0.9)
    stats = train_epoch(model, loader, optimizer, torch.device("cpu"), epoch=0, print_freq=0)
    assert set(stats) == {"loss", "top1", "images_per_s"}
    check_frozen_weights(model, reference)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in bn_before.items())
    assert not torch.equal(model.fc.weight, fc_before)
    model.train()(next(iter(loader))[0])  # a forward in train mode moves the BN statistics: the check sees it
    with pytest.raises(AssertionError, match="bn1.running_mean changed"):
        check_frozen_weights(model, reference)


# --- end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(data_dir, moco_path, module_dir):
    out = module_dir("lincls")
    main_lincls.main(_args(data_dir, out, moco_path, epochs=2))
    return out


def test_end_to_end_writes_moco_checkpoints(run):
    state = _load(run / "checkpoint.pth.tar")
    assert state["epoch"] == 2 and state["arch"] == "resnet18" and state["config"]["pretrained"]
    assert state["state_dict"]["module.fc.weight"].shape == (2, 512)
    assert set(state) == {"epoch", "arch", "state_dict", "best_acc1", "optimizer", "config"}
    assert _load(run / "model_best.pth.tar")["best_acc1"] == state["best_acc1"]
    log = (run / "log.txt").read_text()
    assert "120 tensors loaded from --pretrained" in log and "val top1" in log


def test_evaluate_and_resume(run, data_dir, tmp_path):
    main_lincls.main(_args(data_dir, tmp_path / "eval", extra=["-e", "--resume", str(run / "checkpoint.pth.tar")]))
    assert _records(tmp_path / "eval", "eval")[0]["top1"] == pytest.approx(_records(run, "epoch")[-1]["top1"])
    main_lincls.main(_args(data_dir, tmp_path / "more", epochs=3, extra=["--resume", str(run / "checkpoint.pth.tar")]))
    assert _load(tmp_path / "more" / "checkpoint.pth.tar")["epoch"] == 3
    assert [r["epoch"] for r in _records(tmp_path / "more", "epoch")] == [2]


def test_started_again_it_goes_on_from_its_own_last_epoch(run, data_dir, moco_path, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "checkpoint.pth.tar").write_bytes((run / "checkpoint.pth.tar").read_bytes())   # stopped after 2 epochs
    main_lincls.main(_args(data_dir, out, moco_path, epochs=3))     # no --resume
    assert f"resumed from {out / 'checkpoint.pth.tar'} at epoch 2" in (out / "log.txt").read_text()
    assert [r["epoch"] for r in _records(out, "epoch")] == [2]
    assert _load(out / "checkpoint.pth.tar")["epoch"] == 3


def test_cached_features_separates_an_easy_dataset(tmp_path):
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40), (220, 40, 220)]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):  # the same class colours in both splits, fresh noise
        for c, colour in enumerate(colours):
            os.makedirs(tmp_path / "easy" / split / f"c{c}")
            for i in range(4):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "easy" / split / f"c{c}" / f"{i}.png")
    out = tmp_path / "out"
    main_lincls.main(_args(tmp_path / "easy", out, epochs=20,
                           extra=["--cached-features", "--lr", "0.1", "--schedule", "12", "-p", "0"]))
    epochs = _records(out, "epoch")
    assert [r["lr"] for r in epochs[11:13]] == pytest.approx([0.1, 0.01])
    assert epochs[-1]["top1"] == 100.0 and epochs[-1]["top5"] == 100.0
    assert _load(out / "model_best.pth.tar")["best_acc1"] == 100.0
    assert "cached train features (20, 512)" in (out / "log.txt").read_text()
    # --max-images draws the training subset (of the cached features too); val stays whole.
    main_lincls.main(_args(tmp_path / "easy", tmp_path / "subset", epochs=1,
                           extra=["--cached-features", "--max-images", "7", "-p", "0"]))
    log = (tmp_path / "subset" / "log.txt").read_text()
    assert "cached train features (7, 512)" in log and "cached val features (20, 512)" in log
    # The checkpoint is a whole model: evaluating it on the images (val transform) gives the same result.
    main_lincls.main(_args(tmp_path / "easy", tmp_path / "eval",
                           extra=["-e", "--resume", str(out / "checkpoint.pth.tar")]))
    assert _records(tmp_path / "eval", "eval")[0]["top1"] == 100.0


def test_two_processes_average_accuracy_over_ranks(run, data_dir, tmp_path):
    main_lincls.main(_args(data_dir, tmp_path, str(run / "checkpoint.pth.tar"), epochs=1, extra=[
        "--multiprocessing-distributed", "--nproc-per-node", "2", "--world-size", "1", "--rank", "0",
        "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--dist-backend", "gloo"]))
    assert "2 process(es) x 4" in (tmp_path / "log.txt").read_text()
    main_lincls.main(_args(data_dir, tmp_path / "eval", extra=["-e", "--resume", str(tmp_path / "checkpoint.pth.tar")]))
    two, one = _records(tmp_path, "epoch")[-1], _records(tmp_path / "eval", "eval")[0]
    assert two["top1"] == pytest.approx(one["top1"]) and two["loss"] == pytest.approx(one["loss"], rel=1e-4)


# --- bad input: exit code 2 and the problem named, before anything runs --------------

def _fails(args, capsys, *fragments):
    with pytest.raises(SystemExit) as info:
        main_lincls.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(fragment in err for fragment in fragments), err


def test_bad_data(tmp_path, capsys):
    make_image_folder(str(tmp_path / "no_val"), splits=("train",), per_class=1)
    _fails(_args(tmp_path / "no_val", tmp_path / "o"), capsys, "no val/ folder")
    make_image_folder(str(tmp_path / "other"), splits=("train", "val"), per_class=1)
    os.rename(tmp_path / "other" / "val" / "class1", tmp_path / "other" / "val" / "dog")
    _fails(_args(tmp_path / "other", tmp_path / "o"), capsys, "classes of train/ and val/ differ", "dog")


def test_bad_pretrained(data_dir, tmp_path, capsys):
    _fails(_args(data_dir, tmp_path, str(tmp_path / "nope.pth")), capsys, "nope.pth", "does not exist")
    torch.save({"state_dict": {"head.weight": torch.zeros(2)}}, tmp_path / "nothing.pth")
    _fails(_args(data_dir, tmp_path, str(tmp_path / "nothing.pth")), capsys, "no ResNet backbone", "head.weight")
    torch.save(build_resnet("resnet34").state_dict(), tmp_path / "r34.pth")
    _fails(_args(data_dir, tmp_path, str(tmp_path / "r34.pth")), capsys, "does not fit resnet18",
           "look like a resnet34")


def test_bad_output_dir_and_resume(data_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    _fails(_args(data_dir, tmp_path / "a_file" / "out"), capsys, "is not writable")
    _fails(_args(data_dir, tmp_path, extra=["--resume", str(tmp_path / "a_file")]), capsys, "--resume checkpoint")


def test_model_best_holds_the_best_epochs_classifier(data_dir, moco_path, tmp_path):
    # Saved at the end only (a fast cached-features run): model_best must still be the best epoch's
    # fc, not the last one's, and evaluating it must give the best top-1 again.
    out = tmp_path / "best"
    main_lincls.main(_args(data_dir, out, moco_path, epochs=8, extra=["--cached-features", "--lr", "30", "-p", "0"]))
    top1 = [r["top1"] for r in _records(out, "epoch")]
    best_epoch = top1.index(max(top1))
    assert best_epoch != len(top1) - 1, top1   # else this test could not tell the two apart
    best, last = _load(out / "model_best.pth.tar"), _load(out / "checkpoint.pth.tar")
    assert last["epoch"] == 8 and best["epoch"] == best_epoch + 1 and best["best_acc1"] == max(top1)
    assert not torch.equal(best["state_dict"]["module.fc.weight"], last["state_dict"]["module.fc.weight"])
    assert torch.equal(best["state_dict"]["module.conv1.weight"], last["state_dict"]["module.conv1.weight"])
    main_lincls.main(_args(data_dir, tmp_path / "eval", extra=["-e", "--resume", str(out / "model_best.pth.tar")]))
    assert _records(tmp_path / "eval", "eval")[0]["top1"] == pytest.approx(max(top1)), top1


def test_knn_of_the_cached_features_is_the_knn_tools(moco_path, tmp_path, capsys):
    # The teacher and random-weight rows of the study take their kNN from here instead of a second
    # feature extraction: it must be the number `python -m moco_mgd.evaluation.knn` gives.
    from moco_mgd.evaluation import knn

    write_fashion_mnist(tmp_path / "fm", "train", n=64)
    write_fashion_mnist(tmp_path / "fm", "t10k", n=40, seed=1)
    common = [str(tmp_path / "fm"), "--dataset", "fashion-mnist", "-a", "resnet18", "--pretrained", moco_path,
              "-b", "8", "-j", "0", "--image-size", "32", "--seed", "0", "--max-images", "48"]
    out = tmp_path / "lincls"
    main_lincls.main([*common, "--epochs", "1", "--output-dir", str(out), "--cached-features", "--knn-k", "5",
                      "--knn-t", "0.1", "-p", "0"])
    knn.main([*common, "-k", "5", "--temperature", "0.1", "--output-dir", str(tmp_path / "knn")])
    from_lincls, from_tool = _records(out, "knn")[0], _records(tmp_path / "knn", "knn")[0]
    assert 0 < from_tool["top1"] < 100, from_tool    # a number that could differ
    assert from_lincls["top1"] == from_tool["top1"] and from_lincls["top5"] == from_tool["top5"]
    assert from_lincls["k"] == 5 and "kNN (k=5, T=0.1) of the cached features" in (out / "log.txt").read_text()
    _fails([*common, "--output-dir", str(tmp_path / "o"), "--knn-k", "5"], capsys, "add --cached-features")
    _fails([*common, "--output-dir", str(tmp_path / "o"), "--cached-features", "--knn-k", "50"], capsys,
           "more neighbours than the 48 training images")
