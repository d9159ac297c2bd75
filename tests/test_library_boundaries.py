"""The library never imports the command line (``neuroflow.commands``): distillation, the
benchmarks and users' code get loading, pooling and output folders from library modules."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "neuroflow"
COMMANDS = "neuroflow.commands"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str] | None = None) -> set[str]:
    """Every module a file imports, at module level or inside a function: ``import x``,
    ``from x import y`` (relative ones resolved), ``importlib.import_module("x")``, and string
    constants naming a ``neuroflow.commands`` module (how ``neuroflow.cli`` loads its subcommands).

    Without ``modules``, ``from x import y`` gives ``x`` and ``x.y`` (in case ``y`` is a module).
    With ``modules`` (the names of every module there is), it gives exactly what is imported:
    ``x.y`` where that is a module, else ``x``; so ``from .. import dispatch`` is an import of
    ``dispatch``, not of the package's ``__init__``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            if modules is None:
                found.add(module)
                found |= {f"{module}.{alias.name}" for alias in node.names}
            else:
                found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.add(node.args[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == COMMANDS or node.value.startswith(COMMANDS + "."):
                found.add(node.value)
    return found


def _walk(node: ast.AST):
    """``ast.walk`` without the body of ``if __name__ == "__main__":``, which runs only when the
    file is the program (``python -m``), never when it is imported."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_main_guard(child.test):
            for other in child.orelse:
                yield from _walk(other)
            continue
        yield from _walk(child)


def _is_main_guard(test: ast.expr) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def is_command_line(path: Path) -> bool:
    """``neuroflow/cli.py``, ``neuroflow/commands/`` and the ``cli`` module of a sub-package
    (``neuroflow/llm/cli.py``); everything else in the package is the library."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] == "commands" or parts[-1] == "cli.py"


def imports_commands(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m == COMMANDS or m.startswith(COMMANDS + ".")}


def test_no_library_module_imports_the_command_line():
    library = [p for p in PACKAGE.rglob("*.py") if not is_command_line(p)]
    assert len(library) > 20, library  # the scan sees the whole package
    offenders = {str(p.relative_to(ROOT)): sorted(imports_commands(p)) for p in library if imports_commands(p)}
    assert not offenders, f"library modules importing the command line: {offenders}"


def test_the_scan_finds_the_command_line_where_it_is_imported():
    # cli.py is the command line's entry point: it loads the subcommand modules by name.
    assert {"neuroflow.commands.demo", "neuroflow.commands.run", "neuroflow.commands.distill"} <= imports_commands(
        PACKAGE / "cli.py")
    # Relative imports are resolved: demo.py's `from ._common import ...` and `from ..models.loading import ...`.
    demo = imported_modules(PACKAGE / "commands" / "demo.py")
    assert "neuroflow.commands._common" in demo and "neuroflow.models.loading" in demo
    # The `python -m` entry under `if __name__ == "__main__":` is not an import of the module.
    assert "neuroflow.cli" not in imported_modules(PACKAGE / "commands" / "build_dinov2.py")
    trainer = imported_modules(PACKAGE / "distill" / "trainer.py")
    assert "neuroflow.models.loading" in trainer and "neuroflow.distill.config" in trainer


def test_importing_the_library_loads_no_command_module():
    probe = ("import sys, neuroflow, neuroflow.distill, neuroflow.llm, neuroflow.models.loading, neuroflow.models.pooling, "
             "neuroflow.video.output_folder, neuroflow.engine.state_file, neuroflow.video.decode\n"
             "print(sorted(m for m in sys.modules if m.startswith('neuroflow.commands')))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
