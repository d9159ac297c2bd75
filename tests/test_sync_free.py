"""A steady-state step on the kernel path makes no host-synchronising call from NeuroFlow's code.

Under the Triton interpreter every tensor is on the CPU, so a sync cannot be timed; instead the
calls that synchronise on a GPU are intercepted and recorded when the *direct caller* is a file of
the ``neuroflow`` package:

* reads of device values: ``Tensor.item/tolist/__bool__/__int__/__float__/__index__/nonzero/
  numpy``, ``torch.nonzero``;
* device-to-host copies: ``Tensor.cpu()``, ``Tensor.to(...)`` naming the CPU (a device string,
  ``torch.device``, ``device=`` or a CPU tensor), and ``Tensor.copy_`` into a CPU tensor, except a
  ``non_blocking`` copy into pinned memory (what :class:`neuroflow.engine.capacity.HostCount` does on
  CUDA). Under the interpreter the engine's device *is* the CPU, so every such move or copy counts:
  a steady-state step moves nothing between devices;
* ops whose result size is data-dependent: indexing with a bool tensor (``x[mask]``,
  ``x[mask] = y``), ``masked_select`` (function and method), ``repeat_interleave`` with tensor
  repeats and no ``output_size``;
* waits: ``torch.cuda.synchronize``, ``torch.cuda.Event.synchronize``,
  ``torch.cuda.Stream.synchronize`` and the device-generic ``torch.Event`` / ``torch.Stream``
  ``synchronize`` (immutable C types: seen through ``sys.setprofile``).

Not counted: calls made inside ``neuroflow/reference/`` (the CPU reference and the interpreter-only
offset checks; the test asserts every op took its kernel) and reads of
:class:`neuroflow.engine.capacity.HostCount`'s host copy (pinned memory written by a copy the host already
waited for, never a device tensor). **By design** and recorded apart (``by_design``), never in
``calls``: ``HostCount.wait``'s event wait, which the next call makes at its start
(``NeuroFlow.sync_errors``) for the previous call's counts; that event was recorded right after
the previous call's gate, so the host waits for that gate only, never for the current call's work
(one wait per call on CUDA; on the CPU there is no event). The steady-state tests give HostCount an
event as on CUDA and assert exactly that one wait per call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import neuroflow
from conftest import make_model, video
from neuroflow import NeuroFlow
from neuroflow.engine import capacity
from neuroflow.engine.presets import FROM_PRESET, PRESETS
from neuroflow.ops import dispatch

PACKAGE = str(Path(neuroflow.__file__).parent)
REFERENCE = str(Path(PACKAGE) / "reference")
METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
BY_DESIGN = {("engine/capacity.py", "HostCount.wait")}
"""(file, function) sites whose waits are by design (see the module doc)."""


def _device_of(value) -> torch.device | None:
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, (str, torch.device)) or (isinstance(value, int) and not isinstance(value, bool)):
        return torch.device(value) if not isinstance(value, int) else torch.device("cuda", value)
    return None


def _to_target(args, kwargs) -> torch.device | None:
    """The device a ``Tensor.to`` call names, or None (a dtype-only conversion)."""
    for key in ("device", "other"):
        if kwargs.get(key) is not None:
            return _device_of(kwargs[key])
    return _device_of(args[0]) if args else None


class SyncRecorder:
    """Records host-synchronising calls whose direct caller is a file under one of ``roots``
    (default: the ``neuroflow`` package) and not under ``excluded`` (default: its reference)."""

    def __init__(self, roots=(PACKAGE,), excluded=(REFERENCE,)):
        self.roots, self.excluded = tuple(map(str, roots)), tuple(map(str, excluded))
        self.calls: list[str] = []
        self.by_design: list[str] = []
        self._previous_profile = None

    def _record(self, what: str, tensor=None, frame=None) -> None:
        caller = frame if frame is not None else sys._getframe(2)
        path = caller.f_code.co_filename
        if not path.startswith(self.roots) or path.startswith(self.excluded):
            return
        if tensor is not None and getattr(tensor, "_neuroflow_host_copy", False):
            return
        root = next(r for r in self.roots if path.startswith(r))
        where = Path(path).relative_to(root if Path(root).is_dir() else Path(root).parent)
        entry = f"{what} at {where}:{caller.f_lineno}"
        if (where.as_posix(), caller.f_code.co_qualname) in BY_DESIGN:
            self.by_design.append(entry)
        else:
            self.calls.append(entry)

    def _profile(self, frame, event, arg):
        # torch.Event / torch.Stream are immutable C types: their synchronize is seen as a C call.
        if event == "c_call" and getattr(arg, "__name__", None) == "synchronize" \
                and type(getattr(arg, "__self__", None)) in (torch.Event, torch.Stream):
            self._record(f"{type(arg.__self__).__name__}.synchronize", frame=frame)
        if self._previous_profile is not None:
            self._previous_profile(frame, event, arg)

    def install(self, monkeypatch) -> "SyncRecorder":
        """Intercept every construct of the module doc (undone by ``monkeypatch.undo()``; call
        :meth:`uninstall` too for the profile hook)."""
        recorder = self
        for name in METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(self_, *args, __original=original, __name=name, **kwargs):
                recorder._record(f"Tensor.{__name}", self_)
                return __original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

        to = torch.Tensor.to

        def tensor_to(self_, *args, **kwargs):
            target = _to_target(args, kwargs)
            if target is not None and target.type == "cpu":
                recorder._record("Tensor.to(cpu)", self_)
            return to(self_, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", tensor_to)
        copy = torch.Tensor.copy_

        def tensor_copy(self_, src, non_blocking=False):
            if self_.device.type == "cpu" and not (non_blocking and self_.is_pinned()):
                recorder._record("Tensor.copy_ into a CPU tensor", src)
            return copy(self_, src, non_blocking)

        monkeypatch.setattr(torch.Tensor, "copy_", tensor_copy)
        for owner, label in ((torch, "torch"), (torch.Tensor, "Tensor")):
            masked_select = owner.masked_select

            def selecting(*args, __original=masked_select, __label=label, **kwargs):
                recorder._record(f"{__label}.masked_select")
                return __original(*args, **kwargs)

            monkeypatch.setattr(owner, "masked_select", selecting)
            repeat_interleave = owner.repeat_interleave

            def repeating(*args, __original=repeat_interleave, __label=label, **kwargs):
                # The one-argument form ``torch.repeat_interleave(repeats)`` repeats its indices.
                repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0] if args else None)
                if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
                    recorder._record(f"{__label}.repeat_interleave without output_size")
                return __original(*args, **kwargs)

            monkeypatch.setattr(owner, "repeat_interleave", repeating)
        nonzero = torch.nonzero

        def torch_nonzero(*args, **kwargs):
            recorder._record("torch.nonzero")
            return nonzero(*args, **kwargs)

        monkeypatch.setattr(torch, "nonzero", torch_nonzero)
        for name in ("__getitem__", "__setitem__"):
            original = getattr(torch.Tensor, name)

            def indexing(self_, index, *rest, __original=original, __name=name):
                parts = index if isinstance(index, tuple) else (index,)
                if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                    recorder._record(f"bool-mask Tensor.{__name}")
                return __original(self_, index, *rest)

            monkeypatch.setattr(torch.Tensor, name, indexing)
        sync = torch.cuda.synchronize

        def cuda_sync(*args, **kwargs):
            recorder._record("torch.cuda.synchronize")
            return sync(*args, **kwargs)

        monkeypatch.setattr(torch.cuda, "synchronize", cuda_sync)
        for cls in (torch.cuda.Event, torch.cuda.Stream):
            original = cls.synchronize

            def waiting(self_, *args, __original=original, __name=f"torch.cuda.{cls.__name__}", **kwargs):
                recorder._record(f"{__name}.synchronize")
                return __original(self_, *args, **kwargs)

            monkeypatch.setattr(cls, "synchronize", waiting)
        self._previous_profile = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def uninstall(self) -> None:
        sys.setprofile(self._previous_profile)


CASES = [("siglip", "A"), ("siglip", "B"), ("siglip", "C"), ("siglip", "KV"), ("clip", "C"),
         ("dinov2_registers", "KV")]


def _host_counts_with_events(monkeypatch) -> None:
    """Give every :class:`~neuroflow.engine.capacity.HostCount` an event, as on CUDA (on the CPU it has
    none and ``wait()`` waits for nothing): the by-design wait of the next call is then seen."""
    init = capacity.HostCount.__init__

    def with_event(self, values):
        init(self, values)
        self._event = torch.Event(device="cpu")  # never recorded: the CPU backend has no events

    monkeypatch.setattr(capacity.HostCount, "__init__", with_event)


STEADY_CALLS = 3
"""Calls recorded after the warm-up (first frames, then one call to learn the bucket)."""


def _steady_state_syncs(monkeypatch, family, arch, **options):
    """``(recorder, last output, engine)`` of ``STEADY_CALLS`` steady-state calls of two streams."""
    model = make_model(family)
    # The measured preset's keyframes make a later frame dense, by schedule (keyframe_every, sync-free:
    # test_scheduled_keyframes_stay_sync_free_and_are_never_cut) or by drift (data-dependent: one read per
    # call, test_data_dependent_keyframes_under_auto_capacity_read_their_count); these cases test the rest.
    options.setdefault("keyframe_every", None)
    options.setdefault("keyframe_drift", None)
    nf = NeuroFlow(model, arch=arch, threshold=0.02, ema_decay=0.2, floor_tokens=3, **options)
    frames = torch.stack([video(2 + STEADY_CALLS, seed=0), video(2 + STEADY_CALLS, seed=1)], dim=1)
    _host_counts_with_events(monkeypatch)
    recorder = SyncRecorder()
    try:
        for t in range(frames.shape[0]):
            if t == 2:  # first frames (dense) and one more to learn the bucket: warm-up
                recorder.install(monkeypatch)
            out = nf(frames[t], stream_ids=["x", "y"])
            assert dispatch.last_path["gate_features" if nf.probe_layers else "gate"] == dispatch.TRITON
            if arch != "A":
                assert dispatch.last_path["varlen_attention"] == dispatch.TRITON
            if arch in ("C", "KV"):
                assert dispatch.last_path["cache_scatter"] == dispatch.TRITON
    finally:
        recorder.uninstall()
        monkeypatch.undo()
    assert dispatch.fallbacks == []
    return recorder, out, nf


def _assert_sync_free(recorder) -> None:
    assert recorder.calls == []
    # The one by-design wait per call: the previous call's counts (see the module doc).
    assert len(recorder.by_design) == STEADY_CALLS, recorder.by_design
    assert all(c.startswith("Event.synchronize at engine/capacity.py:") for c in recorder.by_design), recorder.by_design


@pytest.mark.parametrize("family,arch", CASES)
def test_steady_state_step_makes_no_host_sync(triton_path, monkeypatch, family, arch):
    # check_finite=True defers the check on CUDA only; "deferred" makes the CPU do what CUDA does.
    recorder, out, nf = _steady_state_syncs(monkeypatch, family, arch, check_finite="deferred")
    _assert_sync_free(recorder)
    assert nf.overflowed_frames == 0
    assert out.pooler_output is not None or out.last_hidden_state is not None


# Gate options that run in the kernels (the select launch), and partial-depth / 8-bit KV caches.
OPTION_CASES = [
    ("siglip", "C", dict(budget=0.5)),  # a static bound: the capacity is capped by the budget
    ("siglip", "KV", dict(reference="computed", max_staleness=2, motion_norm=True)),
    ("clip", "C", dict(max_staleness=3, budget=20)),
    ("siglip", "KV", dict(kv_layers=1)),
    ("dinov2_registers", "KV", dict(kv_layers=1, cache_dtype=torch.int8)),
    ("siglip", "KV", dict(cache_dtype=torch.int8, budget=0.25)),
    # Scheduled keyframes (the default's) get dense rows apart; the budget still caps the rest.
    ("siglip", "KV", dict(budget=0.5, keyframe_every=3)),
    # The gate on a dense probe's features (torch ops, then the select and pack kernels).
    ("dinov2", "KV", dict(reference="computed", max_staleness=2, probe_layers=1)),
    ("siglip", "KV", dict(reference="computed", probe_layers=1, budget=0.5, skip_below=0.1)),
]


@pytest.mark.parametrize("family,arch,options", OPTION_CASES,
                         ids=[f"{f}-{a}-{'-'.join(o)}" for f, a, o in OPTION_CASES])
def test_steady_state_step_with_gate_options_and_cache_layouts_makes_no_host_sync(triton_path, monkeypatch,
                                                                                 family, arch, options):
    recorder, out, nf = _steady_state_syncs(monkeypatch, family, arch, check_finite="deferred", **options)
    _assert_sync_free(recorder)
    assert nf.overflowed_frames == 0
    if "budget" in options:  # the budget caps every gated frame: the bucket never exceeds it
        n = out.active_mask.shape[1]
        gated = out.frame_kind != 2
        assert gated.any() and (out.active_mask.sum(dim=1)[gated] <= nf.gate_settings.budget_count(n)).all()
        # The last call's frames are all gated: its rows never exceed the budget's (the planner's bound).
        assert gated.all() and nf._pending.capacity <= len(gated) * (nf.adapter.num_prefix + nf.gate_settings.budget_count(n))


def test_the_recorder_catches_the_exact_count_read(triton_path, monkeypatch):
    """``capacity="exact"`` reads the token count on the host (what every call did before the
    capacity buckets): the recorder must see it, so the test above can fail."""
    calls = _steady_state_syncs(monkeypatch, "siglip", "C", capacity="exact")[0].calls
    assert any(c.startswith("Tensor.tolist at engine/architectures.py") for c in calls), calls


def test_scene_cut_under_auto_capacity_packs_exactly(triton_path, monkeypatch):
    """A scene cut makes a keyframe dense whatever the bucket: ``capacity="auto"`` then reads the
    count (documented sync) instead of cutting the keyframe."""
    recorder, _, nf = _steady_state_syncs(monkeypatch, "siglip", "C", scene_cut=0.9)
    calls = recorder.calls
    assert any(c.startswith("Tensor.tolist at engine/architectures.py") for c in calls), calls
    assert nf.overflowed_frames == 0


def test_scheduled_keyframes_stay_sync_free_and_are_never_cut(triton_path, monkeypatch):
    """``keyframe_every=4`` alone (the measured preset without its drift keyframes): the recorded calls (frames 2-4) include frame 4,
    a dense keyframe by schedule. The host knows the schedule (neuroflow.engine.keyframes), so
    ``capacity="auto"`` reserves its dense rows without reading anything, and so does a fixed
    ``capacity``; the keyframe is not cut."""
    for options in ({}, {"capacity": 40}):
        recorder, out, nf = _steady_state_syncs(monkeypatch, "siglip", "KV", keyframe_every=4,
                                                check_finite="deferred", **options)
        _assert_sync_free(recorder)
        assert (out.frame_kind == 2).all()  # frame 4, the last recorded call, ran as a keyframe
        n = out.active_mask.shape[1]
        assert (out.active_mask.sum(dim=1) == n).all()  # dense, nothing cut
        nf.sync_errors()
        assert nf.overflowed_frames == 0


def test_data_dependent_keyframes_under_auto_capacity_read_their_count(triton_path, monkeypatch):
    """``keyframe_drift`` (like a scene cut) makes keyframes data-dependent: the host cannot know
    them, so ``capacity="auto"`` reads the count (documented sync) instead of cutting one. The
    measured preset has it, so its steady state reads once per call."""
    preset = {"keyframe_every": FROM_PRESET, "keyframe_drift": FROM_PRESET}
    for options in ({"keyframe_every": 4, "keyframe_drift": 0.5}, preset):
        recorder, _, nf = _steady_state_syncs(monkeypatch, "siglip", "KV", **options)
        assert any(c.startswith("Tensor.tolist at engine/architectures.py") for c in recorder.calls), recorder.calls
        assert nf.overflowed_frames == 0
    measured = PRESETS["measured"]
    assert (nf.keyframe_drift, nf.keyframe_every) == (measured["keyframe_drift"], measured["keyframe_every"])


def test_the_host_schedule_follows_the_device_and_relearns_after_a_load(triton_path, monkeypatch):
    """The host's copy of each stream's frames-since-keyframe equals the device's ``policy_since``
    after every call (skips and staggered streams included); after a state load it reads the
    count once, then follows again without reads."""
    from helpers import stream_tensor

    model = make_model("siglip")
    nf = NeuroFlow(model, arch="KV", threshold=0.02, floor_tokens=3, keyframe_every=3, skip_below=0.05,
                   keyframe_drift=None)  # the schedule alone: drift keyframes are not the host's to know
    clip = video(9, seed=4)
    static = video(1, seed=5).expand(9, -1, -1, -1)

    def call(t, ids):
        frames = torch.stack([static[t], clip[t]])[: len(ids)]
        out = nf(frames, stream_ids=ids)
        for i in ids:
            assert nf._keyframes._since[i] == int(stream_tensor(nf, i, "policy_since")[0]), (t, i)
        return out

    kinds = set()
    with torch.inference_mode():
        for t in range(5):
            kinds |= set(call(t, ["s", "b"] if t != 1 else ["s"]).frame_kind.tolist())  # "b" a frame behind
        assert {0, 2} <= kinds  # skips and keyframes both seen
        nf.load_stream_state_dict(nf.stream_state_dict())
        recorder = SyncRecorder().install(monkeypatch)
        try:
            call(5, ["s", "b"])
            reads = [c for c in recorder.calls if "engine/keyframes.py" in c]
            call(6, ["s", "b"])
            again = [c for c in recorder.calls if "engine/keyframes.py" in c]
        finally:
            recorder.uninstall()
    assert len(reads) == 1 and again == reads, recorder.calls


def test_the_recorder_catches_the_eager_finiteness_check(triton_path, monkeypatch):
    """The eager finiteness check (a device read per call) is seen too; the default defers it on
    a GPU only, so here it is forced."""
    calls = _steady_state_syncs(monkeypatch, "siglip", "B", check_finite="eager")[0].calls
    assert any("engine/validation.py" in c for c in calls), calls


# -- the recorder itself: one tiny function per construct, in this file (watched like the package) --

class _NotAnEvent:
    """Stands in for a CUDA event or stream without a GPU (``torch.cuda.Event()`` needs CUDA):
    the recorder sees the call before the real method rejects it."""


def _cuda_wait(cls):
    def wait():
        target = cls() if torch.cuda.is_available() else _NotAnEvent()
        try:
            cls.synchronize(target)
        except (TypeError, RuntimeError, AttributeError):
            assert not torch.cuda.is_available()
    return wait


def _x():
    return torch.arange(6, dtype=torch.float32)


CONSTRUCTS = {
    "Tensor.cpu": (lambda: _x().cpu(), "Tensor.cpu"),
    "Tensor.to('cpu')": (lambda: _x().to("cpu"), "Tensor.to(cpu)"),
    "Tensor.to(torch.device)": (lambda: _x().to(torch.device("cpu"), torch.float16), "Tensor.to(cpu)"),
    "Tensor.to(device=)": (lambda: _x().to(device="cpu", non_blocking=True), "Tensor.to(cpu)"),
    "Tensor.to(cpu tensor)": (lambda: _x().to(torch.zeros(1)), "Tensor.to(cpu)"),
    "Tensor.copy_": (lambda: torch.empty(6).copy_(_x()), "Tensor.copy_ into a CPU tensor"),
    "torch.masked_select": (lambda: torch.masked_select(_x(), _x() > 2), "torch.masked_select"),
    "Tensor.masked_select": (lambda: _x().masked_select(_x() > 2), "Tensor.masked_select"),
    "Tensor.repeat_interleave(counts)": (lambda: _x().repeat_interleave(torch.ones(6, dtype=torch.int64)),
                                         "Tensor.repeat_interleave without output_size"),
    "torch.repeat_interleave(x, counts)": (
        lambda: torch.repeat_interleave(_x(), torch.ones(6, dtype=torch.int64), dim=0),
        "torch.repeat_interleave without output_size"),
    "torch.repeat_interleave(counts)": (lambda: torch.repeat_interleave(torch.ones(3, dtype=torch.int64)),
                                        "torch.repeat_interleave without output_size"),
    "torch.Event.synchronize": (lambda: torch.Event(device="cpu").synchronize(), "Event.synchronize"),
    "torch.Stream.synchronize": (lambda: torch.Stream(device="cpu").synchronize(), "Stream.synchronize"),
    "torch.cuda.Event.synchronize": (_cuda_wait(torch.cuda.Event), "torch.cuda.Event.synchronize"),
    "torch.cuda.Stream.synchronize": (_cuda_wait(torch.cuda.Stream), "torch.cuda.Stream.synchronize"),
    "torch.cuda.synchronize": (lambda: torch.cuda.synchronize() if torch.cuda.is_available() else
                               _swallow(torch.cuda.synchronize), "torch.cuda.synchronize"),
    "Tensor.item": (lambda: _x()[0].item(), "Tensor.item"),
    "bool mask": (lambda: _x()[_x() > 2], "bool-mask Tensor.__getitem__"),
}


def _swallow(fn):
    try:
        fn()
    except (RuntimeError, AssertionError, AttributeError):
        pass


def _recorded(monkeypatch, fn) -> SyncRecorder:
    recorder = SyncRecorder(roots=(__file__,), excluded=())
    recorder.install(monkeypatch)
    try:
        fn()
    finally:
        recorder.uninstall()
        monkeypatch.undo()
    return recorder


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_the_recorder_catches_each_construct(monkeypatch, name):
    fn, what = CONSTRUCTS[name]
    calls = _recorded(monkeypatch, fn).calls
    assert [c for c in calls if c.startswith(f"{what} at test_sync_free.py:")], calls


def test_the_recorder_lets_device_side_work_pass(monkeypatch):
    """What never reads the device on the host is not recorded: dtype conversions, repeats
    counted on the host or given their output size, plain indexing."""
    def work():
        x = _x()
        x.to(torch.float16)
        x.to(dtype=torch.int64)
        x.repeat_interleave(2)
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.int64), output_size=6)
        x[torch.tensor([0, 2])]
        x[1:3]
    assert _recorded(monkeypatch, work).calls == []


def test_the_recorder_ignores_other_files(monkeypatch):
    """Only the watched files' own calls count (the package's, in the steady-state tests)."""
    recorder = SyncRecorder()  # watches neuroflow/, not this file
    recorder.install(monkeypatch)
    try:
        _x().cpu()
        torch.masked_select(_x(), _x() > 2)
    finally:
        recorder.uninstall()
        monkeypatch.undo()
    assert recorder.calls == [] and recorder.by_design == []


def test_host_count_wait_is_seen_and_by_design(monkeypatch):
    """``HostCount.wait`` with an event (as on CUDA) is intercepted, at engine/capacity.py, and filed as
    the by-design wait, not as a sync of the step."""
    _host_counts_with_events(monkeypatch)
    count = capacity.HostCount(torch.tensor([3, 0]))
    recorder = SyncRecorder()
    recorder.install(monkeypatch)
    try:
        count.wait()
        assert count.values() == [3, 0]
    finally:
        recorder.uninstall()
        monkeypatch.undo()
    assert recorder.calls == []
    assert len(recorder.by_design) == 1 and recorder.by_design[0].startswith("Event.synchronize at engine/capacity.py:")


def test_the_host_schedule_forgets_streams_the_engine_dropped():
    """Under camera churn the host copy stays bounded by the streams the engine holds."""
    from neuroflow.engine.keyframes import KeyframeSchedule

    schedule, known = KeyframeSchedule(), set()
    for i in range(1000):
        known = {i}  # the engine keeps one stream: every earlier one was evicted
        schedule.commit([i], [True], known)
    assert len(schedule._since) <= 2 * len(known) + 64 + 1
    schedule.commit([999], [False], known)
    assert schedule._since[999] == 1
