"""Fallbacks warn once per (op, reason) and their records stay bounded."""

import warnings

import pytest

from neuroflow.ops import dispatch


def test_fallback_warns_once_per_op_and_reason_and_records_stay_bounded(triton_path):
    with pytest.warns(dispatch.FallbackWarning, match="gate: running the PyTorch reference .*no good"):
        dispatch.choose("gate", dispatch.torch.device("cpu"), "no good")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(dispatch.MAX_FALLBACK_RECORDS + 10):  # the same (op, reason): no new warning
            assert dispatch.choose("gate", dispatch.torch.device("cpu"), "no good") == dispatch.REFERENCE
    with pytest.warns(dispatch.FallbackWarning, match="other reason"):
        dispatch.choose("gate", dispatch.torch.device("cpu"), "other reason")
    assert len(dispatch.fallbacks) == dispatch.MAX_FALLBACK_RECORDS
    assert dispatch.fallbacks[-1] == ("gate", "other reason")
    assert dispatch.fallback_counts[("gate", "no good")] == dispatch.MAX_FALLBACK_RECORDS + 11
    dispatch.clear()
    assert dispatch.fallbacks == [] and not dispatch.fallback_counts


def test_strict_mode_still_raises(triton_path, monkeypatch):
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    with pytest.raises(dispatch.FallbackError, match="no good"):
        dispatch.choose("gate", dispatch.torch.device("cpu"), "no good")


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.0", True), ("3.6.1", "2.5.2", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False),
    ("3.9.0", "2.4.0rc1", False),
])
def test_triton_36_interpreter_under_numpy_24_is_a_recorded_fallback(triton_path, monkeypatch, triton_version,
                                                                     numpy_version, broken):
    """Triton 3.6's interpreter cannot run under numpy >= 2.4: the CPU call takes the reference with
    that reason (warned, recorded, an error in strict mode) instead of crashing inside a kernel."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = dispatch.interpreter_problem()
    assert (problem is not None) == broken
    if not broken:
        return
    assert "numpy" in problem and triton_version in problem
    with pytest.warns(dispatch.FallbackWarning, match="does not run under numpy"):
        assert dispatch.choose("gate", dispatch.torch.device("cpu")) == dispatch.REFERENCE
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    with pytest.raises(dispatch.FallbackError, match="does not run under numpy"):
        dispatch.choose("gate", dispatch.torch.device("cpu"))
