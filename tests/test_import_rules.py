"""The package's layering, read from the source with ``ast`` (nothing is imported).

(a) no import cycle among moco_mgd modules, counting imports inside functions too;
(b) the losses and the networks never reach up into training or evaluation;
(c) every folder of the package is a package (has an ``__init__.py`` whose one-line docstring says what it owns);
(d) each folder imports only the folders below it (:data:`MAY_IMPORT`), runtime/ none of the package's families;
(e) no module imports another module's private name (a leading underscore), nor reads one through it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "moco_mgd"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LOWER_LAYERS = ("losses", "models")
# What each folder may import, besides itself: the package's floors, lowest first. Every folder is listed.
MAY_IMPORT = {
    "runtime": set(),                                   # processes, launch, stopping, precision, logs
    "data": {"runtime"},
    "models": {"runtime"},
    "losses": {"runtime", "models"},
    "checkpoints": {"runtime", "models"},               # formats, save and load, export
    "reporting": {"runtime", "models", "losses"},
    "training": {"runtime", "data", "models", "losses", "checkpoints", "reporting", "evaluation"},
    "evaluation": {"runtime", "data", "models", "losses", "checkpoints", "training"},
}
UPPER_LAYERS = (f"{PACKAGE}.training", f"{PACKAGE}.evaluation")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``moco_mgd.losses`` for ``losses/__init__.py``)."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom that runs (module level, in functions and classes), not under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = list(node.orelse)  # the body runs only under a type checker
        stack.extend(children)


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` (at ``path``) imports.

    ``from moco_mgd.x import y`` is an edge to ``moco_mgd.x.y`` when ``y`` is a submodule, else to
    ``moco_mgd.x``; relative imports are resolved against the module's package.
    """
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            base_parts = package.split(".")
            base_parts = base_parts[:len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in modules else base)
    own = {t for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")}
    unknown = own - modules.keys()
    assert not unknown, f"{name} imports {sorted(unknown)}, which are not modules of {PACKAGE}"
    return own - {name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it is acyclic."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        path = [start]
        iterators = [iter(sorted(graph[start]))]
        colour[start] = GREY
        while iterators:
            nxt = next(iterators[-1], None)
            if nxt is None:
                colour[path.pop()] = BLACK
                iterators.pop()
            elif colour.get(nxt, BLACK) == GREY:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt) == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                iterators.append(iter(sorted(graph[nxt])))
    return None


# ---- the checker itself ------------------------------------------------------------------------

def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # a diamond
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"b"}})
    assert cycle == ["b", "c", "d", "b"]


def test_the_graph_resolves_submodule_imports_and_sees_function_level_ones(tmp_path):
    graph = import_graph()
    assert set(graph) >= {f"{PACKAGE}.losses.mgd_distiller", f"{PACKAGE}.training.pretrain", PACKAGE}
    distiller = graph[f"{PACKAGE}.losses.mgd_distiller"]
    # "from moco_mgd.losses import mgd" is the module losses/mgd.py, not the package.
    assert f"{PACKAGE}.losses.mgd" in distiller and f"{PACKAGE}.losses" not in distiller
    # "from moco_mgd.runtime import distributed" and "from moco_mgd.models.stages import STAGES, ...".
    assert {f"{PACKAGE}.runtime.distributed", f"{PACKAGE}.models.stages"} <= distiller
    # pretrain.py imports the plots inside a function, to keep matplotlib out of the start-up.
    assert f"{PACKAGE}.reporting.plots" in graph[f"{PACKAGE}.training.pretrain"]

    source = tmp_path / "probe.py"
    source.write_text("import os\nfrom moco_mgd.losses import mgd, DEFAULT_NOT_A_MODULE\n"
                      "def f():\n    import moco_mgd.training.engine\n"
                      "from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from moco_mgd.evaluation import knn\n")
    modules = package_modules()
    assert imported_modules(f"{PACKAGE}.losses.probe", source, modules) == {
        f"{PACKAGE}.losses.mgd", f"{PACKAGE}.losses", f"{PACKAGE}.training.engine"}
    source.write_text("from . import mgd\nfrom ..models.stages import STAGES\nfrom .. import runtime\n")
    assert imported_modules(f"{PACKAGE}.losses.probe", source, modules) == {
        f"{PACKAGE}.losses.mgd", f"{PACKAGE}.models.stages", f"{PACKAGE}.runtime"}


# ---- the rules ---------------------------------------------------------------------------------

def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_losses_and_models_do_not_import_training_or_evaluation(layer):
    graph = import_graph()
    prefix = f"{PACKAGE}.{layer}"
    modules = [m for m in graph if m == prefix or m.startswith(prefix + ".")]
    assert len(modules) > 1
    offending = {m: sorted(t for t in graph[m] if any(t == u or t.startswith(u + ".") for u in UPPER_LAYERS))
                 for m in modules}
    offending = {m: targets for m, targets in offending.items() if targets}
    assert not offending, f"{layer} must not depend on training or evaluation: {offending}"


def folder_of(module: str) -> str | None:
    """``runtime`` for ``moco_mgd.runtime.launch``; None for the package itself and its top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else None


def test_every_folder_is_in_the_floor_plan():
    folders = {d.name for d in ROOT.iterdir() if d.is_dir() and d.name != "__pycache__"}
    assert folders == MAY_IMPORT.keys(), f"add the new folder to MAY_IMPORT: {sorted(folders ^ MAY_IMPORT.keys())}"


def test_each_folder_imports_only_the_folders_below_it():
    graph = import_graph()
    offending = {}
    for module, targets in graph.items():
        folder = folder_of(module)
        if folder is None:
            continue
        bad = sorted(t for t in targets if folder_of(t) not in (None, folder, *MAY_IMPORT[folder]))
        if bad:
            offending[module] = bad
    assert not offending, f"imports against the floor plan (MAY_IMPORT): {offending}"


def private_uses(path: Path, modules: dict[str, Path]) -> list[str]:
    """``from moco_mgd.x import _name`` and ``module._name`` (``module`` a package module bound by an import)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE)):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
                if not node.level and f"{node.module}.{alias.name}" in modules:
                    bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            bound.update(a.asname for a in node.names if a.asname and a.name.startswith(PACKAGE))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names(tmp_path):
    modules = package_modules()
    probe = tmp_path / "probe.py"
    probe.write_text("from moco_mgd.models.resnet import _STEM_CHOICES\nfrom moco_mgd.runtime import launch\n"
                     "launch._spawn\nlaunch.__name__\n")
    assert len(private_uses(probe, modules)) == 2     # the checker sees both forms, and not dunders
    offending = {name: uses for name, path in modules.items() if (uses := private_uses(path, modules))}
    assert not offending, f"private names used across modules (make them public, or keep the use inside): {offending}"


def test_every_folder_of_the_package_is_a_package():
    folders = [ROOT] + sorted(d for d in ROOT.rglob("*") if d.is_dir() and d.name != "__pycache__"
                              and "__pycache__" not in d.parts)
    assert {d.name for d in folders} >= {"models", "losses", "training", "evaluation", "runtime"}
    missing = [str(d.relative_to(ROOT.parent)) for d in folders if not (d / "__init__.py").is_file()]
    assert not missing, f"folders without __init__.py: {missing}"
    for folder in folders[1:]:
        docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert docstring and "\n" not in docstring, f"{folder.name}/__init__.py: one line saying what the folder owns"
