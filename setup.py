from setuptools import find_packages, setup

setup(
    name="vjepa-engine",
    version="0.1.0",
    description="Fast V-JEPA pretraining and frozen evaluation: packed token sets, Triton kernels, DeepSpeed ZeRO",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "models", "models.*", "kernels", "kernels.*"]),
    package_data={"models": ["attention_table.json"]},  # auto's measured attention backend per GPU kind
    # torch is installed first and pinned by the Makefile (the CPU wheel here; the GPU image brings its own):
    # an unpinned torch resolved by pip would pull gigabytes of CUDA wheels.
    # triton: the fused kernels (models import them; the CPU path runs their PyTorch references). Linux only: it has
    # no wheels elsewhere, and torch's CUDA wheels already bring a matching one. 3.6 under TRITON_INTERPRET needs
    # numpy<2.4 (see DESIGN.md).
    # av>=17: to_ndarray(threads=...) (engine/data/decode.py pins swscale to one thread)
    install_requires=["torch>=2.4", "numpy<2.4", "av>=17", "triton>=3.6; platform_system == 'Linux'",
                      "matplotlib>=3.8"],  # engine.plot; its Pillow writes engine.visualize's GIFs
    extras_require={
        # the tests pin triton to what the GPU machine has, so the interpreter and the sm_90 check see its compiler
        "test": ["pytest>=8", "triton==3.6.0"],
        "bench": ["pytest-benchmark>=4"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "dali": ["nvidia-dali-cuda130"],
    },
)
