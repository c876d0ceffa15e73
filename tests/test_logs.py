import json
import sys

import torch

from moco_mgd.runtime.logs import MetricsLog, format_duration


def test_metrics_are_json_lines_with_plain_numbers(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    log.log("train", step=3, loss=torch.tensor(1.5), per_stage=torch.tensor([0.25, 0.5]), bad=float("nan"))
    log.log("matching", epoch=1, cost={"layer1": 0.5})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"kind": "train", "step": 3, "loss": 1.5, "per_stage": [0.25, 0.5], "bad": "nan"},
                       {"kind": "matching", "epoch": 1, "cost": {"layer1": 0.5}}]


def test_only_the_enabled_rank_writes(tmp_path):
    MetricsLog(tmp_path, enabled=False).log("train", loss=1.0)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, enabled=True, wandb_project="moco-mgd-test", config={"arch": "resnet18"})
    log.log("epoch", step=0, loss=2.0)
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_format_duration():
    assert format_duration(3725) == "1:02:05"


def test_images_go_to_wandb_only_when_it_is_on(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    png = tmp_path / "curve.png"
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    figure.savefig(png)
    # wandb off: a no-op that never imports wandb (an import would fail here) and writes nothing.
    off = tmp_path / "off"
    off.mkdir()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "wandb", None)  # "import wandb" now raises ImportError
        MetricsLog(off, enabled=True).log_images({"curve": png})
        MetricsLog(off, enabled=False, wandb_project="moco-mgd-test").log_images({"curve": png})
    assert list(off.iterdir()) == [] and not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, enabled=True, wandb_project="moco-mgd-test")
    log.log_images({"curve": png})
    log.close()
    sent = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/figures/curve_*.png"))
    assert len(sent) == 1 and sent[0].read_bytes() == png.read_bytes()
