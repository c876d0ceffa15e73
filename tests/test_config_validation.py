"""Impossible numeric flags of both entry scripts: exit code 2 naming the flag, before anything starts or is written."""
import os

import pytest
import torch

import main_lincls
import main_moco_mgd
from moco_mgd import export
from moco_mgd.evaluation import knn
from moco_mgd.models.resnet import build_resnet
from moco_mgd.runtime import launch
from moco_mgd.checkpoints.files import with_module_prefix
from tests.helpers import moco_v2_checkpoint

PRETRAIN_BAD = [
    (["-j", "-1"], "-j/--workers -1: must be >= 0"),
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--start-epoch", "-1"], "--start-epoch -1: must be >= 0 and < --epochs (2)"),
    (["--start-epoch", "2"], "--start-epoch 2: must be >= 0 and < --epochs (2)"),
    (["-b", "0"], "-b/--batch-size 0: must be >= 1"),
    (["--lr", "-1"], "--lr -1.0: must be positive"),
    (["--lr", "0"], "--lr 0.0: must be positive"),
    (["--lr", "nan"], "--lr nan: must be finite and positive"),
    (["--schedule", "1", "-1"], "--schedule 1 -1: must be epochs >= 0"),
    (["--momentum", "1"], "--momentum 1.0: must be in [0, 1)"),
    (["--momentum", "-0.1"], "--momentum -0.1: must be in [0, 1)"),
    (["--wd", "-0.0001"], "--wd/--weight-decay -0.0001: must be >= 0"),
    (["-p", "-1"], "-p/--print-freq -1: must be >= 0"),
    (["--seed", "-1"], "--seed -1: must be in [0, 4294967295] (numpy's seeds)"),
    (["--moco-dim", "0"], "--moco-dim 0: must be >= 1"),
    (["--moco-k", "0"], "--moco-k 0: must be >= 1"),
    (["--moco-m", "1.5"], "--moco-m 1.5: must be in [0, 1]"),
    (["--moco-m", "-0.1"], "--moco-m -0.1: must be in [0, 1]"),
    (["--moco-t", "0"], "--moco-t 0.0: must be positive"),
    (["--moco-t", "inf"], "--moco-t inf: must be finite and positive"),
    (["--mgd-loss-factor", "-1"], "--mgd-loss-factor -1.0: must be positive"),
    (["--mgd-samples", "0"], "--mgd-samples 0: must be >= 1"),
    (["--mgd-stage-weights", "1", "1", "1"], "--mgd-stage-weights 1 1 1: give one weight >= 0 per ResNet stage (4)"),
    (["--mgd-stage-weights", "1", "-1", "1", "1"], "--mgd-stage-weights 1 -1 1 1: give one weight >= 0 per"),
    (["--mgd-stage-weights", "0", "0", "0", "0"], "--mgd-stage-weights 0 0 0 0: give one weight >= 0 per"),
    (["--cckd-weight", "-1"], "--cckd-weight -1.0: must be >= 0"),
    (["--cckd-gamma", "0"], "--cckd-gamma 0.0: must be positive"),
    (["--cckd-order", "-1"], "--cckd-order -1: must be >= 0"),
    (["--disco-weight", "-1"], "--disco-weight -1.0: must be >= 0"),
    (["--mlp-hidden-dim", "-1"], "--mlp-hidden-dim -1: must be >= 0 (0: MoCo's width)"),
    (["--seed-weight", "-1"], "--seed-weight -1.0: must be >= 0"),
    (["--seed-queue", "0"], "--seed-queue 0: must be >= 1"),
    (["--seed-t", "0"], "--seed-t 0.0: must be positive"),
    (["--seed-teacher-t", "-1"], "--seed-teacher-t -1.0: must be positive"),
    (["--image-size", "0"], "--image-size 0: must be >= 1"),
    (["--shuffle-bn-splits", "0"], "--shuffle-bn-splits 0: must be >= 1"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints -1: must be >= 0 (0: all)"),
    (["--max-skipped-images", "-1"], "--max-skipped-images -1: must be >= 0"),
    (["--max-images", "-1"], "--max-images -1: must be >= 0 (0: all images)"),
    (["--knn-freq", "-1"], "--knn-freq -1: must be >= 0 (0: off)"),
    (["--knn-k", "0"], "--knn-k 0: must be >= 1"),
    (["--knn-t", "0"], "--knn-t 0.0: must be positive"),
    (["--world-size", "0"], "--world-size 0: must be -1 (one node) or >= 1"),
    (["--world-size", "2", "--rank", "2"], "--rank 2: must be -1 or in [0, 2) (--world-size 2)"),
    (["--gpu", "-1"], "--gpu -1: must be >= 0"),
    (["--nproc-per-node", "0"], "--nproc-per-node 0: must be >= 1"),
    (["--dist-timeout", "0"], "--dist-timeout 0.0: must be positive"),
]

LINCLS_BAD = [
    (["-j", "-1"], "-j/--workers -1: must be >= 0"),
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--start-epoch", "2"], "--start-epoch 2: must be >= 0 and < --epochs (2)"),
    (["-b", "0"], "-b/--batch-size 0: must be >= 1"),
    (["--lr", "-1"], "--lr -1.0: must be positive"),
    (["--schedule", "-5"], "--schedule -5: must be epochs >= 0"),
    (["--momentum", "1.5"], "--momentum 1.5: must be in [0, 1)"),
    (["--wd", "-1"], "--wd/--weight-decay -1.0: must be >= 0"),
    (["-p", "-1"], "-p/--print-freq -1: must be >= 0"),
    (["--seed", str(2 ** 32)], "--seed 4294967296: must be in [0, 4294967295] (numpy's seeds)"),
    (["--image-size", "0"], "--image-size 0: must be >= 1"),
    (["--max-images", "-1"], "--max-images -1: must be >= 0 (0: all images)"),
    (["--world-size", "-2"], "--world-size -2: must be -1 (one node) or >= 1"),
    (["--nproc-per-node", "0"], "--nproc-per-node 0: must be >= 1"),
]


def _pretrain_args(data, out):
    return [str(data), "-a", "resnet18", "--epochs", "2", "-b", "8", "--moco-k", "16", "--moco-dim", "16", "-j", "0",
            "--image-size", "32", "--output-dir", str(out)]


def _lincls_args(data, out):
    return [str(data), "-a", "resnet18", "--epochs", "2", "-b", "8", "-j", "0", "--image-size", "32",
            "--output-dir", str(out)]


@pytest.fixture
def saved_run(tmp_path):
    """An output directory holding a checkpoint, and a check that nothing in it was touched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint_0000.pth.tar").write_bytes(b"an earlier run")
    before = os.stat(out).st_mtime_ns

    def untouched():
        assert os.listdir(out) == ["checkpoint_0000.pth.tar"]
        assert (out / "checkpoint_0000.pth.tar").read_bytes() == b"an earlier run"
        assert os.stat(out).st_mtime_ns == before  # not even check_writable's probe file came and went

    return out, untouched


@pytest.fixture
def no_launch(monkeypatch):
    """Replace the process launch: a config that passes every check is recorded instead of trained."""
    configs = []
    monkeypatch.setattr(launch, "launch", lambda worker, config, **kwargs: configs.append(config))
    return configs


def _refused(main, args, message, capsys, no_launch):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not no_launch


@pytest.mark.parametrize("extra, message", PRETRAIN_BAD, ids=[" ".join(a) for a, _ in PRETRAIN_BAD])
def test_pretrain_refuses_impossible_numbers(extra, message, data_dir, saved_run, capsys, no_launch):
    out, untouched = saved_run
    _refused(main_moco_mgd.main, _pretrain_args(data_dir, out) + extra, message, capsys, no_launch)
    untouched()


@pytest.mark.parametrize("extra, message", LINCLS_BAD, ids=[" ".join(a) for a, _ in LINCLS_BAD])
def test_lincls_refuses_impossible_numbers(extra, message, data_dir, saved_run, capsys, no_launch):
    out, untouched = saved_run
    _refused(main_lincls.main, _lincls_args(data_dir, out) + extra, message, capsys, no_launch)
    untouched()


PRETRAIN_EDGES = ["--moco-m", "1", "--momentum", "0", "--wd", "0", "-j", "0", "-p", "0", "--keep-checkpoints", "0",
                  "--start-epoch", "199", "--knn-freq", "0", "--cckd-order", "0", "--max-images", "0", "--seed", "0",
                  "--world-size", "1", "--rank", "0", "--schedule"]
LINCLS_EDGES = ["--momentum", "0", "--wd", "0", "-j", "0", "-p", "0", "--start-epoch", "99", "--seed", "4294967295",
                "--world-size", "1", "--rank", "0", "--schedule", "0"]


@pytest.mark.parametrize("main, edges", [(main_moco_mgd.main, PRETRAIN_EDGES), (main_lincls.main, LINCLS_EDGES)],
                         ids=["pretrain", "lincls"])
@pytest.mark.parametrize("with_edges", [False, True], ids=["defaults", "edges"])
def test_defaults_and_edge_values_pass(main, edges, with_edges, data_dir, tmp_path, no_launch):
    main([data_dir, "--output-dir", str(tmp_path)] + (edges if with_edges else []))
    assert len(no_launch) == 1


# --- the bad inputs that ended in a traceback or ran on silently (issue 26, part 4) ----------

NAN_TENSOR = "state_dict/module.encoder_q.layer1.0.conv1.weight"


@pytest.fixture(scope="module")
def checkpoints(module_dir):
    """Real files of each kind: a MoCo-v2 ResNet-18 (teacher layout), the same with one NaN weight,
    a linear evaluation's checkpoint (main_lincls.py's layout) and a bare torchvision state dict."""
    root = module_dir("checkpoints")
    teacher, _ = moco_v2_checkpoint("resnet18", mlp=True)
    torch.save(teacher, root / "teacher.pth.tar")
    teacher["state_dict"]["module.encoder_q.layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(teacher, root / "nan.pth.tar")
    model = build_resnet("resnet18", num_classes=2)
    optimizer = torch.optim.SGD(model.fc.parameters(), 0.1, momentum=0.9)
    torch.save({"epoch": 2, "arch": "resnet18", "state_dict": with_module_prefix(model.state_dict()),
                "best_acc1": 62.5, "optimizer": optimizer.state_dict(), "config": {"arch": "resnet18"}},
               root / "lincls.pth.tar")
    torch.save(build_resnet("resnet18").state_dict(), root / "torchvision.pth")
    return root


# (entry point, extra flags (CHECKPOINTS: the fixture's directory), what the message must name)
SPAWN = ["--multiprocessing-distributed", "--nproc-per-node", "2", "--dist-url"]
BAD_INPUTS = {
    "resume a linear evaluation": (
        "pretrain", ["--resume", "CHECKPOINTS/lincls.pth.tar"],
        ["CHECKPOINTS/lincls.pth.tar", "is a linear-evaluation checkpoint", "best top-1 62.50",
         "--resume takes a checkpoint_NNNN.pth.tar that main_moco_mgd.py wrote", "main_lincls.py --resume"]),
    "resume a bare network": (
        "pretrain", ["--resume", "CHECKPOINTS/torchvision.pth"],
        ["CHECKPOINTS/torchvision.pth", "is not a pretraining checkpoint", "module.encoder_q.*", "'bn1.bias'",
         "a teacher goes to --teacher-checkpoint"]),
    "dist-url without port": ("pretrain", SPAWN + ["tcp://nonsense"],
                              ["--dist-url 'tcp://nonsense' needs a host and a port", "tcp://HOST:PORT"]),
    "dist-url port out of range": ("pretrain", SPAWN + ["tcp://127.0.0.1:99999"], ["a port from 1 to 65535"]),
    "dist-url without host": ("pretrain", SPAWN + ["tcp://:23456"], ["needs a host and a port"]),
    "dist-url of another scheme": ("pretrain", SPAWN + ["udp://127.0.0.1:23456"],
                                   ["is not a rendezvous address torch can use", "env://", "file://"]),
    "dist-url env without its variables": ("pretrain", SPAWN + ["env://"],
                                           ["MASTER_ADDR and MASTER_PORT are not set"]),
    "dist-url file in no directory": ("lincls", SPAWN + ["file:///no/such/dir/rendezvous"],
                                      ["the directory of '/no/such/dir/rendezvous' does not exist"]),
    "teacher with NaN": ("pretrain", ["--teacher-arch", "resnet18", "--teacher-checkpoint", "CHECKPOINTS/nan.pth.tar"],
                         ["teacher checkpoint 'CHECKPOINTS/nan.pth.tar'", NAN_TENSOR, "1 NaN or inf value(s)"]),
    "resume with NaN": ("pretrain", ["--resume", "CHECKPOINTS/nan.pth.tar"],
                        ["--resume checkpoint 'CHECKPOINTS/nan.pth.tar'", NAN_TENSOR, "use an earlier checkpoint"]),
    "pretrained with NaN": ("lincls", ["--pretrained", "CHECKPOINTS/nan.pth.tar"],
                            ["--pretrained 'CHECKPOINTS/nan.pth.tar'", NAN_TENSOR]),
    "knn of NaN weights": ("knn", ["--pretrained", "CHECKPOINTS/nan.pth.tar"], ["CHECKPOINTS/nan.pth.tar", NAN_TENSOR]),
    "export of NaN weights": ("export", [], ["CHECKPOINTS/nan.pth.tar", NAN_TENSOR]),
    "image size 7": ("pretrain", ["--image-size", "7"],
                     ["--image-size 7 is too small for the imagenet stem", "layer1 2x2, layer2 1x1, layer3 1x1, layer4 1x1",
                      "use --image-size 9 or more, or --stem small (from 3 px)"]),
    "image size 8": ("pretrain", ["--image-size", "8"], ["--image-size 8 is too small", "use --image-size 9 or more"]),
    "image size 2, small stem": ("pretrain", ["--image-size", "2", "--stem", "small"],
                                 ["--image-size 2 is too small for the small stem", "use --image-size 3 or more"]),
    "lincls image size 7": ("lincls", ["--image-size", "7"], ["--image-size 7 is too small", "9 or more"]),
    "knn image size 7": ("knn", ["--image-size", "7"], ["--image-size 7 is too small", "9 or more"]),
}


def _entry(kind, data, out, checkpoints, extra):
    extra = [a.replace("CHECKPOINTS", str(checkpoints)) for a in extra]
    if kind == "pretrain":
        return main_moco_mgd.main, _pretrain_args(data, out) + extra
    if kind == "lincls":
        return main_lincls.main, _lincls_args(data, out) + extra
    if kind == "knn":
        pretrained = [] if "--pretrained" in extra else ["--random-init"]
        return knn.main, [str(data), "-a", "resnet18", "-k", "2", "-j", "0", "--image-size", "32", *pretrained, *extra]
    return export.main, [str(checkpoints / "nan.pth.tar"), "--to", "timm", "-o", str(out / "student.pth")]


@pytest.mark.parametrize("kind, extra, fragments", BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_bad_inputs_are_refused_naming_the_problem_and_the_fix(kind, extra, fragments, data_dir, checkpoints,
                                                               saved_run, capsys, no_launch, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    out, _ = saved_run
    files = lambda: {p: p.read_bytes() for directory in (out, checkpoints) for p in directory.iterdir()}
    before = files()
    main, args = _entry(kind, data_dir, out, checkpoints, extra)
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment.replace("CHECKPOINTS", str(checkpoints)) in err, err
    assert not no_launch
    assert files() == before   # nothing saved is touched, nothing written


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:23456", "tcp://node-001.cluster:29500", "env://", "file:///tmp/rdv"])
def test_good_dist_urls_pass(url, data_dir, tmp_path, no_launch, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "23456")
    main_moco_mgd.main(_pretrain_args(data_dir, tmp_path) + SPAWN + [url])
    assert len(no_launch) == 1


def test_a_clean_checkpoint_still_loads_everywhere(data_dir, checkpoints, tmp_path, no_launch):
    main_moco_mgd.main(_pretrain_args(data_dir, tmp_path / "a") + ["--teacher-arch", "resnet18", "--teacher-checkpoint",
                                                                   str(checkpoints / "teacher.pth.tar")])
    main_lincls.main(_lincls_args(data_dir, tmp_path / "b") + ["--pretrained", str(checkpoints / "teacher.pth.tar")])
    assert len(no_launch) == 2


def test_a_degenerate_image_size_runs_with_one_warning_naming_the_map_sizes(data_dir, tmp_path):
    main_moco_mgd.main(_pretrain_args(data_dir, tmp_path) + ["--image-size", "16", "--epochs", "1"])
    log = (tmp_path / "log.txt").read_text()
    warning = ("--image-size 16 with the imagenet stem leaves layer3 and layer4 at 1x1 (layer1 4x4, layer2 2x2, "
               "layer3 1x1, layer4 1x1)")
    assert log.count(warning) == 1 and "17 px or more" in log
    assert (tmp_path / "checkpoint_0000.pth.tar").is_file()
