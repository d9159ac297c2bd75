"""Fallbacks warn once per (op, reason) and their records stay bounded."""

import warnings

import pytest

from neuroflow import dispatch


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
