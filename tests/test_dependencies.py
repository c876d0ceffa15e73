"""What CI installs cannot drift: one test command (README and .ci/run), one constraints file
that pins every package of it, and bounds that agree with each other."""
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as pip vendors it
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _readme_test_command() -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    at = lines.index("# 2. set up, and run the tests (what CI runs)")
    return lines[at + 1]


def _requirements(path: Path) -> list[Requirement]:
    """The package lines of a requirements file (not its comments, -r, -e or -c lines)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert match, f"constraints.txt: {line!r} is not NAME==VERSION (rewrite it with scripts/refresh_constraints.sh)"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def test_ci_runs_the_readmes_test_command_with_the_constraints():
    command = _readme_test_command()
    ci_lines = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == command, "the last line of .ci/run must be the README's test command, as written there"
    assert "pip install -q -r requirements-dev.txt -c constraints.txt " in command


def test_the_constraints_pin_every_requirement_within_its_bounds():
    pins = _constraints()
    wanted = (_requirements(REPO / "requirements-dev.txt")
              + [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
              + [Requirement(r) for r in PYPROJECT["build-system"]["requires"]])
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt has no pin for {requirement}: run scripts/refresh_constraints.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside {requirement}: run scripts/refresh_constraints.sh")


def test_the_build_backend_and_the_dev_requirements_ask_for_the_same_setuptools():
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    dev = [r for r in _requirements(REPO / "requirements-dev.txt") if r.name == "setuptools"]
    assert len(build) == len(dev) == 1 and build[0].specifier == dev[0].specifier, (build, dev)


def test_this_environment_is_the_pinned_one():
    """The tests run on what constraints.txt says (as CI installs it), not on whatever pip found."""
    pins = _constraints()
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}
    differ = {name: (str(pin), str(installed.get(name))) for name, pin in pins.items() if installed.get(name) != pin}
    assert not differ, (f"installed versions differ from constraints.txt (pinned, installed): {differ}; reinstall "
                        "with the README's test command")
