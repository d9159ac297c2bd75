"""The project's one tolerance policy (flash-attention's rule), used by every equivalence test.

A result is close enough when its error against a high-precision reference is at most twice the
error of the plain PyTorch path run in the result's own precision, plus a floor of a few units in
the last place. No test picks its own tolerance.

TF32: a kernel that runs fp32 inputs on TF32 tensor cores (the varlen attention on a GPU) is held
to a baseline computed in fp32 on inputs rounded to TF32 (:func:`round_to_tf32`, the precision of
its operands), not to plain fp32 (which on a GPU depends on global TF32 flags, and on the CPU has
no TF32 at all). Under the Triton interpreter tl.dot is exact fp32, so the plain fp32 baseline applies.

8-bit caches: the reference is quantise-then-dequantise (the dequantised values are the inputs);
the kernel's error against float64 attention on them may be at most twice the error of the plain
PyTorch path run on the same dequantised values in the query's dtype.
"""

from __future__ import annotations

import torch

ERROR_RATIO = 2.0
FLOOR_ULPS = 8.0


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``t`` rounded to TF32 (10 explicit mantissa bits, round half away from zero as the
    tensor cores' ``cvt.rna.tf32.f32``), returned as fp32."""
    bits = t.float().contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    finite = torch.isfinite(t.float())
    return torch.where(finite, rounded.view(torch.float32), t.float())


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def allowed_error(reference: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> float:
    """``2 * |baseline - reference| + floor``, floor = a few ulps of ``dtype`` at the reference's scale."""
    scale = max(1.0, reference.double().abs().max().item()) if reference.numel() else 1.0
    return ERROR_RATIO * max_error(baseline, reference) + FLOOR_ULPS * torch.finfo(dtype).eps * scale


def assert_close(actual: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor, what: str = "output") -> None:
    """Check ``actual`` against ``reference`` (high precision) under the project's policy.

    Args:
        actual: the result under test (e.g. NeuroFlow or a kernel), any float dtype.
        reference: the same quantity from a high-precision reference (float64, or float32 for a
            half-precision ``actual``).
        baseline: the same quantity from the plain PyTorch path in ``actual``'s dtype.
    """
    if actual.shape != reference.shape or baseline.shape != reference.shape:
        raise AssertionError(
            f"{what}: shapes differ: actual {tuple(actual.shape)}, reference {tuple(reference.shape)}, "
            f"baseline {tuple(baseline.shape)}"
        )
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{what}: non-finite values in the result")
    err = max_error(actual, reference)
    limit = allowed_error(reference, baseline, actual.dtype)
    if err > limit:
        base = max_error(baseline, reference)
        raise AssertionError(
            f"{what}: error {err:.3e} against the reference exceeds {limit:.3e} "
            f"({ERROR_RATIO}x the plain PyTorch path's error {base:.3e} plus a {FLOOR_ULPS:g}-ulp floor)"
        )
