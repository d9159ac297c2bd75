"""The installed package: ``kernels/`` ships as ``neuroflow.kernels``, never as a top-level ``kernels``;
an uninstalled checkout on ``PYTHONPATH`` maps it too; the README's set-up commands are the ones CI
runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_copy_ships_kernels_inside_neuroflow(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(src)],
        check=True, capture_output=True, text=True,
    )
    assert (target / "neuroflow" / "kernels" / "gate.py").is_file()
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


def test_uninstalled_checkout_maps_neuroflow_kernels(tmp_path):
    """``PYTHONPATH=<repo>`` with nothing installed (the lent GPU machine): ``neuroflow.kernels`` is
    the checkout's ``kernels/`` and the gate launches its kernels (interpreter)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__",
                                                             "bench", "tests"))
    probe = (
        "import sys\n"
        # Drop this environment's editable-install finder: the copy must resolve on its own.
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import torch, neuroflow, neuroflow.kernels.gate\n"
        "from neuroflow.ops import dispatch\n"
        "from neuroflow.ops.gate import gate\n"
        f"assert neuroflow.kernels.gate.__file__.startswith({str(src / 'kernels')!r}), neuroflow.kernels.gate.__file__\n"
        "n, d = 4, 16\n"
        "gate(torch.randn(1, 3, 16, 16), torch.randn(d, 3, 8, 8), None, torch.randn(n, d), torch.zeros(0, d),\n"
        "     torch.zeros(1, n, d), torch.tensor([0]), torch.tensor([True]), 0.1, 0.1, 1)\n"
        "print(dispatch.last_path['gate'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(src), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "triton"


def test_readme_opens_with_the_two_commands_ci_runs():
    lines = [l.strip() for l in (ROOT / "README.md").read_text().splitlines()]
    commands = [l for l in lines[:12] if l.startswith("pip install")]
    assert len(commands) == 2, commands
    run_main, run_tests = commands
    assert run_main.endswith("&& neuroflow demo") and '".[video]"' in run_main and "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert run_tests in ci, "`.ci/run` must run the README's test command verbatim"


def test_checkout_root_on_sys_path_does_not_shadow_hugging_face_kernels(tmp_path):
    """``python -m pytest`` or ``python -c`` from the repo root puts the root first on ``sys.path``.
    ``kernels/`` there must never be imported as a top-level ``kernels``: transformers imports the
    Hugging Face package of that name (>= 5.25 requires it), which ours would shadow."""
    probe = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"root = {str(ROOT / 'kernels')!r}\n"
        "if spec is not None and spec.origin is not None:\n"
        "    assert not spec.origin.startswith(root), spec.origin\n"
        "import transformers.activations, neuroflow.kernels.gate\n"  # the import that failed on a shadowing kernels/
        "print(neuroflow.kernels.gate.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "neuroflow.kernels.gate"
