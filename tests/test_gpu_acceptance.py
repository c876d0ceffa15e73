"""The GPU acceptance entry point at tiny size on CPU, so that it cannot rot between GPU sessions."""
import json
import subprocess
import sys
from pathlib import Path

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
    assert list(rows) == ["R50 teacher forward", "MoCo-v2 R18", "MoCo-v2 + MGD-AMP", "MoCo-v2 + MGD + DisCo + SEED"]
    for row in rows.values():
        assert row["seconds"] > 0 and row["images_per_s"] > 0 and row["flops"] > 0
    # a step with MGD does more arithmetic than the plain one plus nothing: the teacher's forward at least
    assert rows["MoCo-v2 + MGD-AMP"]["flops"] > rows["MoCo-v2 R18"]["flops"] + 0.9 * rows["R50 teacher forward"]["flops"]
    assert isinstance(report["steps"]["mgd_overhead_ratio"], float)
    assert report["knn"]["faiss"]["top1"] == report["knn"]["torch"]["top1"] > 90
    assert report["end_to_end"]["ok"] and report["end_to_end"]["resumed"]
    table = (tmp_path / "gpu_report.md").read_text()
    assert "| MoCo-v2 + MGD-AMP |" in table and "MGD's own overhead" in table and "End to end" in table
