"""mindrlhf: the Llama2 reward-model suite of a MindSpore RLHF toolkit."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements():
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip() and not line.startswith("#")]


setup(
    name="mindrlhf",
    version="0.1.0",
    description="Llama2 reward models on MindSpore/MindFormers: data conversion, training, evaluation, inference",
    packages=find_packages(include=["mindrlhf", "mindrlhf.*"]),
    package_data={"mindrlhf.kernels": ["*.cc"]},  # compiled on first use (mindrlhf/kernels/native.py)
    python_requires=">=3.9",
    install_requires=requirements(),
    # interop: benchmarks/check_hf_parity.py scores the Hugging Face export with transformers on PyTorch
    # test: aiohttp, the HTTP client OpenRLHF's reward requests use (tests/test_server.py reproduces them);
    # pytest-xdist runs the suite on several workers (make test)
    extras_require={"test": ["pytest", "pytest-xdist", "aiohttp"], "interop": ["torch", "transformers"]},
    entry_points={"console_scripts": ["mindrlhf-demo=mindrlhf.demo:main",
                                      "mindrlhf-hccl-tools=mindrlhf.tools.hccl_tools:main"]},
)
