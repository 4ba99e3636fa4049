"""vllm2's package: the code, and the repository's configs/ (presets, stage recipes, DeepSpeed and open_clip configs)
as the package data ``vllm2/configs``. Dependencies are compatible ranges; ``requirements.txt`` pins the exact versions
``make venv`` and CI install."""

from setuptools import find_packages, setup

REQUIRES = [
    "torch>=2.4",
    "torchvision>=0.19",
    "transformers>=5.0,<6",
    "tokenizers>=0.22",
    "sentencepiece>=0.2",
    "diffusers>=0.35",
    "peft>=0.17",
    "accelerate>=1.10",
    "deepspeed>=0.17",
    "open-clip-torch>=3.0",
    "timm>=1.0",
    "pycocotools>=2.0.8",
    "safetensors>=0.5",
    "scipy>=1.13",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "pillow>=10.0",
    "gradio>=5.0",
    "tensorboard>=2.17",
    "fastapi>=0.110",
    "uvicorn>=0.30",
    "python-multipart>=0.0.9",
]

setup(
    name="vllm2",
    version="0.1.0",
    description="VisionLLM v2's super link: one multimodal LLM that chats and routes to task decoders",
    packages=[*find_packages(include=["vllm2*", "superlink*", "decoders*"]), "vllm2.configs"],
    package_dir={"vllm2.configs": "configs"},
    package_data={"vllm2.configs": ["*.yaml", "*/*.yaml", "*/*.json"]},
    python_requires=">=3.10",
    install_requires=REQUIRES,
    entry_points={"console_scripts": ["vllm2 = vllm2.cli:main"]},
)
