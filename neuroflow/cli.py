"""The ``neuroflow`` console command: one subcommand per module, imported only when used.

Each subcommand module defines ``add_arguments(parser)`` (its options) and ``run(args) -> int``
(its exit code); the module's docstring first paragraph is the subcommand's help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": "neuroflow.commands.demo",
    "run": "neuroflow.commands.run",
    "distill": "neuroflow.commands.distill",
    "distill-gate": "neuroflow.commands.distill_gate",
    "build-dinov2": "neuroflow.commands.build_dinov2",
    "serve": "neuroflow.commands.serve",
    "llm-ablation": "neuroflow.llm.cli",
}
"""Subcommand name -> module. A module that does not exist yet is listed by ``--help`` as not built."""


def _load(name: str):
    try:
        return importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as exc:
        if exc.name and SUBCOMMANDS[name].startswith(exc.name):
            return None
        raise


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuroflow", description="EMA-gated sparse Vision Transformer inference for video.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _load(name)
        if module is None:
            continue
        doc = (module.__doc__ or "").strip().split("\n\n")[0]
        sp = sub.add_parser(name, help=doc, description=(module.__doc__ or "").strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
