"""Exact pairing: a baseline and a distilled run of one seed train on the same draws.

Same images, augmentations, initial student weights and shuffle-BN permutations; whatever the
distillation adds (the teacher's construction, the embedding heads, the teacher's kNN reference,
random drop) draws from streams of its own. Checked on real one-step runs of ``main_moco_mgd.py``.
"""
import json

import pytest
import torch

import main_moco_mgd
from moco_mgd.checkpoints.files import checkpoint_path


def _args(data_dir, out, epochs=1, extra=()):
    # 2 classes x 8 images and -b 16: one step per epoch.
    return [data_dir, "-a", "resnet18", "--epochs", str(epochs), "-b", "16", "--moco-k", "32",
            "-j", "0", "--image-size", "32", "--seed", "3", "--mlp", "--aug-plus", "--output-dir", str(out), "-p", "1",
            "--keep-checkpoints", "0", "--lr", "0.05", "--knn-freq", "1", "--knn-k", "4", *extra]


def _distilled(teacher_path):
    # Random drop (per-step draws), DisCo (a head of its own) and the teacher's kNN reference line.
    return ["--teacher-checkpoint", teacher_path, "--mgd-reducer", "rd", "--mgd-samples", "16",
            "--mgd-schedule", "every:1", "--disco-weight", "1"]


def _first_step(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "train" and r["epoch"] == 0 and r["iteration"] == 0)


def _state(out, epoch):
    return torch.load(checkpoint_path(out, epoch), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def paired_runs(data_dir, teacher_path, module_dir):
    baseline, distilled = module_dir("baseline"), module_dir("distilled")
    main_moco_mgd.main(_args(data_dir, baseline))
    main_moco_mgd.main(_args(data_dir, distilled, extra=_distilled(teacher_path)))
    return baseline, distilled


def test_first_step_keys_and_queue_are_bitwise_the_same_with_and_without_a_teacher(paired_runs):
    baseline, distilled = (_state(out, 0)["state_dict"] for out in paired_runs)
    # The queue after one step: the initial queue with the first batch's keys enqueued. The keys
    # depend on the initial weights, the augmented key view and the shuffle-BN permutation.
    assert int(baseline["module.queue_ptr"]) == int(distilled["module.queue_ptr"]) == 16
    assert torch.equal(baseline["module.queue"], distilled["module.queue"])
    # The key encoder after one step is the momentum update of the two identical initial encoders.
    key_encoder = [k for k in baseline if k.startswith("module.encoder_k.")]
    assert key_encoder and all(torch.equal(baseline[k], distilled[k]) for k in key_encoder)
    # The query encoder did train differently: the distillation losses changed its gradient.
    assert not torch.equal(baseline["module.encoder_q.conv1.weight"], distilled["module.encoder_q.conv1.weight"])


def test_first_step_infonce_is_equal_in_both_metrics_logs(paired_runs):
    baseline, distilled = (_first_step(out) for out in paired_runs)
    for name in ("infonce", "pos_sim", "neg_sim", "query_cos", "inst_acc", "acc1"):
        assert baseline[name] == distilled[name], name
    assert "mgd" in distilled and "disco" in distilled and "mgd" not in baseline


def test_random_drop_draws_resume_exactly(data_dir, teacher_path, module_dir):
    """Random drop's generator is checkpointed: a run resumed after epoch 0 ends where the uninterrupted one did."""
    out = module_dir("rd_resume")
    flags = _args(data_dir, out, epochs=2, extra=_distilled(teacher_path))
    main_moco_mgd.main(flags)
    uninterrupted = _state(out, 1)
    assert _state(out, 0)["distillation_rng"] is not None
    checkpoint_path(out, 1).unlink()
    main_moco_mgd.main(flags)   # resumes from checkpoint_0000
    resumed = _state(out, 1)
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert torch.equal(uninterrupted["distillation_rng"], resumed["distillation_rng"])
