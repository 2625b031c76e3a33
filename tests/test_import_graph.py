"""The project's modules import downward only: no circle anywhere, the recipes in layers (flags,
then the data path, training's parts, the objectives, the runner, the entry a script calls), and
the model package never importing the recipes.

Every import counts, also those inside functions and under TYPE_CHECKING: a circle that only
shows at run time, or only to a type checker, still ties two modules into one. The modules are
read with `ast` (nothing is imported), so the check costs milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("phi3v", "recipe")

# Module -> layer: a module may import its own layer and the ones below, never a higher one.
# Modules not listed are checked for circles only. (phi3v, the model package, sits under all of
# recipe: test_the_model_package_never_imports_the_recipes.)
LAYERS = {
    # the bottom: errors, the flags (definitions, DPO's, checks, parser, transformers' object),
    # the launcher's environment and the files every layer writes
    "recipe.errors": 0,
    "recipe.launcher": 0,
    "recipe.args": 0,
    "recipe.preference_args": 0,
    "recipe.flag_checks": 0,
    "recipe.flag_parser": 0,
    "recipe.training_args": 0,
    "recipe.checkpoints": 0,
    "recipe.packing": 0,  # (MAX_TOKENS_PER_ROW, a flag's bound, lives with the packing it bounds)
    "recipe.metrics": 0,
    "recipe.plotting": 0,
    # the data path: records (the example types and image opening) ...
    "recipe.records": 1,
    # ... layouts (files and datasets into records) and the tokenization of a conversation ...
    "recipe.layouts": 2,
    "recipe.hub": 2,
    "recipe.dataset_layouts": 2,
    "recipe.pair_layouts": 2,
    "recipe.tokenization": 2,
    # ... validation: every example checked and measured before the first step ...
    "recipe.validation_cache": 3,
    "recipe.validation": 4,
    # ... datasets and collators, per objective
    "recipe.data": 5,
    "recipe.pairs": 5,
    # training's parts: the model, the Trainer, evaluation, the report, faults
    "recipe.model": 6,
    "recipe.report": 6,
    "recipe.faults": 6,
    "recipe.lock": 6,
    "recipe.shared_fs": 6,
    "recipe.evaluate": 6,
    "recipe.trainer": 7,
    # the objectives: the interface, then each objective
    "recipe.objective": 8,
    "recipe.supervised": 9,
    "recipe.preference": 9,
    "recipe.dpo": 9,  # (the DPO losses, preference's own)
    # the runner registers the objectives and runs the phases
    "recipe.runner": 10,
    # the entry: what a task script supplies and calls (task), --dry_run, task data helpers
    "recipe.dry_run": 11,
    "recipe.cauldron": 11,
    "recipe.synthetic_pairs": 11,
    "recipe.task": 12,
}

def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (relative imports resolved; `from
    package import module` counts the module)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `recipe.records.Turn` -> `recipe.records`
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of the graph: each strongly connected set of two or more modules (Tarjan),
    sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    return sorted(
        f"{module} (layer {layers[module]}) imports {target} (layer {layers[target]})"
        for module, targets in graph.items() if module in layers
        for target in targets if target in layers and layers[target] > layers[module]
    )


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_checks_catch_what_they_are_for(tmp_path):
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(toy) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert upward_imports({"low": {"high"}, "high": {"low"}}, {"low": 0, "high": 1}) == [
        "low (layer 0) imports high (layer 1)"]
    # Imports in functions and under TYPE_CHECKING count; relative ones are resolved.
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
                      "def f():\n    from . import c\n    import pkg.d.e\n")
    known = {"pkg", "pkg.b", "pkg.c", "pkg.d", "pkg.mod"}
    assert imported_modules("pkg.mod", source, known) == {"pkg", "pkg.b", "pkg.c", "pkg.d"}


def test_every_layered_module_exists(graph):
    assert set(LAYERS) <= set(graph), "a module in LAYERS was renamed or removed: update the table"


def test_no_circular_imports(graph):
    assert cycles(graph) == []


def test_layers_import_downward_only(graph):
    assert upward_imports(graph, LAYERS) == []


def test_the_model_package_never_imports_the_recipes(graph):
    assert sorted(f"{module} imports {target}" for module, targets in graph.items() if module.startswith("phi3v")
                  for target in targets if target.partition(".")[0] == "recipe") == []
