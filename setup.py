from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="semask",
    version="0.1.0",
    description="SeMask (Semantically Masked Transformers for Semantic Segmentation) for Hugging Face Transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["semask", "semask.*"]),
    # the local `evaluate` metric modules (`semask.metrics.EVALUATE_MEAN_IOU`): scripts evaluate copies, not a package
    package_data={"semask": ["evaluate_metrics/*/*.py"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "transformers>=5.23,<5.24",
        "huggingface_hub>=2.4,<3",
        "safetensors",
        "numpy",
        "pillow",
        "opencv-python-headless",
        "tqdm",
    ],
    extras_require={
        "train": ["accelerate>=1.10", "datasets>=4", "matplotlib", "scipy", "evaluate>=0.4"],
        "export": ["onnx>=1.18", "onnxruntime>=1.22", "onnxscript>=0.6"],
        "dev": [
            "pytest",
            "ruff",
            "hypothesis>=6",
            "evaluate>=0.4",
            "accelerate>=1.10",
            "datasets>=4",
            "matplotlib",
            "scipy",
            "onnx>=1.18",
            "onnxruntime>=1.22",
            "onnxscript>=0.6",
        ],
    },
    entry_points={
        "console_scripts": ["semask-convert=semask.conversion:main", "semask-segment=semask.cli:main"],
    },
)
