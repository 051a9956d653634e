from setuptools import find_packages, setup

setup(
    name="vjepa-engine",
    version="0.1.0",
    description="Fast V-JEPA pretraining and frozen evaluation: packed token sets, Triton kernels, DeepSpeed ZeRO",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "models", "models.*", "kernels", "kernels.*"]),
    # torch is installed first and pinned by the Makefile (the CPU wheel here; the GPU image brings its own):
    # an unpinned torch resolved by pip would pull gigabytes of CUDA wheels.
    install_requires=["torch>=2.4", "numpy<2.4", "av>=12"],
    extras_require={
        # triton 3.6.0 is what the GPU machine has; under TRITON_INTERPRET it needs numpy<2.4 (see DESIGN.md)
        "test": ["pytest>=8", "triton==3.6.0"],
        "bench": ["pytest-benchmark>=4"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "dali": ["nvidia-dali-cuda130"],
    },
)
