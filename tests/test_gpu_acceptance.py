"""The GPU acceptance entry point at tiny size on CPU, so that it cannot rot between GPU sessions."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_acceptance_run_writes_a_whole_report_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_acceptance.py"), "--size", "tiny",
                           "--device", "cpu", "--output-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["errors"] == {}
    assert {"torch", "torchvision", "faiss", "torch_cuda", "faiss_and_torch_share_the_gpu"} <= report["versions"].keys()
    rows = report["steps"]["rows"]
    assert list(rows) == ["R50 teacher forward", "MoCo-v2 R18", "MoCo-v2 + MGD-AMP", "MoCo-v2 + MGD + DisCo + SEED",
                          "MoCo-v2 + MGD + BINGO"]
    for row in rows.values():
        assert row["seconds"] > 0 and row["images_per_s"] > 0 and row["flops"] > 0
    # a step with MGD does more arithmetic than the plain one plus nothing: the teacher's forward at least
    assert rows["MoCo-v2 + MGD-AMP"]["flops"] > rows["MoCo-v2 R18"]["flops"] + 0.9 * rows["R50 teacher forward"]["flops"]
    _assert_the_step_numbers_agree(report["steps"], (tmp_path / "gpu_report.md").read_text())
    assert report["knn"]["faiss"]["top1"] == report["knn"]["torch"]["top1"] > 90
    assert report["end_to_end"]["ok"] and report["end_to_end"]["resumed"]
    table = (tmp_path / "gpu_report.md").read_text()
    assert "| MoCo-v2 + MGD-AMP |" in table and "MGD's own overhead" in table and "End to end" in table


def _assert_the_step_numbers_agree(steps: dict, table: str) -> None:
    """The overhead is the formula of its own label, every rate is the batch over the step time,
    and the markdown shows the JSON's numbers (to its rounding)."""
    rows, batch = steps["rows"], steps["batch_size"]
    plain, mgd, teacher = (rows[name]["seconds"] for name in ("MoCo-v2 R18", "MoCo-v2 + MGD-AMP", "R50 teacher forward"))
    overhead = steps["mgd_overhead_ratio"]
    assert math.isfinite(overhead) and overhead == pytest.approx((mgd - plain - teacher) / plain, rel=1e-12)
    # A timing: only a margin the noise of a shared CPU cannot flip. The MGD step does the plain
    # step's arithmetic and the teacher's forward (checked on the FLOPs above), so it is the slower.
    assert mgd > plain
    for name, row in rows.items():
        assert row["images_per_s"] == pytest.approx(batch / row["seconds"], rel=1e-12), name
        cells = re.search(rf"^\| {re.escape(name)} \| ([^|]+) \| ([^|]+) \| [^|]+ \| ([^|]+) \|", table, re.M)
        assert cells, (name, table)
        ms, images_per_s, gflops = (float(c.replace(",", "")) for c in cells.groups())
        assert ms == pytest.approx(row["seconds"] * 1e3, abs=0.05), name
        assert images_per_s == pytest.approx(row["images_per_s"], abs=0.5), name
        assert gflops == pytest.approx(row["flops"] / 1e9, abs=0.05), name
    printed = re.search(r"MGD's own overhead \(MoCo\+MGD - MoCo - teacher forward\) / MoCo: (-?[\d.]+)%", table)
    assert printed and float(printed[1]) == pytest.approx(100 * overhead, abs=0.05), table
