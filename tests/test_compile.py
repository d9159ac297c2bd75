"""Every kernel's default configurations compile for sm_80 and sm_90 (no GPU needed): shared memory
within the limit, no register spills, tensor-core instructions where tl.dot is used.

The check runs under this test's Python and under every interpreter listed (``os.pathsep``
separated) in ``NEUROFLOW_COMPILE_CHECK_PYTHONS``: ``.ci/run`` lists one with Triton 3.6, the
lent GPU machine's release, whose ptxas allocates registers differently from newer ones."""

import json
import os
import re
import subprocess
import sys

import pytest

from neuroflow.tooling import compile_check

EXTRA_PYTHONS = [p for p in os.environ.get("NEUROFLOW_COMPILE_CHECK_PYTHONS", "").split(os.pathsep) if p]


def _triton_version(python: str) -> str:
    done = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True)
    if done.returncode and python == sys.executable:
        pytest.skip("this Python has no Triton")
    assert done.returncode == 0, f"{python} listed in NEUROFLOW_COMPILE_CHECK_PYTHONS cannot import triton"
    return done.stdout.strip()


@pytest.mark.parametrize("python", [sys.executable, *EXTRA_PYTHONS],
                         ids=["this-python", *(f"extra{i}" for i in range(len(EXTRA_PYTHONS)))])
def test_default_configs_compile_for_sm80_and_sm90(python):
    version = _triton_version(python)
    # A kernel defined under the interpreter cannot be compiled: a fresh process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([python, "-m", "neuroflow.tooling.compile_check"], env=env, capture_output=True, text=True)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert reports and {r["triton"] for r in reports} == {version}, done.stderr[-2000:]
    failed = [f"{r['case']} sm_{r['sm']}: {'; '.join(r['problems'])}" for r in reports if r["problems"]]
    assert not failed, "\n".join(failed)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels = {r["kernel"] for r in reports}
    assert kernels == {"gate_embed_kernel", "gate_select_kernel", "gate_pack_kernel", "gate_rows_kernel",
                       "cache_scatter_kernel", "varlen_attention_fwd_kernel"}
    assert {r["sm"] for r in reports} == {80, 90}
    # The launches were specialised as the runtime does it: aligned pointers carry divisibility.
    # (``problems`` also holds the binder's divisible set equal to the one read from the values.)
    for r in reports:
        assert compile_check.unaligned_pointers(r) == [], (r["case"], r["divisible_args"])
    _check_coverage(reports)


def _check_coverage(reports):
    """What the check must compile, read from the reports (not from the case list): each gate
    kernel in every dtype the gate accepts (fp32 is Hugging Face's default), every head-dim tile
    of the attention, and each kernel also specialised with integer arguments that are not
    divisible by 16 (a different compiled kernel than the all-divisible launch)."""
    from neuroflow.kernels.varlen_attention import HEAD_DIM_TILES
    from neuroflow.ops.varlen_attention import padded_head_dim

    def first_pointer_type(r):
        return next(t for t in r["signature"].values() if t.startswith("*"))

    for kernel in ("gate_embed_kernel", "gate_rows_kernel"):
        assert {first_pointer_type(r) for r in reports if r["kernel"] == kernel} >= {"*fp16", "*bf16", "*fp32"}, kernel
    widths = {next(w for w in HEAD_DIM_TILES if w >= padded_head_dim(int(m.group(1))))
              for r in reports if r["kernel"] == "varlen_attention_fwd_kernel"
              for m in [re.search(r" d(\d+) ", r["case"])]}
    assert widths == set(HEAD_DIM_TILES), sorted(widths)
    for kernel in {r["kernel"] for r in reports}:
        ints = [(r, [n for n, t in r["signature"].items() if t in ("i32", "i64")]) for r in reports if r["kernel"] == kernel]
        odd = [r["case"] for r, names in ints if set(names) - set(r["value_divisible_args"])]
        if any(names for _, names in ints):
            assert odd, f"{kernel}: every compiled launch had all integer arguments divisible by 16"


def test_spills_are_placed_inside_or_outside_loops():
    """The spill rule's loop finder on hand-written SASS: a backward branch makes a loop."""
    sass = """
        /*0000*/                   STL [R1], R2 ;
.L_x_0:
        /*0010*/                   LDL R3, [R1] ;
        /*0020*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
        /*0040*/              @P1 BRA `(.L_x_1) ;
        /*0050*/                   STL [R1+0x4], R5 ;
.L_x_1:
        /*0060*/                   LDL.LU R6, [R1+0x4] ;
        /*0070*/                   EXIT ;
"""
    assert compile_check.spills_by_place(sass) == (1, 3)
    report = {"sm": 80, "shared_bytes": 0, "local_bytes": 0, "stack_bytes": 8, "spill_instructions": 2,
              "spill_instructions_in_loops": 0, "uses_dot": False}
    case = compile_check.CompileCase("x", lambda: None)
    assert compile_check.problems(report, case) == []  # one parked slot outside the loops
    assert compile_check.problems({**report, "spill_instructions_in_loops": 1}, case)
    assert compile_check.problems({**report, "stack_bytes": compile_check.PARKED_STACK_BYTES + 8}, case)


def test_divisibility_reports_a_misaligned_launch(monkeypatch):
    """The specialisation is read from the binder's real attributes: an offset pointer and sizes
    not divisible by 16 are reported as not divisible, so the pointer check above fails on them."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as conftest imported Triton; nothing is launched
    import torch

    from neuroflow.ops import dispatch
    from neuroflow.ops.cache_scatter import cache_scatter

    cache = torch.zeros(4, 7, 24, dtype=torch.float16)
    src = torch.zeros(3 * 24 + 1, dtype=torch.float16)[1:].view(3, 24)  # base 2 bytes off
    with dispatch.recording_launches() as launches:
        cache_scatter(cache, torch.arange(3), src, torch.arange(4, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    src_ast, _ = compile_check.specialise(launches[0], 80)
    divisible = compile_check.divisible_args(src_ast)
    assert divisible == compile_check.value_divisible_args(launches[0], src_ast)
    assert "cache_ptr" in divisible and "src_ptr" not in divisible
    assert not {"B", "T_TOK", "D", "src_stride"} & set(divisible)  # 3, 7, 24, 24
    report = {"signature": {k: v for k, v in src_ast.signature.items() if v != "constexpr"}, "divisible_args": divisible}
    assert compile_check.unaligned_pointers(report) == ["src_ptr"]
