"""Compile every kernel's default configurations for real GPUs, on a machine without one.

``python -m neuroflow.tooling.compile_check`` runs each :class:`CompileCase` (defined in
:mod:`neuroflow.ops._launch`) that the op modules list (``compile_cases()`` in
:mod:`neuroflow.ops.gate`, :mod:`neuroflow.ops.cache_scatter`, :mod:`neuroflow.ops.varlen_attention`):
a call of the launcher itself on CPU tensors inside
:func:`neuroflow.ops.dispatch.recording_launches`, which records each kernel launch instead of running
it. Each recorded launch is specialised exactly as Triton's runtime does it for a CUDA target
(argument types from the values, constexprs, 16-byte divisibility/alignment of pointers and
integers), so the signature is derived from the kernel's own parameters and the launcher's own
arguments, never typed out by hand; it is compiled for sm_80 and sm_90 with ``triton.compile``
and a ``GPUTarget``, then the cubin is checked: dynamic shared memory within the architecture's
limit, no register spill inside a loop and none beyond one parked stack slot outside loops (see
:data:`PARKED_STACK_BYTES`), no local-memory arrays, and tensor-core instructions (HMMA on sm_80,
HGMMA on sm_90) where the kernel uses ``tl.dot``. It prints one JSON line per (case,
architecture), with the Triton version, and exits 1 if any check fails. ``--only TEXT`` compiles
the cases whose name contains TEXT; ``--jobs N`` compiles N cases at once.

Run it under every Triton the kernels must work on (3.6, the lent GPU machine's, through 3.9):
their ptxas releases allocate registers differently. ``tests/test_compile.py`` runs it under the
test's own Python and under each interpreter listed in ``NEUROFLOW_COMPILE_CHECK_PYTHONS``.

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
from pathlib import Path

from ..ops._launch import CompileCase  # noqa: F401  (the ops define their cases with it)

SHARED_LIMIT = {80: 166_912, 90: 232_448}
"""Largest dynamic shared memory per block (bytes) that a launch may request."""

TENSOR_CORE_OP = {80: "HMMA", 90: "HGMMA"}

PARKED_STACK_BYTES = 8
"""Stack a kernel may use for spills outside every loop. ptxas 12.8 (Triton 3.6) parks one or two
long-lived scalars (a row base, a flag) in an 8-byte stack slot before a kernel's loops and reloads
them after the last one, at 64-168 of 255 registers, i.e. not under register pressure: two to four
instructions per program. A spill inside a loop, or a larger frame, is register pressure and fails."""

_SASS_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA(?:\.[A-Z]+)*\s+`?\(?(\.L_x_\d+)")
_SASS_SPILL = re.compile(r"\b(?:LDL|STL)\b")


def spills_by_place(sass: str) -> tuple[int, int]:
    """``(inside loops, outside loops)`` counts of the LDL/STL instructions in ``nvdisasm -c``
    output. A loop is the address range from a label to a backward branch to it."""
    labels, branches, spills = {}, [], []
    pending = []  # labels waiting for the address of the next instruction
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        address = _SASS_ADDRESS.search(line)
        if not address:
            continue
        at = int(address.group(1), 16)
        for name in pending:
            labels[name] = at
        pending = []
        target = _SASS_BRANCH.search(line)
        if target:
            branches.append((at, target.group(1)))
        if _SASS_SPILL.search(line):
            spills.append(at)
    loops = [(labels[name], at) for at, name in branches if name in labels and labels[name] < at]
    inside = sum(any(lo <= at <= hi for lo, hi in loops) for at in spills)
    return inside, len(spills) - inside


def recorded_launches(case: CompileCase) -> list:
    """The :class:`neuroflow.ops.dispatch.Launch` records of one case's launcher call."""
    from ..ops import dispatch

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


DIVISIBILITY = 16
"""Triton's runtime marks a pointer whose address, or an integer whose value, is a multiple of
this (``tt.divisibility``); the compiled code then assumes it (vectorised, aligned accesses)."""


def divisible_args(src) -> list[str]:
    """Names of the arguments the binder specialised as divisible by :data:`DIVISIBILITY`: those
    whose attributes in ``src.attrs`` (one entry per parameter, empty or not) hold
    ``["tt.divisibility", 16]``."""
    names = src.fn.arg_names
    return sorted(names[path[0]] for path, attrs in src.attrs.items()
                  if ["tt.divisibility", DIVISIBILITY] in [list(a) for a in attrs])


def value_divisible_args(launch, src) -> list[str]:
    """Names of the runtime arguments (not constexpr) whose *values* are divisible by
    :data:`DIVISIBILITY`, read from the launch itself: a tensor's ``data_ptr()``, an int's value
    (bools and floats never are). What :func:`divisible_args` must equal when the launch is
    specialised as the runtime does it; independent of Triton's binder."""
    fn = launch.kernel
    bound = fn.signature.bind(*launch.args, **{k: v for k, v in launch.kwargs.items() if k in fn.arg_names})
    out = []
    for kp in fn.params:
        if src.signature.get(kp.name) == "constexpr" or kp.name not in bound.arguments:
            continue
        if kp.do_not_specialize or kp.do_not_specialize_on_alignment:
            continue
        value = bound.arguments[kp.name]
        if hasattr(value, "data_ptr"):
            divisible = value.data_ptr() % DIVISIBILITY == 0
        elif isinstance(value, int) and not isinstance(value, bool):
            divisible = value % DIVISIBILITY == 0
        else:
            divisible = False
        if divisible:
            out.append(kp.name)
    return sorted(out)


def unaligned_pointers(report: dict) -> list[str]:
    """Pointer arguments of a report that the specialisation did not mark divisible (a base
    address not a multiple of 16 bytes: the kernel compiles to unaligned accesses)."""
    return [name for name, ty in report["signature"].items()
            if ty.startswith("*") and name not in report["divisible_args"]]


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
    in_loops, outside_loops = spills_by_place(sass)
    return {
        "case": case.name,
        "kernel": launch.kernel.__name__,
        "sm": capability,
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        "signature": {k: v for k, v in src.signature.items() if v != "constexpr"},
        # Arguments the binder specialised as divisible by 16 (aligned pointers, integers), and
        # the same read from the launch's values: the two must agree (see ``problems``).
        "divisible_args": divisible_args(src),
        "value_divisible_args": value_divisible_args(launch, src),
        "shared_bytes": int(compiled.metadata.shared),
        "registers": regs,
        "stack_bytes": stack,
        "local_bytes": local,
        "spill_instructions": in_loops + outside_loops,
        "spill_instructions_in_loops": in_loops,
        "hmma": sass.count("HMMA"),
        "hgmma": sass.count("HGMMA"),
        "uses_dot": case.uses_dot and launch.kernel.__name__ not in case.no_dot,
    }


def problems(report: dict, case: CompileCase) -> list[str]:
    out = []
    sm = report["sm"]
    if report.get("divisible_args") != report.get("value_divisible_args"):
        out.append(f"specialisation marks {report['divisible_args']} divisible by {DIVISIBILITY}, "
                   f"the launch's values {report['value_divisible_args']}")
    if report["shared_bytes"] > SHARED_LIMIT[sm]:
        out.append(f"shared memory {report['shared_bytes']} B > sm_{sm} limit {SHARED_LIMIT[sm]} B")
    if report["local_bytes"] or report["stack_bytes"] > PARKED_STACK_BYTES or report["spill_instructions_in_loops"]:
        out.append(
            f"register spills: {report['stack_bytes']} B stack, {report['local_bytes']} B local memory, "
            f"{report['spill_instructions']} LDL/STL ({report['spill_instructions_in_loops']} inside loops)"
        )
    if report["uses_dot"] and sm in case.tensor_cores and report[TENSOR_CORE_OP[sm].lower()] == 0:
        out.append(f"tl.dot compiled without {TENSOR_CORE_OP[sm]} on sm_{sm}")
    return out


def all_cases() -> list[CompileCase]:
    from ..ops import cache_scatter, gate, varlen_attention

    return [*gate.compile_cases(), *cache_scatter.compile_cases(), *varlen_attention.compile_cases()]


def case_reports(name: str) -> list[dict]:
    """Every report (launch x architecture) of the case called ``name``, problems included."""
    import triton

    case = next(c for c in all_cases() if c.name == name)
    reports = []
    for launch in recorded_launches(case):
        for sm in (80, 90):
            report = compile_report(case, launch, sm)
            report["triton"] = triton.__version__
            report["problems"] = problems(report, case)
            reports.append(report)
    return reports


def main(argv=None) -> int:
    import argparse
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(prog="python -m neuroflow.tooling.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", metavar="TEXT", help="compile only the cases whose name contains TEXT")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="cases compiled at once, one process each (default: the CPU count)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: kernels defined under the interpreter cannot be compiled", file=sys.stderr)
        return 2
    names = [case.name for case in all_cases() if args.only in case.name]
    if not names:
        print(f"no compile case matches {args.only!r}", file=sys.stderr)
        return 2
    failed = 0
    # ptxas dominates and runs one case per process; results print in the cases' order.
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for reports in pool.map(case_reports, names):
            for report in reports:
                failed += bool(report["problems"])
                print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
