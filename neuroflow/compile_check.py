"""Compile every kernel's default configurations for real GPUs, on a machine without one.

``python -m neuroflow.compile_check`` runs each :class:`CompileCase` that the op modules list
(``compile_cases()`` in :mod:`neuroflow.ops.gate`, :mod:`neuroflow.ops.cache_scatter`,
:mod:`neuroflow.ops.varlen_attention`): a call of the launcher itself on CPU tensors inside
:func:`neuroflow.dispatch.recording_launches`, which records each kernel launch instead of running
it. Each recorded launch is specialised exactly as Triton's runtime does it for a CUDA target
(argument types from the values, constexprs, 16-byte divisibility/alignment of pointers and
integers), so the signature is derived from the kernel's own parameters and the launcher's own
arguments, never typed out by hand; it is compiled for sm_80 and sm_90 with ``triton.compile``
and a ``GPUTarget``, then the cubin is checked: dynamic shared memory within the architecture's limit, no local memory (register
spills), and tensor-core instructions (HMMA on sm_80, HGMMA on sm_90) where the kernel uses
``tl.dot``. It prints one JSON line per (case, architecture) and exits 1 if any check fails.

Must run in a process without ``TRITON_INTERPRET`` (a kernel defined under the interpreter cannot
be compiled); ``tests/test_compile.py`` starts it that way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from typing import Callable

SHARED_LIMIT = {80: 166_912, 90: 232_448}
"""Largest dynamic shared memory per block (bytes) that a launch may request."""

TENSOR_CORE_OP = {80: "HMMA", 90: "HGMMA"}


@dataclass
class CompileCase:
    """One launcher call whose kernel launches are compiled.

    Attributes:
        name: label for reports (kernel and config).
        launch: calls the launcher on CPU tensors (run inside :func:`dispatch.recording_launches`).
        uses_dot: whether the kernel uses ``tl.dot`` (then tensor-core instructions are required).
        tensor_cores: architectures on which tensor-core instructions are required (default: both);
            wgmma needs tiles of at least 64 rows, which small-tile configs do not have.
        no_dot: names of kernels among the case's launches that use no ``tl.dot`` (the gate's
            per-frame select kernel), exempt from the tensor-core check.
    """

    name: str
    launch: Callable[[], None]
    uses_dot: bool = False
    tensor_cores: tuple[int, ...] = field(default=(80, 90))
    no_dot: tuple[str, ...] = ()


def recorded_launches(case: CompileCase) -> list:
    """The :class:`neuroflow.dispatch.Launch` records of one case's launcher call."""
    from . import dispatch

    with dispatch.recording_launches() as launches:
        case.launch()
    if not launches:
        raise RuntimeError(f"{case.name}: the launcher made no kernel launch (it took the reference path)")
    return launches


def specialise(launch, capability: int):
    """``(ASTSource, options)`` for one recorded launch, as Triton's JIT builds them for
    ``sm_<capability>``: the same binder and argument packing as ``JITFunction.run``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def compile_report(case: CompileCase, launch, capability: int) -> dict:
    """Compile one recorded launch of ``case`` for ``sm_<capability>`` and measure the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, options = specialise(launch, capability)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
    regs, stack, static_shared, local = (int(x) for x in res.groups()) if res else (-1, -1, -1, -1)
    return {
        "case": case.name,
        "kernel": launch.kernel.__name__,
        "sm": capability,
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        "signature": {k: v for k, v in src.signature.items() if v != "constexpr"},
        # Arguments the runtime specialises (16-byte aligned pointers, integers divisible by 16).
        "divisible_args": sorted(src.fn.arg_names[path[0]] for path in src.attrs),
        "shared_bytes": int(compiled.metadata.shared),
        "registers": regs,
        "stack_bytes": stack,
        "local_bytes": local,
        "spill_instructions": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "hmma": sass.count("HMMA"),
        "hgmma": sass.count("HGMMA"),
        "uses_dot": case.uses_dot and launch.kernel.__name__ not in case.no_dot,
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
    if report["uses_dot"] and sm in case.tensor_cores and report[TENSOR_CORE_OP[sm].lower()] == 0:
        out.append(f"tl.dot compiled without {TENSOR_CORE_OP[sm]} on sm_{sm}")
    return out


def all_cases() -> list[CompileCase]:
    from .ops import cache_scatter, gate, varlen_attention

    return [*gate.compile_cases(), *cache_scatter.compile_cases(), *varlen_attention.compile_cases()]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: kernels defined under the interpreter cannot be compiled", file=sys.stderr)
        return 2
    failed = 0
    for case in all_cases():
        for launch in recorded_launches(case):
            for sm in (80, 90):
                report = compile_report(case, launch, sm)
                report["problems"] = problems(report, case)
                failed += bool(report["problems"])
                print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
