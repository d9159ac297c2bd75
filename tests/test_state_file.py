"""State files: format version, fingerprint checks and clear errors for every bad file."""

import pickle
import zipfile

import pytest
import torch

from conftest import make_model
from neuroflow.models.families import VisionAdapter
from neuroflow.engine.state_file import (
    FORMAT,
    FORMAT_VERSION,
    StateFileError,
    fingerprint_differences,
    load_state_file,
    model_fingerprint,
    save_state_file,
    weights_digest,
)

FINGERPRINT = {
    "model": {"family": "siglip", "hidden_size": 32, "layers": 2, "patch_size": 8, "weights": "0123456789abcdef"},
    "settings": {"arch": "C", "cls_readout": "context", "cache_dtype": None, "head_cache": True},
}


def state():
    return {"ids": ["cam-1", 7, ("a", 1)], "ema": torch.randn(3, 4, 32), "grid": (4, 4),
            "nested": {"kv": [torch.zeros(2, 3, dtype=torch.float16)], "count": 3}}


def other(**changes):
    fp = {"model": dict(FINGERPRINT["model"]), "settings": dict(FINGERPRINT["settings"])}
    for key, value in changes.items():
        part, field = key.split("__")
        fp[part][field] = value
    return fp


def test_round_trip_returns_the_state_exactly(tmp_path):
    s = state()
    path = save_state_file(tmp_path / "streams.pt", s, FINGERPRINT)
    back = load_state_file(path, FINGERPRINT)
    assert back["ids"] == ["cam-1", 7, ("a", 1)] and back["grid"] == (4, 4) and back["nested"]["count"] == 3
    assert torch.equal(back["ema"], s["ema"]) and back["ema"].dtype == torch.float32
    assert back["nested"]["kv"][0].dtype == torch.float16
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == FORMAT_VERSION and raw["fingerprint"] == FINGERPRINT
    assert not [p for p in tmp_path.iterdir() if p.name != "streams.pt"], "temporary file left behind"


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "s.pt"
    save_state_file(path, {"x": torch.ones(1)}, FINGERPRINT)
    save_state_file(path, {"x": torch.zeros(1)}, FINGERPRINT)
    assert load_state_file(path, FINGERPRINT)["x"].item() == 0


@pytest.mark.parametrize("name, content", [
    ("empty", b""),
    ("text", b"hello, this is not a torch file\n"),
    ("random bytes", bytes(range(256)) * 8),
    ("pickle of a list", pickle.dumps([1, 2, 3], protocol=2)),
], ids=["empty", "text", "random-bytes", "pickled-list"])
def test_unreadable_files_raise_state_file_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / f"{name.replace(' ', '_')}.pt"
    path.write_bytes(content)
    with pytest.raises(StateFileError) as err:
        load_state_file(path, FINGERPRINT)
    assert str(path) in str(err.value) and ("cannot be read" in str(err.value) or "not a NeuroFlow" in str(err.value))
    assert isinstance(err.value, ValueError)


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    path = save_state_file(tmp_path / "s.pt", state(), FINGERPRINT)
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 30, 10):
        cut = tmp_path / f"cut{keep}.pt"
        cut.write_bytes(data[:keep])
        with pytest.raises(StateFileError, match=r"cannot be read: corrupt, truncated") as err:
            load_state_file(cut, FINGERPRINT)
        assert str(cut) in str(err.value)


def test_damaged_zip_member_is_reported_as_corrupt(tmp_path):
    path = save_state_file(tmp_path / "s.pt", state(), FINGERPRINT)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl][: len(members[pkl]) // 2]
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_STORED) as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(StateFileError, match="cannot be read"):
        load_state_file(bad, FINGERPRINT)


def test_code_in_a_file_is_refused_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": FINGERPRINT, "state": {"x": Evil()}}, path)
    with pytest.raises(StateFileError, match="cannot be read"):
        load_state_file(path, FINGERPRINT)


def test_other_torch_files_are_not_state_files(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(StateFileError, match="not a NeuroFlow stream-state file") as err:
        load_state_file(path, FINGERPRINT)
    assert str(path) in str(err.value)
    torch.save(torch.zeros(3), path)
    with pytest.raises(StateFileError, match="not a NeuroFlow stream-state file"):
        load_state_file(path, FINGERPRINT)


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, "1", None])
def test_another_format_version_is_refused(tmp_path, version):
    path = tmp_path / "s.pt"
    torch.save({"format": FORMAT, "version": version, "fingerprint": FINGERPRINT, "state": {}}, path)
    expected = rf"format version {version!r}; this NeuroFlow reads version {FORMAT_VERSION}"
    with pytest.raises(StateFileError, match=expected):
        load_state_file(path, FINGERPRINT)


def test_damaged_payload_is_refused(tmp_path):
    path = tmp_path / "s.pt"
    torch.save({"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": FINGERPRINT, "state": [1]}, path)
    with pytest.raises(StateFileError, match="damaged"):
        load_state_file(path, FINGERPRINT)


def test_another_model_names_every_differing_field(tmp_path):
    path = save_state_file(tmp_path / "s.pt", state(), FINGERPRINT)
    with pytest.raises(StateFileError) as err:
        load_state_file(path, other(model__family="clip", model__hidden_size=48))
    msg = str(err.value)
    assert str(path) in msg and "made by another model" in msg
    assert "model.family: 'siglip' in the file, 'clip' here" in msg
    assert "model.hidden_size: 32 in the file, 48 here" in msg and "patch_size" not in msg
    with pytest.raises(StateFileError, match=r"another model: model.weights: '0123456789abcdef' in the file, 'ffff"):
        load_state_file(path, other(model__weights="ffffffffffffffff"))


def test_incompatible_settings_are_named(tmp_path):
    path = save_state_file(tmp_path / "s.pt", state(), FINGERPRINT)
    with pytest.raises(StateFileError) as err:
        load_state_file(path, other(settings__arch="KV", settings__head_cache=False))
    msg = str(err.value)
    assert "saved under incompatible settings" in msg and "model." not in msg
    assert "settings.arch: 'C' in the file, 'KV' here" in msg
    assert "settings.head_cache: True in the file, False here" in msg
    with pytest.raises(StateFileError, match="another model under incompatible settings"):
        load_state_file(path, other(settings__arch="B", model__layers=3))


def test_missing_and_extra_fields_are_differences(tmp_path):
    path = save_state_file(tmp_path / "s.pt", state(), FINGERPRINT)
    fp = other()
    fp["settings"]["cache_dtype"] = "float16"
    fp["settings"]["new_setting"] = 1
    del fp["settings"]["cls_readout"]
    with pytest.raises(StateFileError) as err:
        load_state_file(path, fp)
    msg = str(err.value)
    assert "settings.new_setting: missing in the file, 1 here" in msg
    assert "settings.cls_readout: 'context' in the file, not set here" in msg
    assert "settings.cache_dtype: None in the file, 'float16' here" in msg


def test_differences_compare_types_and_sequences():
    assert fingerprint_differences({"a": 1, "b": [1, (2, 3)]}, {"a": 1, "b": ((1), [2, 3])}) == []
    assert fingerprint_differences({"a": 1}, {"a": True}) == ["a: 1 in the file, True here"]
    assert fingerprint_differences({"a": 1}, {"a": 1.0}) == ["a: 1 in the file, 1.0 here"]
    assert fingerprint_differences({"a": [1, 2]}, {"a": [1, 2, 3]}) == ["a: [1, 2] in the file, [1, 2, 3] here"]


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_file(tmp_path / "nope.pt", FINGERPRINT)
    with pytest.raises(StateFileError, match="is a folder"):
        load_state_file(tmp_path, FINGERPRINT)


def test_save_refuses_what_cannot_be_read_back(tmp_path):
    with pytest.raises(TypeError, match=r"fingerprint field fingerprint.settings.cache_dtype is a dtype"):
        save_state_file(tmp_path / "s.pt", {}, {"settings": {"cache_dtype": torch.float16}})
    with pytest.raises(TypeError, match="state must be a dict"):
        save_state_file(tmp_path / "s.pt", [torch.zeros(1)], FINGERPRINT)
    with pytest.raises(TypeError, match="must be a str"):
        save_state_file(tmp_path / "s.pt", {}, {1: "x"})
    assert not list(tmp_path.iterdir())


def test_model_fingerprint_tells_models_apart_and_ignores_dtype_and_copies():
    a = make_model("siglip")
    fp = model_fingerprint(VisionAdapter(a))
    assert fp["family"] == "siglip" and fp["layers"] == len(VisionAdapter(a).layers) and len(fp["weights"]) == 16
    assert set(fp) == {"family", "hidden_size", "layers", "patch_size", "weights"}
    import copy

    b = copy.deepcopy(a)
    assert model_fingerprint(VisionAdapter(b)) == fp
    assert weights_digest(copy.deepcopy(a).to(torch.bfloat16)) == fp["weights"]
    with torch.no_grad():
        next(b.parameters()).add_(0.5)
    assert weights_digest(b) != fp["weights"]
    assert weights_digest(make_model("siglip", seed=1)) != fp["weights"]  # same shapes, other weights
    assert weights_digest(make_model("siglip", layers=3)) != fp["weights"]
    assert model_fingerprint(VisionAdapter(make_model("clip")))["family"] == "clip"


def test_save_into_a_missing_folder_names_the_path_given_and_writes_nothing(tmp_path):
    target = tmp_path / "missing" / "streams.pt"
    with pytest.raises(FileNotFoundError) as err:
        save_state_file(target, state(), FINGERPRINT)
    message = str(err.value)
    assert str(target) in message and "does not exist" in message and ".tmp" not in message
    assert list(tmp_path.iterdir()) == []  # no folder created, no temporary file left
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        save_state_file(tmp_path / "a-file" / "s.pt", state(), FINGERPRINT)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_state_file(tmp_path, state(), FINGERPRINT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_engine_save_state_into_a_missing_folder(tmp_path):
    from neuroflow import NeuroFlow

    nf = NeuroFlow(make_model("siglip"))
    with torch.inference_mode():
        nf(torch.randn(1, 3, 32, 32), stream_ids=["cam"])
    target = tmp_path / "no-such-folder" / "streams.pt"
    with pytest.raises(FileNotFoundError, match=f"state file {target}: cannot be written"):
        nf.save_state(target)
    assert list(tmp_path.iterdir()) == []
    assert nf.stream_ids == ["cam"]  # saving is read-only for the engine


def test_a_save_that_fails_mid_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = save_state_file(tmp_path / "s.pt", {"x": torch.ones(1)}, FINGERPRINT)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_state_file(path, {"x": torch.zeros(1)}, FINGERPRINT)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # the temporary file is gone


def test_weights_digest_sees_a_change_in_every_tensor():
    """Each parameter and buffer in turn (the patch-embedding bias, which the gate reads,
    included): one element changed, at the end of the tensor, where no sampling would look, then
    restored. Every change gives a new digest; restoring gives the first one back."""
    model = make_model("siglip")
    base = weights_digest(model)
    state = model.state_dict()
    assert len(state) > 16  # more tensors than the digest once sampled
    seen = {base}
    for name, t in state.items():
        flat = t.view(-1)
        old = flat[-1].clone()
        with torch.no_grad():
            # A step bfloat16 keeps (its 8-bit mantissa): the digest is meant to ignore less.
            flat[-1] = old + (old.abs() + 1 if t.is_floating_point() else 1)
        changed = weights_digest(model)
        with torch.no_grad():
            flat[-1] = old
        assert changed not in seen, f"changing {name} left the digest unchanged (or equal to another change's)"
        seen.add(changed)
    assert weights_digest(model) == base
    assert "embeddings.patch_embedding.bias" in state


def test_weights_digest_sees_every_element_of_a_tensor():
    """Every element of the patch-embedding bias, in turn: a change anywhere in a tensor shows."""
    model = make_model("siglip")
    base = weights_digest(model)
    w = model.state_dict()["embeddings.patch_embedding.bias"].view(-1)
    for i in range(w.numel()):
        old = w[i].clone()
        with torch.no_grad():
            w[i] = old + old.abs() + 1
        assert weights_digest(model) != base, f"element {i} not covered"
        with torch.no_grad():
            w[i] = old
    assert weights_digest(model) == base
