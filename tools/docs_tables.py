"""Generate the option tables in docs/*.md from the code, so no default in the docs is typed by hand.

    python tools/docs_tables.py            # rewrite the generated blocks in docs/*.md
    python tools/docs_tables.py --check    # exit 1 and name the blocks that differ

A generated block sits between ``<!-- BEGIN GENERATED name -->`` and ``<!-- END GENERATED name -->``.
Sources: ``neuroflow.engine.engine.PRESETS`` and the ``NeuroFlow`` signature and docstring (``gate``), the
``neuroflow`` argument parser (``cli-<subcommand>``, one per subcommand) and the ``ServeConfig`` /
``DistillConfig`` dataclasses (``serve-config``, ``distill-config``). New options, subcommands and
fields appear by themselves on the next run. tests/test_docs.py asserts the committed blocks equal
what this script generates.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- BEGIN GENERATED (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED (?P=name) -->)", re.S)


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value) -> str:
    if isinstance(value, range):
        return f"`{value!r}`"
    if hasattr(value, "__module__") and type(value).__name__ == "dtype":
        return f"`{value}`"
    return f"`{value!r}`"


def docstring_args(obj, section: str = "Args") -> dict[str, str]:
    """``name -> description`` from a Google-style ``Args:`` / ``Attributes:`` section."""
    doc = inspect.getdoc(obj) or ""
    lines = doc.split("\n")
    out: dict[str, str] = {}
    inside, names = False, []
    for line in lines:
        if line.strip() == f"{section}:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):
            break
        # One entry may name several attributes: "    a, b, c: what they are".
        match = re.match(r"^    (\w+(?:, \w+)*)(?: \([^)]*\))?: (.*)$", line)
        if match:
            names = match.group(1).split(", ")
            for n in names:
                out[n] = match.group(2)
        elif names and line.startswith("        "):
            for n in names:
                out[n] += " " + line.strip()
        elif not line.strip():
            continue
    # The table's default columns are read from the code; the prose's own "(default ...)" remarks
    # are dropped so the two can never disagree.
    for key, text in out.items():
        text = re.sub(r"\s*\(default\)", "", text)
        text = re.sub(r"\(default[,;:]\s*", "(", text)
        out[key] = text
    return out


def gate_table() -> str:
    from neuroflow.engine.engine import FROM_PRESET, PRESETS, NeuroFlow

    params = list(inspect.signature(NeuroFlow.__init__).parameters.values())[2:]  # self, vision_model
    docs = docstring_args(NeuroFlow)
    names = list(PRESETS)
    head = "| option | default | " + " | ".join(f'`preset="{n}"`' for n in names) + " | meaning |"
    rows = [head, "|" + "---|" * (3 + len(names))]
    for p in params:
        default = "from the preset" if p.default is FROM_PRESET else _code(p.default)
        # A preset that leaves a setting out uses the signature's default (empty cell).
        per = [_code(PRESETS[n][p.name]) if p.name in PRESETS[n] else "" for n in names]
        rows.append(f"| `{p.name}` | {default} | " + " | ".join(per) + f" | {_cell(docs.get(p.name, ''))} |")
    return "\n".join(rows) + "\n"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_table(sub: argparse.ArgumentParser) -> str:
    rows = ["| argument | values | default | help |", "|---|---|---|---|"]
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        name = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest.upper()}`" + (
            " ..." if a.nargs in ("+", "*") else "")
        if a.choices is not None:
            values = " / ".join(f"`{c}`" for c in a.choices)
        elif a.nargs == 0:
            values = "flag"
        elif a.metavar:
            values = f"`{a.metavar if isinstance(a.metavar, str) else ' '.join(a.metavar)}`"
        else:
            values = getattr(a.type, "__name__", "str") if a.type else "str"
        if a.nargs in ("+", "*") and a.option_strings:
            values += " (one or more)" if a.nargs == "+" else " (any number)"
        elif a.nargs == "?":
            values += " (optional)"
        elif isinstance(a.nargs, int) and a.nargs > 1:
            values += f" (x{a.nargs})"
        # A help text that states its default is the authority (some defaults depend on the machine,
        # e.g. --device: cuda when available), so the column stays empty then.
        shown = ("" if a.default in (None, False) or a.default is argparse.SUPPRESS or "default" in (a.help or "")
                 else _code(a.default))
        text = a.help or ""
        if "%(" in text:  # argparse expands %(default)s and friends in --help; so does the table
            text = text % {**vars(a), "prog": sub.prog}
        rows.append(f"| {name} | {values} | {shown} | {_cell(text)} |")
    return "\n".join(rows) + "\n"


def dataclass_table(cls) -> str:
    docs = docstring_args(cls, "Attributes")
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = _code(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = _code(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        rows.append(f"| `{f.name}` | {default} | {_cell(docs.get(f.name, ''))} |")
    return "\n".join(rows) + "\n"


def tables() -> dict[str, str]:
    """Every generated block by name, as on a machine without a GPU (some commands' defaults and
    help texts name the device they find; the docs must not depend on where they are built)."""
    from unittest import mock

    import torch

    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        return _tables()


def _tables() -> dict[str, str]:
    from neuroflow.cli import parser

    out = {"gate": gate_table()}
    for name, sub in _subparsers(parser()).items():
        out[f"cli-{name}"] = cli_table(sub)
    try:
        from neuroflow.serve.spec import ServeConfig
        out["serve-config"] = dataclass_table(ServeConfig)
    except ImportError:  # the serve extra's modules import without Ray; keep the docs buildable anyway
        pass
    from neuroflow.distill.config import DistillConfig
    out["distill-config"] = dataclass_table(DistillConfig)
    return out


def render(text: str, generated: dict[str, str]) -> str:
    """``text`` with every generated block replaced; an unknown block name raises ``KeyError``."""
    def fill(m: re.Match) -> str:
        return m.group(1) + generated[m.group("name")] + m.group(4)
    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report differences instead of writing")
    args = ap.parse_args(argv)
    generated = tables()
    stale = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new = render(text, generated)
        if new != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(new, encoding="utf-8")
    if args.check and stale:
        print("generated blocks out of date in: " + ", ".join(stale) + " (run python tools/docs_tables.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
