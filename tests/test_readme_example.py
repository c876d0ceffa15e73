"""README's "Use MGD in your own loop": the code block runs as written, and its loop trains the student."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Use MGD in your own loop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one python block"
    return blocks[0]


def test_the_readme_example_runs_as_written():
    torch.manual_seed(0)
    namespace = {"__name__": "readme_example"}

    code = readme_example()
    assert len(code.strip().splitlines()) <= 30   # about 20 lines of loop and setup
    exec(compile(code, "<README.md: Use MGD in your own loop>", "exec"), namespace)   # noqa: S102 - our own README, as a user runs it

    distiller, student, loss = namespace["distiller"], namespace["student"], namespace["loss"]
    assert distiller.is_matched and torch.isfinite(loss)
    assert namespace["mgd_loss"].item() > 0 and len(namespace["per_stage"]) == 4
    # The loop's backward reached the student and the student-side BNs of the MGD term.
    assert student.conv1.weight.grad is not None
    assert all(bn.weight.grad is not None for bn in distiller.student_bns)
