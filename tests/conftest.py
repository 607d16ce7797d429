"""Test set-up. Without a GPU, Triton kernels run under the Triton interpreter, which must be switched on before
anything imports triton."""
import os
import sys

if "triton" in sys.modules:
    raise RuntimeError("triton was imported before tests/conftest.py could choose the interpreter")

import torch  # noqa: E402  (torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _share_the_cores():
    """Under pytest-xdist, each worker (and every process it starts: servers, command lines) gets its share of the
    cores as intra-op threads. Two workers of two threads each on two cores spend most of their time in each
    other's OpenMP spin-waits: a full run took 20 minutes that way, and a module that takes 22 s alone took 168 s."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_the_cores()

import hybridrag  # noqa: E402,F401  (first: it keeps the checkout's kernels/ folder from shadowing PyPI's `kernels`)

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["blockwise", "cpp"])
def cpu_kernels(request):
    """The test runs once on the PyTorch CPU path and once on the C++ kernels (hybridrag.kernels.cpp; built on the
    first use, which fails the test where they do not build); yields the choice."""
    from hybridrag.kernels import cpp
    previous = cpp.set_cpu_kernels(request.param)
    yield request.param
    cpp.set_cpu_kernels(previous)


@pytest.fixture
def backend(request):
    """For tests parametrized with indirect=["backend"]: the backend to call. "cpu-cpp" and "cpu-blockwise" run
    backend "cpu" on that CPU implementation (hybridrag.kernels.cpp); any other name is passed through."""
    name = request.param
    if not name.startswith("cpu-"):
        yield name
        return
    from hybridrag.kernels import cpp
    previous = cpp.set_cpu_kernels(name.removeprefix("cpu-"))
    yield "cpu"
    cpp.set_cpu_kernels(previous)


CPU_IMPLEMENTATIONS = ["cpu-cpp", "cpu-blockwise"]  # the backend fixture's names for the two CPU implementations


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two and immune to a busy machine's OpenMP spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama():
    """A random 2-layer Llama (4 heads, 2 kv heads, head dim 16, vocabulary 97) on attn_implementation="hybridrag"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridrag.integrations.transformers import register

    register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="hybridrag")
    return LlamaForCausalLM(config).eval()
