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
    # the Hugging Face package of that name, which transformers imports.
    packages=["neuroflow", *(f"neuroflow.{p}" for p in find_packages("neuroflow")), "neuroflow.kernels"],
    package_dir={"neuroflow": "neuroflow", "neuroflow.kernels": "kernels"},
    install_requires=["torch>=2.4", "transformers>=5.17", "numpy"],
    entry_points={"console_scripts": ["neuroflow = neuroflow.cli:main"]},
    extras_require={
        # The CLI tests run `neuroflow demo` / `neuroflow run`, so "test" carries the "video" packages;
        # tests/test_serve.py runs a local Ray, so it carries the "serve" packages too.
        "test": ["pytest>=8", "setuptools>=64", "triton>=3.6", "av>=12", "matplotlib>=3.5", "tqdm",
                 "ray[serve]>=2.50,<2.61", "pillow>=9"],
        "video": ["av>=12", "matplotlib>=3.5", "tqdm"],
        "bench": ["matplotlib"],
        # `neuroflow serve` (neuroflow.serve): Ray Serve front + shard actors; Pillow decodes PNG/JPEG.
        "serve": ["ray[serve]>=2.50,<2.61", "pillow>=9"],
    },
)
