from setuptools import find_packages, setup

# Lowest versions tested against (see README); torch is capped by the build machines at 2.14.1.
install_requires = [
    "torch>=2.11",
    "torchvision>=0.26",  # differentiable resize and crop of the rewards, image grids
    "diffusers>=0.42.1",
    "transformers>=5.0",
    "peft>=0.17",
    "accelerate>=1.10",
    "safetensors>=0.6",
    "open_clip_torch>=3.0",
    "triton>=3.6; platform_system == 'Linux'",
    "numpy",
    "Pillow>=10.1",  # ImageFont.load_default(size=...) for the labels of evaluate's grid
    "tqdm",
    "PyYAML",  # YAML config files of `diffusers-srpo train`
    "matplotlib",  # the demo's reward-curve plot
]

extras_require = {
    # accelerate's tensorboard tracker (log_with: tensorboard); the tests read its event files back.
    "tensorboard": ["tensorboard>=2.14"],
    # A quantized frozen transformer (--quantize nf4 | int8 | float8) and 8-bit AdamW: the one-24-GB-GPU recipe.
    "quantization": ["bitsandbytes>=0.45", "torchao>=0.11"],
    "test": ["pytest>=8", "ruff>=0.6", "sentencepiece", "tensorboard>=2.14", "bitsandbytes>=0.45", "torchao>=0.11"],
    # Memory-efficient attention; its kernels are CUDA-only.
    "xformers": ["xformers"],
}

setup(
    name="diffusers-srpo",
    version="0.1.0.dev0",
    description="Direct-Align + SRPO and TailorPO preference alignment for diffusers flow models (FLUX.1-dev)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repository but is installed as diffusers_srpo.kernels:
    # a top-level `kernels` module would shadow Hugging Face's `kernels` library.
    packages=find_packages(include=["diffusers_srpo", "diffusers_srpo.*"]) + ["diffusers_srpo.kernels"],
    package_dir={"diffusers_srpo": "diffusers_srpo", "diffusers_srpo.kernels": "kernels"},
    # The toy world's trained weights (fp16 safetensors, configs and tokenizer files) ship with the package.
    package_data={"diffusers_srpo": ["toyworld/weights/**/*"]},
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["diffusers-srpo=diffusers_srpo.cli:main"]},
)
