"""Small helpers shared by the tests."""

from __future__ import annotations

import torch

from neuroflow import NeuroFlow
from neuroflow.reference.patch_ranker import RANKER_FEATURES, PatchRanker
from neuroflow.tooling.testing import allowed_error, max_error


def stream_tensor(nf, stream_id, name: str) -> torch.Tensor:
    """One stream's state tensor ``name`` from ``nf.stream_state_dict()``."""
    for pool in nf.stream_state_dict()["pools"]:
        if stream_id in pool["ids"]:
            return pool["tensors"][name][pool["ids"].index(stream_id)]
    raise KeyError(stream_id)


def assert_same_state(a: dict, b: dict) -> None:
    """Two ``stream_state_dict()`` snapshots are identical, bit for bit."""
    assert a["config"] == b["config"] and a["settings"] == b["settings"]
    pa = {tuple(p["grid"]): p for p in a["pools"]}
    pb = {tuple(p["grid"]): p for p in b["pools"]}
    assert pa.keys() == pb.keys()
    for grid in pa:
        ids_a, ids_b = pa[grid]["ids"], pb[grid]["ids"]
        assert sorted(map(repr, ids_a)) == sorted(map(repr, ids_b))
        for name in pa[grid]["tensors"]:
            for i in ids_a:
                ta = pa[grid]["tensors"][name][ids_a.index(i)]
                tb = pb[grid]["tensors"][name][ids_b.index(i)]
                assert torch.equal(ta, tb), f"state {name!r} of stream {i!r} changed"


def assert_same_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """Two results of the same computation that may differ only in float summation order (batch
    composition, module instance): held to the dense model's own fp32 error on the same frames,
    ``ref32`` vs ``ref64``, under the tolerance policy."""
    err = max_error(actual, expected)
    limit = allowed_error(ref64, ref32, actual.dtype)
    assert err <= limit, f"{what}: {err:.3e} > {limit:.3e}"


class PaperFlow(NeuroFlow):
    """``NeuroFlow`` under the paper's preset (``arch="C"``, the EMA of every frame, threshold
    0.35, no staleness bound) for whatever a test leaves out: the rules ``tests/oracle.py``
    implements and the tests written for them. The measured default is tested on its own
    (``tests/test_presets.py``)."""

    def __init__(self, *args, preset: str = "paper", **kwargs):
        super().__init__(*args, preset=preset, **kwargs)


def random_ranker(seed: int, hidden: int = 8) -> PatchRanker:
    """An untrained ranker with seeded random weights: an order unlike the surprise's."""
    g = torch.Generator().manual_seed(seed)
    f = len(RANKER_FEATURES)
    return PatchRanker(torch.randn(f, hidden, generator=g), torch.randn(hidden, generator=g),
                       torch.randn(hidden, generator=g), torch.zeros(()), torch.randn(f, generator=g),
                       torch.rand(f, generator=g) + 0.5)
