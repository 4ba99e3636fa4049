from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#") and not line.startswith(("pytest", "hypothesis", "playwright"))
]

setup(
    name="vllm2",
    version="0.1.0",
    description="VisionLLM v2's super link: one multimodal LLM that chats and routes to task decoders",
    packages=find_packages(include=["vllm2*", "superlink*", "decoders*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    entry_points={"console_scripts": ["vllm2 = vllm2.cli:main"]},
)
