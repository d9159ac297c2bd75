"""The project's one tolerance policy (flash-attention's rule), used by every equivalence test.

A result is close enough when its error against a high-precision reference is at most twice the
error of the plain PyTorch path run in the result's own precision, plus a floor of a few units in
the last place. No test picks its own tolerance.
"""

from __future__ import annotations

import torch

ERROR_RATIO = 2.0
FLOOR_ULPS = 8.0


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
