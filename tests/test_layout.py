"""The package layout (docs/contributing.md, "Layout"): the documented import paths work, no
module imports another in a circle, and imports point down the stated layers.

The import graph is static: every module under ``neuroflow/`` parsed with ``ast``, each edge an
import of a ``neuroflow`` module at module level or inside a function (see
``test_library_boundaries.imported_modules``). The layers are read from docs/contributing.md, so
the page and the check cannot disagree.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import neuroflow
from test_library_boundaries import PACKAGE, ROOT, imported_modules, module_name

CONTRIBUTING = ROOT / "docs" / "contributing.md"
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KERNELS = "neuroflow.kernels"


def package_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package (``kernels/`` as ``neuroflow.kernels``)."""
    found = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found |= {f"{KERNELS}.{p.stem}": p for p in (ROOT / "kernels").glob("*.py")}
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the ``neuroflow`` modules it imports (self-imports and third-party ones left out)."""
    names = set(modules)
    graph = {}
    for name, path in modules.items():
        imported = imported_modules(path, names)
        if name.startswith(KERNELS + "."):  # kernels/x.py is neuroflow.kernels.x once installed
            imported = {"neuroflow." + m if m.startswith("kernels.") else m for m in imported}
        graph[name] = {m for m in imported if m in names and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``), or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def stated_layers() -> list[list[str]]:
    """The layers of docs/contributing.md, top to bottom: the module names quoted before the colon
    of each item between ``<!-- layers -->`` and ``<!-- /layers -->``."""
    text = CONTRIBUTING.read_text(encoding="utf-8")
    block = re.search(r"<!-- layers -->\n(.*?)<!-- /layers -->", text, re.S)
    assert block, "docs/contributing.md must list the layers between <!-- layers --> and <!-- /layers -->"
    layers = [re.findall(r"`([\w.]+)`", line.split(":")[0]) for line in block.group(1).splitlines() if line.strip()]
    assert all(layers), f"a layer names no module: {layers}"
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """Index (0 = top) of the layer holding ``module``: the longest listed prefix wins; the bare
    package name ``neuroflow`` stands for ``neuroflow/__init__.py`` alone."""
    best, depth = None, -1
    for index, names in enumerate(layers):
        for listed in names:
            covers = module == listed or (listed != "neuroflow" and module.startswith(listed + "."))
            if covers and listed.count(".") > depth:
                best, depth = index, listed.count(".")
    return best


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Every import of a module in a higher layer than the importer's."""
    return sorted(f"{a} (layer {layer_of(a, layers) + 1}) imports {b} (layer {layer_of(b, layers) + 1})"
                  for a, targets in graph.items() for b in targets if layer_of(b, layers) < layer_of(a, layers))


# -- (a) the documented import paths ------------------------------------------------------------------

def test_the_public_api_imports():
    assert neuroflow.NeuroFlow.__name__ == "NeuroFlow" and neuroflow.NeuroFlowOutput.__name__ == "NeuroFlowOutput"
    assert len(neuroflow.__all__) >= 10
    for name in neuroflow.__all__:
        assert getattr(neuroflow, name) is not None, name
    from neuroflow.cli import main
    from neuroflow.ops.cache_scatter import cache_scatter
    from neuroflow.ops.gate import gate
    from neuroflow.ops.varlen_attention import varlen_attention

    assert all(map(callable, (main, cache_scatter, gate, varlen_attention)))
    for op in ("gate", "cache_scatter", "varlen_attention"):
        assert callable(getattr(torch.ops.neuroflow, op)), op


def documented_names() -> dict[str, set[str]]:
    """Dotted ``neuroflow.x.y`` names and ``from neuroflow.x import a, b`` imports in README.md and
    docs/*.md (prose and code blocks, run or not) -> the pages using them."""
    found: dict[str, set[str]] = {}
    for page in DOC_PAGES:
        text = page.read_text(encoding="utf-8")
        for dotted in re.findall(r"(?<![\w./-])(neuroflow(?:\.\w+)+)", text):
            found.setdefault(dotted, set()).add(page.name)
        for module, names in re.findall(r"^\s*from (neuroflow[\w.]*) import ([\w, ]+)$", text, re.M):
            for name in names.split(","):
                found.setdefault(f"{module}.{name.strip().split(' as ')[0]}", set()).add(page.name)
    return found


def resolve(dotted: str):
    """The object a dotted name names: its longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_import_path_the_docs_use_works():
    names = documented_names()
    assert "neuroflow.models.preprocess.Preprocessor" in names and "neuroflow.engine.memory.streams_that_fit" in names
    broken = {}
    for dotted, pages in sorted(names.items()):
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as exc:
            broken[dotted] = f"{sorted(pages)}: {type(exc).__name__}: {exc}"
    assert not broken, f"documented names that do not resolve: {broken}"


def test_the_doc_scan_reports_a_path_that_does_not_resolve():
    with pytest.raises(AttributeError):
        resolve("neuroflow.video.decode.Preprocessor")  # the class is in models.preprocess
    with pytest.raises(ModuleNotFoundError):
        resolve("neuroflow_missing.anything")


# -- (b) no import cycle ------------------------------------------------------------------------------

def test_no_import_cycle_among_neuroflow_modules():
    modules = package_modules()
    graph = import_graph(modules)
    assert len(graph) > 60, sorted(graph)  # the scan sees the whole package
    # Function-level imports are edges too: compile_check imports the ops inside all_cases().
    assert "neuroflow.ops.gate" in graph["neuroflow.tooling.compile_check"]
    assert "neuroflow.ops.dispatch" in graph["neuroflow.engine.engine"]  # `from ..ops import dispatch`
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


# -- (c) imports point down -----------------------------------------------------------------------------

def test_imports_point_down_the_stated_layers():
    layers = stated_layers()
    modules = package_modules()
    unplaced = sorted(m for m in modules if layer_of(m, layers) is None)
    assert not unplaced, f"modules in no layer of docs/contributing.md: {unplaced}"
    upward = upward_imports(import_graph(modules), layers)
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_the_layer_check_finds_an_upward_import():
    layers = stated_layers()
    assert layer_of("neuroflow.commands.run", layers) == 0 and layer_of("neuroflow.llm.cli", layers) == 0
    assert layer_of("neuroflow.llm.bypass", layers) == 1
    assert layer_of("neuroflow", layers) < layer_of("neuroflow.engine.engine", layers)
    assert layer_of("neuroflow.engine.engine", layers) < layer_of("neuroflow.models.families", layers) \
        < layer_of("neuroflow.video.decode", layers) < layer_of("neuroflow.ops.gate", layers) \
        < layer_of("neuroflow.reference.gate", layers) < layer_of("neuroflow.kernels.gate", layers)
    graph = {"neuroflow.reference.gate": {"neuroflow.engine.engine"}, "neuroflow.engine.engine": {"neuroflow.ops.gate"}}
    assert upward_imports(graph, layers) == [
        f"neuroflow.reference.gate (layer {layer_of('neuroflow.reference.gate', layers) + 1}) imports "
        f"neuroflow.engine.engine (layer {layer_of('neuroflow.engine.engine', layers) + 1})"]
