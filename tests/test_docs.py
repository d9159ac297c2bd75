"""The README and docs/*.md stay true to the code.

- Every ```python block runs (CPU, in a fresh folder) unless the line before it is
  ``<!-- gpu-only: REASON -->`` or ``<!-- no-run: REASON -->`` (see docs/contributing.md).
- Every ``neuroflow ...`` command in a ```bash block parses with the real argument parser
  (subcommand, flags, choices and argument counts); running them is too slow for CI. Commands
  quoted inline in prose name a real subcommand and real flags; ``python bench/*.py`` /
  ``tools/*.py`` commands name an existing script that defines each flag used.
- Every generated block (option defaults and CLI tables) equals what tools/docs_tables.py
  generates from the code now.
- Every relative link points to a file that exists.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:^(?P<mark><!--[^\n]*-->)\n)?^```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^```\s*$", re.S | re.M)
MARK = re.compile(r"<!-- (gpu-only|no-run): \S.*-->")

sys.path.insert(0, str(ROOT / "tools"))
import docs_tables  # noqa: E402


def blocks(lang: str):
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group("lang") == lang:
                line = text[: m.start("body")].count("\n")
                yield page, line, m.group("mark"), m.group("body")


PYTHON = list(blocks("python"))
BASH = list(blocks("bash"))


def _id(item) -> str:
    return f"{item[0].relative_to(ROOT)}:{item[1]}"


def test_the_docs_have_examples():
    assert len(PYTHON) >= 3 and len(BASH) >= 3


@pytest.mark.parametrize("item", PYTHON, ids=[_id(b) for b in PYTHON])
def test_python_block_runs(item, tmp_path):
    page, line, mark, code = item
    if mark is not None:
        assert MARK.fullmatch(mark), f"{_id(item)}: a marker must be '<!-- gpu-only: why -->' or '<!-- no-run: why -->'"
        pytest.skip(mark)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, f"{_id(item)}:\n{done.stderr[-3000:]}"


def neuroflow_commands(body: str) -> list[list[str]]:
    """The argument lists of every ``neuroflow ...`` command in a shell block."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part, comments=True)
            if words and words[0] == "neuroflow":
                out.append(words[1:])
    return out


COMMANDS = [(item, cmd) for item in BASH for cmd in neuroflow_commands(item[3])]


def test_the_docs_show_every_subcommand():
    from neuroflow.cli import SUBCOMMANDS

    shown = {cmd[0] for _, cmd in COMMANDS if cmd}
    assert shown >= set(SUBCOMMANDS), f"no shell example for {sorted(set(SUBCOMMANDS) - shown)}"


@pytest.mark.parametrize("item,cmd", COMMANDS, ids=[f"{_id(i)}:{' '.join(c)[:40]}" for i, c in COMMANDS])
def test_neuroflow_command_parses(item, cmd):
    from neuroflow.cli import parser

    try:
        args = parser().parse_args(cmd)
    except SystemExit as exc:  # argparse exits 2 on an unknown flag, a bad choice or a missing value
        pytest.fail(f"{_id(item)}: `neuroflow {' '.join(cmd)}` does not parse (exit {exc.code})")
    assert args.command == cmd[0]


def _options(sub) -> set[str]:
    return {o for a in sub._actions for o in a.option_strings}


INLINE = [(page, m.group(1)) for page in PAGES
          for m in re.finditer(r"`(neuroflow [a-z][^`]*)`", page.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page,span", INLINE, ids=[f"{p.name}:{s[:40]}" for p, s in INLINE])
def test_inline_neuroflow_commands_use_real_flags(page, span):
    """Commands quoted in prose (`neuroflow serve --device cuda`) name a real subcommand and flags."""
    subs = docs_tables._subparsers(__import__("neuroflow.cli", fromlist=["parser"]).parser())
    words = span.split()
    assert words[1] in subs, f"{page.name}: `{span}`: no subcommand {words[1]!r}"
    unknown = [w.split("=")[0] for w in words[2:] if w.startswith("--") and w.split("=")[0] not in _options(subs[words[1]])]
    assert not unknown, f"{page.name}: `{span}`: {words[1]} has no {unknown}"


SCRIPTS = [(item, m.group(1), m.group(2)) for item in BASH
           for m in re.finditer(r"python3? (bench/\w+\.py|tools/\w+\.py)([^\n#|&;]*)", re.sub(r"\\\n\s*", " ", item[3]))]


@pytest.mark.parametrize("item,script,rest", SCRIPTS, ids=[f"{_id(i)}:{s}" for i, s, _ in SCRIPTS])
def test_script_commands_exist_with_their_flags(item, script, rest):
    """`python bench/x.py --flag` in a shell block: the script exists and defines each flag (its
    source is read, not run: the benchmarks are too slow for CI)."""
    path = ROOT / script
    assert path.is_file(), f"{_id(item)}: {script} does not exist"
    source = path.read_text(encoding="utf-8")
    missing = [f for f in re.findall(r"(--[\w-]+)", rest) if f'"{f}"' not in source]
    assert not missing, f"{_id(item)}: {script} defines no {missing}"


def test_generated_tables_match_the_code():
    generated = docs_tables.tables()
    stale = []
    used = set()
    for page in (ROOT / "docs").glob("*.md"):
        text = page.read_text(encoding="utf-8")
        used |= {m.group("name") for m in docs_tables.BLOCK.finditer(text)}
        if docs_tables.render(text, generated) != text:
            stale.append(page.name)
    assert not stale, f"generated tables out of date in {stale}: run python tools/docs_tables.py"
    assert used == set(generated), f"tables generated but not shown: {sorted(set(generated) - used)}"


def test_generated_gate_table_reads_presets_and_signature():
    import inspect

    from neuroflow.engine.engine import PRESETS, NeuroFlow

    table = docs_tables.gate_table()
    for name in list(inspect.signature(NeuroFlow.__init__).parameters)[2:]:
        assert f"| `{name}` |" in table
    for name, values in PRESETS.items():
        assert f'`preset="{name}"`' in table
        for key, value in values.items():
            row = next(r for r in table.splitlines() if r.startswith(f"| `{key}` |"))
            assert f"`{value!r}`" in row


def test_relative_links_exist():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
