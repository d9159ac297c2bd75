"""Every kernel's default configurations compile for sm_80 and sm_90 (no GPU needed): shared memory
within the limit, no register spills, tensor-core instructions where tl.dot is used."""

import json
import os
import subprocess
import sys

import pytest


def test_default_configs_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    # A kernel defined under the interpreter cannot be compiled: a fresh process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "neuroflow.compile_check"], env=env, capture_output=True, text=True)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [f"{r['case']} sm_{r['sm']}: {'; '.join(r['problems'])}" for r in reports if r["problems"]]
    assert not failed, "\n".join(failed)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels = {r["kernel"] for r in reports}
    assert kernels == {"gate_embed_kernel", "gate_select_kernel", "gate_pack_kernel", "gate_rows_kernel",
                       "cache_scatter_kernel", "varlen_attention_fwd_kernel"}
    assert {r["sm"] for r in reports} == {80, 90}
    # The launches were specialised as the runtime does it: aligned pointers carry divisibility.
    for r in reports:
        pointers = [name for name, ty in r["signature"].items() if ty.startswith("*")]
        assert set(pointers) <= set(r["divisible_args"]), (r["case"], pointers, r["divisible_args"])
