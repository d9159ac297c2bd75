"""The installed package: ``kernels/`` ships as ``neuroflow.kernels``, never as a top-level ``kernels``;
the README's set-up commands are the ones CI runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_copy_ships_kernels_inside_neuroflow(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(src)],
        check=True, capture_output=True, text=True,
    )
    assert (target / "neuroflow" / "kernels" / "__init__.py").is_file()
    assert not (target / "kernels").exists(), "kernels/ was installed as a top-level package"
    probe = (
        "import importlib.util, neuroflow, neuroflow.kernels, transformers\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec is None or not str(spec.origin).startswith({str(target)!r}), spec\n"
        f"assert neuroflow.__file__.startswith({str(target)!r}), neuroflow.__file__\n"
        "print(neuroflow.kernels.__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "neuroflow.kernels"


def test_readme_opens_with_the_two_commands_ci_runs():
    lines = [l.strip() for l in (ROOT / "README.md").read_text().splitlines()]
    commands = [l for l in lines[:12] if l.startswith("pip install")]
    assert len(commands) == 2, commands
    run_main, run_tests = commands
    assert run_main.endswith("&& neuroflow demo") and '".[video]"' in run_main and "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert run_tests in ci, "`.ci/run` must run the README's test command verbatim"
