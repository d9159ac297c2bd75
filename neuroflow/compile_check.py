"""Compile every kernel's default configurations for real GPUs, on a machine without one.

``python -m neuroflow.compile_check`` compiles each :class:`CompileCase` that the launcher modules
list (``compile_cases()``) for sm_80 and sm_90 with ``triton.compile`` and a ``GPUTarget``, then
checks the cubin: dynamic shared memory within the architecture's limit, no local memory (register
spills), and tensor-core instructions (HMMA on sm_80, HGMMA on sm_90) where the kernel uses
``tl.dot``. It prints one JSON line per (case, architecture) and exits 1 if any check fails.

Must run in a process without ``TRITON_INTERPRET`` (a kernel defined under the interpreter cannot
be compiled); ``tests/test_compile.py`` starts it that way.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHER_MODULES = ("neuroflow.fused_gate", "neuroflow.varlen")
"""Modules whose ``compile_cases()`` list the kernels' default configurations."""

SHARED_LIMIT = {80: 166_912, 90: 232_448}
"""Largest dynamic shared memory per block (bytes) that a launch may request."""

TENSOR_CORE_OP = {80: "HMMA", 90: "HGMMA"}


@dataclass
class CompileCase:
    """One kernel specialisation to compile.

    Attributes:
        name: label for reports (kernel and config).
        fn: the ``@triton.jit`` function.
        signature: argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``).
        constexprs: values of the ``constexpr`` arguments.
        num_warps, num_stages: launch options of the default config.
        uses_dot: whether the kernel uses ``tl.dot`` (then tensor-core instructions are required).
        tensor_cores: architectures on which tensor-core instructions are required (default: both);
            wgmma needs tiles of at least 64 rows, which small-tile configs do not have.
    """

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    uses_dot: bool = False
    tensor_cores: tuple[int, ...] = field(default=(80, 90))


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def compile_report(case: CompileCase, capability: int) -> dict:
    """Compile ``case`` for ``sm_<capability>`` and measure the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
    regs, stack, static_shared, local = (int(x) for x in res.groups()) if res else (-1, -1, -1, -1)
    return {
        "case": case.name,
        "sm": capability,
        "shared_bytes": int(compiled.metadata.shared),
        "registers": regs,
        "stack_bytes": stack,
        "local_bytes": local,
        "spill_instructions": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "hmma": sass.count("HMMA"),
        "hgmma": sass.count("HGMMA"),
        "uses_dot": case.uses_dot,
    }


def problems(report: dict, case: CompileCase) -> list[str]:
    out = []
    sm = report["sm"]
    if report["shared_bytes"] > SHARED_LIMIT[sm]:
        out.append(f"shared memory {report['shared_bytes']} B > sm_{sm} limit {SHARED_LIMIT[sm]} B")
    if report["local_bytes"] or report["stack_bytes"] or report["spill_instructions"]:
        out.append(
            f"register spills: {report['stack_bytes']} B stack, {report['local_bytes']} B local memory, "
            f"{report['spill_instructions']} LDL/STL"
        )
    if case.uses_dot and sm in case.tensor_cores and report[TENSOR_CORE_OP[sm].lower()] == 0:
        out.append(f"tl.dot compiled without {TENSOR_CORE_OP[sm]} on sm_{sm}")
    return out


def all_cases() -> list[CompileCase]:
    cases = []
    for module in LAUNCHER_MODULES:
        cases.extend(importlib.import_module(module).compile_cases())
    return cases


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: kernels defined under the interpreter cannot be compiled", file=sys.stderr)
        return 2
    failed = 0
    for case in all_cases():
        for sm in (80, 90):
            report = compile_report(case, sm)
            report["problems"] = problems(report, case)
            failed += bool(report["problems"])
            print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
