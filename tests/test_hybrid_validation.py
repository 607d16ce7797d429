"""hybrid_attention and attention_mass: bad input raises before any kernel runs, naming the argument, the expected and
the actual value."""
import numpy as np
import pytest
import torch

import hybridrag as hr
from hybridrag.ops import hybrid as hybrid_module
from hybridrag.ops import packed as packed_module

HAS_CUDA = torch.cuda.is_available()
# every way the ops reach a kernel: the custom op, the backend table (attention_mass, packed sequences), references
KERNELS = ((hybrid_module, "hybrid_attention_fwd"), (hybrid_module, "backend_functions"),
           (hybrid_module, "hybrid_attention_reference"), (hybrid_module, "attention_mass_reference"),
           (packed_module, "packed_hybrid_attention_fwd"), (packed_module, "hybrid_attention_reference"))


@pytest.fixture(autouse=True)
def no_kernels(monkeypatch):
    """Every kernel entry point of the ops module fails the test if it is reached: the checks must come first."""
    def reached(*args, **kwargs):
        raise AssertionError("a kernel ran before the bad input was refused")
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, reached)


def inputs(batch=2, heads=4, kv_heads=2, tq=8, tk=8, dim=32, dtype=torch.float32):
    q = torch.randn(batch, heads, tq, dim, dtype=dtype)
    k, v = torch.randn(batch, kv_heads, tk, dim, dtype=dtype), torch.randn(batch, kv_heads, tk, dim, dtype=dtype)
    return q, k, v


def memory(batch=1, kv_heads=2, tokens=3, dim=32, dtype=torch.float32):
    return torch.randn(batch, kv_heads, tokens, dim, dtype=dtype)


def hybrid(backend="cpu", dtype=torch.float32, **kwargs):
    return hr.hybrid_attention(*inputs(dtype=dtype), 4, backend=backend, **kwargs)


def mass(backend="cpu", dtype=torch.float32, segments=None, num_segments=3, **kwargs):
    q, k, _ = inputs(dtype=dtype)
    segments = torch.zeros(2, 8, dtype=torch.long) if segments is None else segments
    return hr.attention_mass(q, k, segments, num_segments, 4, backend=backend, **kwargs)


def test_the_guard_sees_kernels():
    """Without bad input the call reaches a kernel, and the fixture notices."""
    with pytest.raises(AssertionError, match="a kernel ran"):
        hybrid(landmarks=2)
    with pytest.raises(AssertionError, match="a kernel ran"):
        mass(landmarks=2)
    with pytest.raises(AssertionError, match="a kernel ran"):
        hybrid(backend="reference")
    if not HAS_CUDA:  # CPU tensors reach the Triton kernels only under the interpreter
        with pytest.raises(AssertionError, match="a kernel ran"):
            hybrid(backend="triton")


LANDMARK_CASES = [
    (0, ValueError, r"a landmark stride must be >= 1, got 0"),
    (-4, ValueError, r"a landmark stride must be >= 1, got -4"),
    (torch.tensor([0.0, 4.0]), TypeError, r"landmarks must be a 1-D integer tensor, got dtype torch.float32 and "
                                          r"shape \(2,\)"),
    (torch.tensor([True, False]), TypeError, r"landmarks must be a 1-D integer tensor, got dtype torch.bool"),
    (torch.tensor([[0, 4]]), TypeError, r"landmarks must be a 1-D integer tensor, got dtype torch.int64 and shape "
                                        r"\(1, 2\)"),
    (torch.tensor(3), TypeError, r"landmarks must be a 1-D integer tensor, got dtype torch.int64 and shape \(\)"),
    (torch.tensor([4, 0, 6]), ValueError, r"landmark positions must be strictly increasing \(sorted, no repeats\)"),
    (torch.tensor([0, 4, 4]), ValueError, r"landmark positions must be strictly increasing \(sorted, no repeats\)"),
    (torch.tensor([0, 8]), ValueError, r"landmark positions must lie in \[0, 8\) \(Tk = 8\), got 0 \.\. 8"),
    (torch.tensor([-1, 3]), ValueError, r"landmark positions must lie in \[0, 8\) \(Tk = 8\), got -1 \.\. 3"),
    (2.0, TypeError, r"landmarks must be None, an int stride or a 1-D integer tensor of positions, got float"),
    (True, TypeError, r"landmarks must be None, an int stride .*, got bool"),
    ([0, 4], TypeError, r"landmarks must be None, an int stride .*, got list"),
]


@pytest.mark.parametrize("op", [hybrid, mass], ids=["hybrid_attention", "attention_mass"])
@pytest.mark.parametrize("landmarks, error, match", LANDMARK_CASES)
def test_bad_landmarks(op, landmarks, error, match):
    with pytest.raises(error, match=match):
        op(landmarks=landmarks)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
@pytest.mark.parametrize("op", [hybrid, mass], ids=["hybrid_attention", "attention_mass"])
def test_landmarks_on_another_device(op):
    with pytest.raises(ValueError, match=r"landmarks are on cuda:0 but the keys are on cpu"):
        op(landmarks=torch.tensor([0, 4], device="cuda"))


def test_memory_tokens_come_in_pairs():
    with pytest.raises(ValueError, match=r"pass memory_k and memory_v together \(or neither\), got only memory_k"):
        hybrid(memory_k=memory())
    with pytest.raises(ValueError, match=r"pass memory_k and memory_v together \(or neither\), got only memory_v"):
        hybrid(memory_v=memory())


SHAPE_MESSAGE = r"must have shape \(1 or 2, 2, M >= 1, 32\) \(batch, kv heads, tokens, head_dim\), got "


@pytest.mark.parametrize("bad, shape", [
    (memory(batch=3), r"\(3, 2, 3, 32\)"),
    (memory(kv_heads=4), r"\(1, 4, 3, 32\)"),
    (memory(dim=16), r"\(1, 2, 3, 16\)"),
    (memory(tokens=0), r"\(1, 2, 0, 32\)"),
    (memory()[0], r"\(2, 3, 32\)"),
])
def test_bad_memory_shapes(bad, shape):
    with pytest.raises(ValueError, match=r"memory_k " + SHAPE_MESSAGE + shape):
        hybrid(memory_k=bad, memory_v=memory())
    with pytest.raises(ValueError, match=r"memory_v " + SHAPE_MESSAGE + shape):
        hybrid(memory_k=memory(), memory_v=bad)
    with pytest.raises(ValueError, match=r"memory_k " + SHAPE_MESSAGE + shape):
        mass(memory_k=bad)


def test_memory_k_and_v_shapes_differ():
    with pytest.raises(ValueError, match=r"memory_k and memory_v must have one shape, got \(1, 2, 3, 32\) and "
                                         r"\(2, 2, 5, 32\)"):
        hybrid(memory_k=memory(), memory_v=memory(batch=2, tokens=5))


def test_bad_memory_dtype_and_type():
    with pytest.raises(TypeError, match=r"memory_k has dtype torch.float16 but k has torch.float32; pass one dtype"):
        hybrid(memory_k=memory(dtype=torch.float16), memory_v=memory())
    with pytest.raises(TypeError, match=r"memory_v has dtype torch.bfloat16 but k has torch.float32"):
        hybrid(memory_k=memory(), memory_v=memory(dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"memory_k has dtype torch.float16 but k has torch.float32"):
        mass(memory_k=memory(dtype=torch.float16))
    with pytest.raises(TypeError, match=r"memory_k must be a torch.Tensor, got ndarray"):
        hybrid(memory_k=memory().numpy(), memory_v=memory())


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_memory_on_another_device():
    with pytest.raises(ValueError, match=r"memory_k is on cuda:0 but k is on cpu"):
        hybrid(memory_k=memory().cuda(), memory_v=memory())


@pytest.mark.parametrize("op", [hybrid, mass], ids=["hybrid_attention", "attention_mass"])
@pytest.mark.parametrize("kv_start, error, match", [
    (torch.tensor([0]), ValueError, r"kv_start must have shape \(2,\) \(one start per batch row\), got \(1,\)"),
    (torch.tensor([[0, 1]]), ValueError, r"kv_start must have shape \(2,\) .*, got \(1, 2\)"),
    (torch.tensor([0.0, 1.0]), TypeError, r"kv_start must be an integer tensor, got dtype torch.float32"),
    (torch.tensor([True, False]), TypeError, r"kv_start must be an integer tensor, got dtype torch.bool"),
    ([0, 1], TypeError, r"kv_start must be a torch.Tensor, got list"),
])
def test_bad_kv_start(op, kv_start, error, match):
    with pytest.raises(error, match=match):
        op(kv_start=kv_start)


@pytest.mark.parametrize("op", [hybrid, mass], ids=["hybrid_attention", "attention_mass"])
@pytest.mark.parametrize("name, value, match", [
    ("global_queries", 1, r"global_queries must be a bool, got int"),
    ("global_queries", None, r"global_queries must be a bool, got NoneType"),
    ("causal", "yes", r"causal must be a bool, got str"),
    ("causal", 0, r"causal must be a bool, got int"),
])
def test_flags_must_be_bool(op, name, value, match):
    with pytest.raises(TypeError, match=match):
        op(**{name: value})


@pytest.mark.parametrize("segments, error, match", [
    (torch.zeros(2, 9, dtype=torch.long), ValueError, r"segments must have shape \(2, 8\) \(batch, Tk\), got \(2, 9\)"),
    (torch.zeros(8, dtype=torch.long), ValueError, r"segments must have shape \(2, 8\) \(batch, Tk\), got \(8,\)"),
    (torch.zeros(1, 8, dtype=torch.long), ValueError, r"segments must have shape \(2, 8\) .*, got \(1, 8\)"),
    (torch.zeros(2, 8), TypeError, r"segments must be an integer tensor, got dtype torch.float32"),
    (torch.zeros(2, 8, dtype=torch.bool), TypeError, r"segments must be an integer tensor, got dtype torch.bool"),
    (torch.full((2, 8), -2), ValueError, r"segments must hold ids in \[-1, 3\) \(-1 = no segment\), got -2 \.\. -2"),
    (torch.tensor([[0, 1, 2, 3, 0, 0, 0, 0]] * 2), ValueError, r"segments must hold ids in \[-1, 3\) .*, got 0 \.\. 3"),
    (np.zeros((2, 8), dtype=np.int64), TypeError, r"segments must be a torch.Tensor, got ndarray"),
])
def test_bad_segments(segments, error, match):
    with pytest.raises(error, match=match):
        mass(segments=segments)


@pytest.mark.parametrize("num_segments, error, match", [
    (0, ValueError, r"num_segments must be >= 1, got 0"),
    (-3, ValueError, r"num_segments must be >= 1, got -3"),
    (3.0, TypeError, r"num_segments must be an int, got float"),
    (True, TypeError, r"num_segments must be an int, got bool"),
    (torch.tensor(3), TypeError, r"num_segments must be an int, got Tensor"),
])
def test_bad_num_segments(num_segments, error, match):
    with pytest.raises(error, match=match):
        mass(num_segments=num_segments)


@pytest.mark.parametrize("query_mask, error, match", [
    (torch.ones(2, 8), TypeError, r"query_mask must be a bool tensor, got dtype torch.float32"),
    (torch.ones(2, 8, dtype=torch.long), TypeError, r"query_mask must be a bool tensor, got dtype torch.int64"),
    (torch.ones(2, 9, dtype=torch.bool), ValueError, r"query_mask must have shape \(2, 8\) .*, got \(2, 9\)"),
    (torch.ones(8, dtype=torch.bool), ValueError, r"query_mask must have shape \(2, 8\) \(batch, Tq\), got \(8,\)"),
    ([True] * 8, TypeError, r"query_mask must be a torch.Tensor, got list"),
])
def test_bad_query_mask(query_mask, error, match):
    with pytest.raises(error, match=match):
        mass(query_mask=query_mask)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_segments_and_query_mask_on_another_device():
    with pytest.raises(ValueError, match=r"segments is on cuda:0 but k is on cpu"):
        mass(segments=torch.zeros(2, 8, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match=r"query_mask is on cuda:0 but q is on cpu"):
        mass(query_mask=torch.ones(2, 8, dtype=torch.bool, device="cuda"))


@pytest.mark.parametrize("op", [hybrid, mass], ids=["hybrid_attention", "attention_mass"])
def test_shared_attention_checks(op):
    """The checks of sliding_window_attention apply too: window, scale, dtype, backend."""
    with pytest.raises(ValueError, match=r"an int window \(4\) .*needs causal=True"):
        op(causal=False)
    with pytest.raises(ValueError, match=r"scale must be positive and finite, got -1.0"):
        op(scale=-1.0)
    with pytest.raises(TypeError, match=r"q must have dtype in \(float16, bfloat16, float32\), got torch.float64"):
        op(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'gpu'"):
        op(backend="gpu")


def test_mass_keys_must_match_queries():
    q, _, _ = inputs()
    k = torch.randn(2, 3, 8, 32)
    with pytest.raises(ValueError, match=r"k has 3 heads, which does not divide q's 4 heads"):
        hr.attention_mass(q, k, torch.zeros(2, 8, dtype=torch.long), 1, 4, backend="cpu")


@pytest.mark.parametrize("op", [hybrid, mass], ids=["hybrid_attention", "attention_mass"])
def test_bfloat16_under_the_interpreter_is_an_error(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match=r"Triton interpreter cannot run bfloat16 dots"):
        op(backend="triton", dtype=torch.bfloat16)


@pytest.mark.parametrize("op", [hybrid, mass], ids=["hybrid_attention", "attention_mass"])
def test_triton_on_cpu_tensors_without_interpreter_is_an_error(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors, got tensors on cpu"):
        op(backend="triton")
