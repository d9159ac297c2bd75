"""The README's quick start runs as written (in a fresh folder), so it cannot rot."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_code() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the quick start has exactly one python block"
    return blocks[0]


def test_readme_quick_start_runs_as_written(tmp_path):
    code = quick_start_code()
    assert "Preprocessor" in code and "save_pretrained" in code  # what the quick start must show
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 8 and lines[0] == "0 [0.0, 0.0]", done.stdout  # first frames dense
    later = [json.loads(line.split(" ", 1)[1]) for line in lines[1:]]
    assert all(0.0 < s < 1.0 for row in later for s in row), done.stdout  # the gate skips some patches
    assert (tmp_path / "streams.pt").is_file() and (tmp_path / "tiny-siglip" / "config.json").is_file()
