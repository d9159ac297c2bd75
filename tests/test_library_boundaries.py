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


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports: ``import x``, ``from x import y`` (relative ones resolved,
    ``x.y`` added in case ``y`` is a module), ``importlib.import_module("x")``, and string
    constants naming a ``neuroflow.commands`` module (how ``neuroflow.cli`` loads its subcommands)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == COMMANDS or node.value.startswith(COMMANDS + "."):
                found.add(node.value)
    return found


def imports_commands(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m == COMMANDS or m.startswith(COMMANDS + ".")}


def test_no_library_module_imports_the_command_line():
    library = [p for p in PACKAGE.rglob("*.py") if "commands" not in p.relative_to(PACKAGE).parts
               and p != PACKAGE / "cli.py"]
    assert len(library) > 20, library  # the scan sees the whole package
    offenders = {str(p.relative_to(ROOT)): sorted(imports_commands(p)) for p in library if imports_commands(p)}
    assert not offenders, f"library modules importing the command line: {offenders}"


def test_the_scan_finds_the_command_line_where_it_is_imported():
    # cli.py is the command line's entry point: it loads the subcommand modules by name.
    assert {"neuroflow.commands.demo", "neuroflow.commands.run", "neuroflow.commands.distill"} <= imports_commands(
        PACKAGE / "cli.py")
    # Relative imports are resolved: demo.py's `from ._common import ...` and `from ..loading import ...`.
    demo = imported_modules(PACKAGE / "commands" / "demo.py")
    assert "neuroflow.commands._common" in demo and "neuroflow.loading" in demo
    trainer = imported_modules(PACKAGE / "distill" / "trainer.py")
    assert "neuroflow.loading" in trainer and "neuroflow.distill.config" in trainer


def test_importing_the_library_loads_no_command_module():
    probe = ("import sys, neuroflow, neuroflow.distill, neuroflow.llm, neuroflow.loading, neuroflow.pooling, "
             "neuroflow.output_folder, neuroflow.state_file, neuroflow.video\n"
             "print(sorted(m for m in sys.modules if m.startswith('neuroflow.commands')))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
