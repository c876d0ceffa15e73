"""``pip install .`` gives a whole package: every subpackage, both entry scripts and every console command.

The wheel is built from this checkout and installed with ``--no-deps`` into a directory of its own;
the dependencies (torch and the rest, already installed in the test environment) are not fetched
again. Each command then runs ``--help`` from another directory with only that installation and the
dependencies on its path, so a module missing from the wheel fails the test.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as pip vendors it
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["moco-mgd-pretrain", "moco-mgd-lincls", "moco-mgd-knn", "moco-mgd-bags", "moco-mgd-export",
            "moco-mgd-plots", "moco-mgd-submit"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(REPO)], check=True, cwd=work)
    wheel = next((work / "dist").glob("moco_mgd-*.whl"))
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=work)
    return wheel, target


def test_the_wheel_holds_every_module_of_the_package(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(REPO)) for p in (REPO / "moco_mgd").rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    assert {"main_moco_mgd.py", "main_lincls.py"} <= names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line.split(": ", 1)[1] for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist: ")]
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    # Every dependency of pyproject.toml, with its pin or bound, and nothing else.
    assert sorted(map(str, map(Requirement, requires))) == sorted(map(str, map(Requirement, declared)))
    pins = [r for r in map(Requirement, declared) if r.name in ("torch", "torchvision")]
    assert len(pins) == 2 and all(str(r.specifier).startswith("==") for r in pins), pins  # a pair, pinned


def _installed_only(target: Path) -> dict:
    """Only the installed copy and the dependencies on the path: not this checkout (nor its editable install)."""
    return {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}


def test_the_installed_copy_is_what_imports_from_another_directory(installed, tmp_path):
    _, target = installed
    where = subprocess.run([sys.executable, "-c", "import moco_mgd.training.pretrain as m, main_moco_mgd as e; "
                            "print(m.__file__); print(e.__file__)"], cwd=tmp_path, env=_installed_only(target),
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_from_another_directory(installed, command, tmp_path):
    _, target = installed
    result = subprocess.run([sys.executable, str(target / "bin" / command), "--help"], cwd=tmp_path,
                            env=_installed_only(target), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()
