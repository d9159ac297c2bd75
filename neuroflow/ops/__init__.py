"""The engine's three device ops, one module each, named as everywhere else:

| op | kernel (``@triton.jit``) | launcher | reference | tests | benchmark |
|---|---|---|---|---|---|
| gate | ``kernels/gate.py`` | ``neuroflow/ops/gate.py`` | ``neuroflow/reference/gate.py`` | ``tests/test_gate.py`` | ``bench/bench_gate.py`` |
| cache_scatter | ``kernels/cache_scatter.py`` | ``neuroflow/ops/cache_scatter.py`` | ``neuroflow/reference/cache_scatter.py`` | ``tests/test_cache_scatter.py`` | ``bench/bench_cache_scatter.py`` |
| varlen_attention | ``kernels/varlen_attention.py`` | ``neuroflow/ops/varlen_attention.py`` | ``neuroflow/reference/varlen_attention.py`` | ``tests/test_varlen_attention.py`` | ``bench/bench_varlen_attention.py`` |

Each launcher checks its arguments, asks :mod:`neuroflow.ops.dispatch` which path runs (and records it),
then launches the kernel or calls the reference of the same name (``<op>_reference``). Import an op
from its module (``from neuroflow.ops.gate import gate``): this package re-exports nothing, so the
module names stay the modules.

``dispatch`` chooses each launcher's path and records it; ``_launch`` holds the launch
helpers and :class:`CompileCase`, the form of each op's ``compile_cases()``.
"""
