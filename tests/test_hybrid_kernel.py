"""The hybrid pattern (window | landmark keys | global landmark rows | memory tokens): the Triton kernels (interpreted
on CPU, compiled on GPU) and the tiled CPU path against the float64 reference, for outputs, lse and every gradient
(q, k, v and the memory tokens), under the tolerance rule."""
import importlib
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE
from conftest import CPU_IMPLEMENTATIONS  # (a line of its own: gpu_check.sh finds the CUDA tests by the one above)
from tolerance import assert_within_tolerance, tolerance_error

import hybridrag as hr
from hybridrag.kernels.hybrid import hybrid_attention_reference, hybrid_bwd_blockwise, hybrid_fwd_blockwise
from hybridrag.kernels.patterns import hybrid_key_counts, hybrid_mask, resolve_landmarks, resolve_window

# Triton takes bfloat16 only on a GPU: the interpreter's bf16 dot multiplies bit patterns.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
BACKEND_DTYPES = [("triton", dtype) for dtype in TRITON_DTYPES]
BACKENDS = ["triton"]
if DEVICE == "cpu":  # both CPU implementations: the C++ kernels and the blockwise PyTorch path
    BACKEND_DTYPES += [(cpu, dtype) for cpu in CPU_IMPLEMENTATIONS
                       for dtype in (torch.float32, torch.float16, torch.bfloat16)]
    BACKENDS += CPU_IMPLEMENTATIONS
BACKEND_DTYPE_IDS = [f"{backend}-{str(dtype).removeprefix('torch.')}" for backend, dtype in BACKEND_DTYPES]


@dataclass(frozen=True)
class Case:
    """One hybrid-attention problem. landmarks: None, an int stride or a tuple of positions (passed as a tensor);
    memory: the number of memory tokens, with batch 1 (shared) or `batch` (memory_batch); kv_start: per-batch
    first real key (left padding) or None; hidden: the share of keys a random key_mask hides (0 = no mask), or
    "batch0" to hide every key of batch row 0."""
    tq: int
    tk: int
    dim: int
    window: object
    causal: bool = True
    batch: int = 1
    heads: int = 2
    kv_heads: int = 2
    landmarks: object = None
    global_queries: bool = True
    memory: int = 0
    memory_batch: int = 1
    kv_start: tuple = None
    hidden: object = 0.0

    def id(self):
        parts = [f"B{self.batch}H{self.heads}kv{self.kv_heads}q{self.tq}k{self.tk}D{self.dim}w{self.window}",
                 "c" if self.causal else "b"]
        if self.landmarks is not None:
            parts.append(f"-L{self.landmarks}" + ("g" if self.global_queries else ""))
        if self.memory:
            parts.append(f"-M{self.memory}x{self.memory_batch}")
        if self.kv_start is not None:
            parts.append(f"-pad{self.kv_start}")
        if self.hidden:
            parts.append(f"-hide{self.hidden}")
        return "".join(parts).replace(" ", "")

    def pattern(self, device=DEVICE):
        """Keyword arguments of hybrid_attention for this case, tensors on `device`."""
        landmarks = self.landmarks
        if isinstance(landmarks, tuple):
            landmarks = torch.tensor(landmarks, dtype=torch.long, device=device)
        kv_start = None if self.kv_start is None else torch.tensor(self.kv_start, device=device)
        return dict(landmarks=landmarks, global_queries=self.global_queries, causal=self.causal, kv_start=kv_start,
                    key_mask=self.key_mask(device))

    def key_mask(self, device=DEVICE):
        """(B, Tk) bool, the same for every call of one case, or None."""
        if not self.hidden:
            return None
        if self.hidden == "batch0":
            mask = torch.ones(self.batch, self.tk, dtype=torch.bool)
            mask[0] = False
            return mask.to(device)
        generator = torch.Generator().manual_seed(self.tq * 1000 + self.tk)
        return (torch.rand(self.batch, self.tk, generator=generator) >= self.hidden).to(device)


def make_inputs(case, dtype, device=DEVICE, non_contiguous=False):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), memory_k/v (memory_batch, Hkv, M, D) or None. non_contiguous builds
    them as transposes of (B, T, H, D) with padded head dims."""
    def tensor(batch, heads, t):
        if non_contiguous:
            padded = torch.randn(batch, t, heads, case.dim + 8, device=device, dtype=dtype)
            return padded[..., :case.dim].transpose(1, 2)
        return torch.randn(batch, heads, t, case.dim, device=device, dtype=dtype)
    q, k, v = tensor(case.batch, case.heads, case.tq), tensor(case.batch, case.kv_heads, case.tk), \
        tensor(case.batch, case.kv_heads, case.tk)
    if not case.memory:
        return q, k, v, None, None
    return q, k, v, tensor(case.memory_batch, case.kv_heads, case.memory), \
        tensor(case.memory_batch, case.kv_heads, case.memory)


def run(inputs, case, backend, grad_out, grad_lse):
    """Output, lse and the gradients of sum(o * grad_out) + sum(lse * grad_lse) (lse terms only where finite) for
    q, k, v and, when given, the memory tokens."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    q, k, v, memory_k, memory_v = leaves
    out, lse = hr.hybrid_attention(q, k, v, case.window, memory_k=memory_k, memory_v=memory_v, return_lse=True,
                                   backend=backend, **case.pattern())
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    loss = (out.float() * grad_out.float()).sum() + (finite_lse * grad_lse).sum()
    names = ["dq", "dk", "dv"] + (["dmemory_k", "dmemory_v"] if memory_k is not None else [])
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return {"o": out, "lse": lse, **dict(zip(names, grads))}


def compare(backend, case, dtype, non_contiguous=False):
    """Return the tolerance-rule failures of `backend` against the float64 reference (empty list = pass)."""
    inputs = make_inputs(case, dtype, non_contiguous=non_contiguous)
    grad_out = torch.randn(case.batch, case.heads, case.tq, case.dim, device=DEVICE, dtype=dtype)
    grad_lse = torch.randn(case.batch, case.heads, case.tq, device=DEVICE)
    as_double = [None if t is None else t.double() for t in inputs]
    truth = run(as_double, case, "reference", grad_out.double(), grad_lse.double())
    baseline = run(inputs, case, "reference", grad_out, grad_lse)
    got = run(inputs, case, backend, grad_out, grad_lse)
    assert got.keys() == truth.keys()
    for name in truth:
        if name != "lse":
            assert got[name].dtype == dtype and got[name].shape == truth[name].shape, name
    assert got["lse"].dtype == torch.float32 and got["lse"].shape == truth["lse"].shape
    errors = [tolerance_error(name, got[name], truth[name], baseline[name], dtype) for name in truth]
    return [e for e in errors if e is not None]


# Odd lengths and head dims; Tq < Tk and Tq > Tk; GQA and MQA; landmarks as a stride and as positions (the first and
# the last position, none on a query row); global rows on and off; memory tokens shared by the batch and per batch
# row; causal windows, bidirectional bands and the unbounded window; left padding that differs per batch row.
CASES = [
    # T = 1: the only query is the only key, a landmark and a global row; plus memory tokens
    Case(1, 1, 64, 1, landmarks=1, memory=3),
    # GQA, stride landmarks with global rows, batch 2
    Case(15, 15, 40, 4, batch=2, heads=4, kv_heads=2, landmarks=5),
    # MQA, bidirectional band, landmarks at the first and last positions (global rows see later keys too)
    Case(63, 63, 100, (5, 9), causal=False, heads=4, kv_heads=1, landmarks=(0, 17, 62), memory=4),
    # landmark keys without global rows, per-batch memory tokens, padding on one batch row only
    Case(63, 63, 128, 16, batch=2, kv_heads=1, landmarks=16, global_queries=False, memory=5, memory_batch=2,
         kv_start=(0, 21)),
    # long: band + landmarks + global rows + memory + padding
    Case(300, 300, 64, 64, landmarks=100, memory=8, kv_start=(37,)),
    # Tq < Tk with every landmark before the first query row: landmark keys, no global rows
    Case(113, 300, 64, 40, kv_heads=1, landmarks=(0, 50, 150)),
    # Tq < Tk: one query row, on the last position, which is a landmark (a global row)
    Case(1, 300, 100, 100, kv_heads=1, landmarks=(0, 299), memory=2),
    # Tq > Tk: rows at negative positions see nothing
    Case(63, 15, 64, 8, landmarks=4),
    # unbounded causal window with landmarks and padding
    Case(113, 113, 40, -1, batch=2, kv_heads=1, landmarks=16, kv_start=(0, 50)),
    # bidirectional, Tq < Tk: landmarks after the query are visible; padding and shared memory
    Case(63, 113, 128, (7, 3), causal=False, batch=2, landmarks=20, global_queries=False, memory=3,
         kv_start=(5, 0)),
    # bidirectional, Tq > Tk, right-unbounded band, global rows
    Case(113, 63, 64, (0, -1), causal=False, kv_heads=1, landmarks=(0, 31, 62)),
    # every key a landmark: every query row is global
    Case(15, 63, 64, 1, landmarks=1),
    # padding past the window: batch row 0's first 40 rows see nothing (its landmark at 0 is padding too)
    Case(63, 63, 40, 8, batch=2, landmarks=16, kv_start=(40, 0)),
]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS, indirect=["backend"])
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_matches_reference(case, backend, dtype):
    failures = compare(backend, case, dtype)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS, indirect=["backend"])
def test_non_contiguous_inputs(backend, dtype):
    case = Case(63, 63, 64, 24, batch=2, heads=4, kv_heads=2, landmarks=(0, 10, 50, 62), memory=3, memory_batch=2,
                kv_start=(0, 9))
    failures = compare(backend, case, dtype, non_contiguous=True)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("window, causal, tq, tk", [(16, True, 63, 63), ((4, 9), False, 40, 63), (-1, True, 63, 30)])
def test_without_landmarks_or_memory_is_sliding_window_attention(backend, window, causal, tq, tk):
    """No landmarks (None or an empty tensor) and no memory tokens: the sliding-window op, global_queries or not."""
    q, k, v = torch.randn(1, 4, tq, 64, device=DEVICE), torch.randn(1, 2, tk, 64, device=DEVICE), \
        torch.randn(1, 2, tk, 64, device=DEVICE)
    truth, truth_lse = hr.sliding_window_attention(q.double(), k.double(), v.double(), window, causal=causal,
                                                   return_lse=True, backend="reference")
    baseline, baseline_lse = hr.sliding_window_attention(q, k, v, window, causal=causal, return_lse=True,
                                                         backend="reference")
    reference, reference_lse = hr.hybrid_attention(q.double(), k.double(), v.double(), window, causal=causal,
                                                   return_lse=True, backend="reference")
    torch.testing.assert_close(reference, truth, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference_lse, truth_lse, rtol=1e-12, atol=1e-12)
    empty = torch.empty(0, dtype=torch.long, device=DEVICE)
    for landmarks, global_queries in ((None, True), (empty, False)):
        out, lse = hr.hybrid_attention(q, k, v, window, landmarks=landmarks, global_queries=global_queries,
                                       causal=causal, return_lse=True, backend=backend)
        assert_within_tolerance("o", out, truth, baseline, torch.float32)
        assert_within_tolerance("lse", lse, truth_lse, baseline_lse, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("wrong", [dict(landmarks=9), dict(global_queries=False),
                                   dict(landmarks=torch.arange(1, 63, 8, device=DEVICE))], ids=["stride", "global",
                                                                                               "shifted"])
def test_tolerance_rule_can_fail(backend, wrong):
    """The check rejects the answer for a neighbouring pattern: the landmark stride off by one, the global rows
    switched off, every landmark shifted by one position."""
    q, k, v = (torch.randn(1, 2, 63, 64, device=DEVICE) for _ in range(3))
    pattern = dict(landmarks=8, global_queries=True)
    truth = hr.hybrid_attention(q.double(), k.double(), v.double(), 4, backend="reference", **pattern)
    baseline = hr.hybrid_attention(q, k, v, 4, backend="reference", **pattern)
    right = hr.hybrid_attention(q, k, v, 4, backend=backend, **pattern)
    assert tolerance_error("o", right, truth, baseline, torch.float32) is None
    wrong_out = hr.hybrid_attention(q, k, v, 4, backend=backend, **{**pattern, **wrong})
    assert tolerance_error("o", wrong_out, truth, baseline, torch.float32) is not None


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_rows_that_see_no_key_are_zero(backend):
    """Rows at negative positions (Tq > Tk) and rows whose every visible key is padding output zeros with lse -inf;
    their gradients are zeros, never NaN. With memory tokens those rows attend to the memory tokens alone."""
    tq, tk, window = 40, 24, 4
    q = torch.randn(2, 2, tq, 64, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, 1, tk, 64, device=DEVICE, requires_grad=True) for _ in range(2))
    kv_start = torch.tensor([0, 12], device=DEVICE)  # batch row 1: keys 0..11 are padding (the landmark 0 too)
    out, lse = hr.hybrid_attention(q, k, v, window, landmarks=8, kv_start=kv_start, return_lse=True, backend=backend)
    blind = torch.zeros(2, tq, dtype=torch.bool, device=DEVICE)
    blind[:, :tq - tk] = True  # negative positions
    blind[1, :tq - tk + 12] = True  # positions < 12: window, landmark 0 and global rows 0 and 8 all hit padding
    blind = blind[:, None].expand(-1, 2, -1)
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    assert torch.isneginf(lse[blind]).all() and torch.isfinite(lse[~blind]).all()
    (out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[blind], torch.zeros_like(q.grad[blind]))

    memory_k, memory_v = torch.randn(1, 1, 3, 64, device=DEVICE), torch.randn(1, 1, 3, 64, device=DEVICE)
    out, lse = hr.hybrid_attention(q.detach(), k.detach(), v.detach(), window, landmarks=8, kv_start=kv_start,
                                   memory_k=memory_k, memory_v=memory_v, return_lse=True, backend=backend)
    assert torch.isfinite(lse).all()
    memory_scores = q.detach() @ memory_k.transpose(-1, -2) * 64 ** -0.5  # (B, H, Tq, 3)
    memory_only = torch.softmax(memory_scores, dim=-1) @ memory_v
    torch.testing.assert_close(out[blind], memory_only[blind], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[blind], torch.logsumexp(memory_scores, dim=-1)[blind], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("through", ["o", "lse"])
def test_gradient_through_one_output(backend, through):
    """A loss on o alone or on lse alone: the backward gets None for the other output's gradient."""
    case = Case(40, 48, 64, 6, batch=2, kv_heads=1, landmarks=5, memory=2, kv_start=(0, 7))
    inputs = make_inputs(case, torch.float32)

    def grads(tensors, backend):
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        out, lse = hr.hybrid_attention(*leaves[:3], case.window, memory_k=leaves[3], memory_v=leaves[4],
                                       return_lse=True, backend=backend, **case.pattern())
        loss = out.sum() if through == "o" else torch.where(torch.isinf(lse), 0.0, lse).sum()
        return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)  # lse: no dv

    truth = grads([t.double() for t in inputs], "reference")
    baseline, got = grads(inputs, "reference"), grads(inputs, backend)
    for name, g, t, b in zip(("dq", "dk", "dv", "dmemory_k", "dmemory_v"), got, truth, baseline):
        assert_within_tolerance(name, g, t, b, torch.float32)


def _triton_config_functions():
    try:
        module = importlib.import_module("hybridrag.kernels.hybrid.triton_kernels")
    except ModuleNotFoundError:
        return None
    return module if hasattr(module, "_fwd_config") and hasattr(module, "_bwd_config") else None


@pytest.mark.skipif(_triton_config_functions() is None,
                    reason="hybridrag.kernels.hybrid.triton_kernels has no _fwd_config/_bwd_config")
@pytest.mark.parametrize("fwd, bwd, case", [
    ((16, 32, 4, 1), (32, 16, 4, 1), Case(90, 110, 64, 37, kv_heads=1, landmarks=(0, 33, 64, 99, 109), memory=2)),
    ((64, 16, 4, 1), (16, 64, 4, 1), Case(80, 80, 64, (20, 33), causal=False, batch=2, kv_heads=1, landmarks=24,
                                          kv_start=(0, 17))),
], ids=["16x32", "64x16"])
def test_block_sizes_other_than_default(monkeypatch, fwd, bwd, case):
    """Unequal query and key blocks move the band, landmark and global-row tiles onto other boundaries."""
    triton_kernels = _triton_config_functions()
    monkeypatch.setattr(triton_kernels, "_fwd_config", lambda dim, dtype: fwd)
    # the dk/dv pass gets the blocks swapped: each backward kernel on tiles of its own
    dkdv = (bwd[1], bwd[0], *bwd[2:])
    monkeypatch.setattr(triton_kernels, "_bwd_config", lambda dim, dtype, kernel: bwd if kernel == "dq" else dkdv)
    failures = compare("triton", case, torch.float32)
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU path runs on CPU tensors")
@pytest.mark.parametrize("block, case", [
    (16, Case(90, 100, 32, 9, batch=2, heads=4, kv_heads=2, landmarks=3, memory=2, kv_start=(0, 13))),
    (5, Case(90, 100, 32, 9, batch=2, heads=4, kv_heads=2, landmarks=3, memory=2, kv_start=(0, 13))),
    # bidirectional: the landmarks 8 apart fall on the first key past every block's band (16 m + 32)
    (16, Case(90, 100, 32, (4, 6), causal=False, batch=2, kv_heads=1, landmarks=8, memory=2, kv_start=(0, 13))),
], ids=["causal-16", "causal-5", "bidirectional-16"])
def test_cpu_path_tiles_smaller_than_the_pattern(block, case):
    """Small CPU tiles: several global-row tiles, landmark keys just past and outside many bands, padding inside
    tiles."""
    q, k, v, memory_k, memory_v = make_inputs(case, torch.float64)
    left, right = resolve_window(case.window, case.causal)
    landmarks = resolve_landmarks(case.landmarks, case.tk)
    kv_start = torch.tensor(case.kv_start, dtype=torch.int32)
    args = (left, right, case.causal, landmarks, True, case.dim ** -0.5)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, memory_k, memory_v)]
    truth, truth_lse = hybrid_attention_reference(*leaves[:3], *args, *leaves[3:], kv_start)
    grad_out, grad_lse = torch.randn_like(truth), torch.randn_like(truth_lse)
    finite_lse = torch.where(torch.isinf(truth_lse), 0.0, truth_lse)  # batch row 1's first rows see only memory
    truth_grads = torch.autograd.grad((truth * grad_out).sum() + (finite_lse * grad_lse).sum(), leaves)
    out, lse = hybrid_fwd_blockwise(q, k, v, *args, memory_k, memory_v, kv_start, block=block)
    grads = hybrid_bwd_blockwise(q, k, v, out, lse, grad_out, grad_lse, *args, memory_k, memory_v, kv_start,
                                 block=block)
    # The CPU path computes in float32: compare float64 inputs at float32 accuracy.
    torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, truth_lse.float(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dq", "dk", "dv", "dmemory_k", "dmemory_v"), grads, truth_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def definition_mask(tq, tk, window, causal, landmarks, global_queries, kv_start):
    """DESIGN.md's sentence, one (query, key) pair at a time: (B, tq, tk) bool."""
    left, right = resolve_window(window, causal)
    if landmarks is None:
        marks = set()
    elif isinstance(landmarks, int):
        marks = set(range(0, tk, landmarks))
    else:
        marks = set(landmarks)
    mask = torch.zeros(len(kv_start), tq, tk, dtype=torch.bool)
    for b, start in enumerate(kv_start):
        for i in range(tq):
            p = i + tk - tq
            for j in range(tk):
                in_band = (left == -1 or p - left <= j) and (right == -1 or j <= p + right)
                seen = in_band or j in marks or (global_queries and p in marks)
                mask[b, i, j] = seen and (not causal or j <= p) and j >= start
    return mask


PATTERNS = [
    (1, 1, 1, True, 1, True, (0,)),
    (15, 15, 4, True, 5, True, (0, 3)),
    (17, 23, (2, 3), False, (0, 7, 22), True, (0, 4)),
    (23, 17, (0, -1), False, (0, 16), False, (2,)),
    (20, 20, -1, True, 6, False, (0, 9)),
    (9, 30, 3, True, (1, 2, 25), True, (0,)),
    (30, 9, (-1, 0), False, 2, True, (3,)),
]


@pytest.mark.parametrize("tq, tk, window, causal, landmarks, global_queries, kv_start", PATTERNS)
def test_pattern_follows_the_definition(tq, tk, window, causal, landmarks, global_queries, kv_start):
    """hybrid_mask (what the reference uses) and hybrid_key_counts against DESIGN.md's definition, pair by pair."""
    left, right = resolve_window(window, causal)
    positions = resolve_landmarks(landmarks if isinstance(landmarks, int) else torch.tensor(landmarks), tk)
    want = definition_mask(tq, tk, window, causal, landmarks, global_queries, kv_start)
    got = hybrid_mask(tq, tk, left, right, causal, positions, global_queries, torch.tensor(kv_start))
    assert torch.equal(got, want)
    no_padding = definition_mask(tq, tk, window, causal, landmarks, global_queries, (0,))[0]
    assert torch.equal(hybrid_mask(tq, tk, left, right, causal, positions, global_queries), no_padding)
    counts = hybrid_key_counts(tq, tk, left, right, causal, positions, global_queries, memory=3)
    assert torch.equal(counts, no_padding.sum(-1) + 3)


def largest_allocation(fn):
    """Bytes of the largest allocation one aten op makes while fn runs (from the profiler's memory events). The
    events of Python-level autograd Functions are left out: they add up every output they return (dq, dk, dv)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events() if event.name.startswith("aten::"))


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU path runs on CPU tensors")
def test_cpu_path_never_allocates_a_t_by_t_matrix():
    tq = tk = 2048
    q, k, v = (torch.randn(1, 2, tq, 64).requires_grad_(True) for _ in range(3))
    memory_k, memory_v = (torch.randn(1, 2, 4, 64).requires_grad_(True) for _ in range(2))

    def forward_backward(backend):
        def step():
            hr.hybrid_attention(q, k, v, 256, landmarks=64, memory_k=memory_k, memory_v=memory_v,
                                backend=backend).sum().backward()
        return step

    one_score_matrix = tq * tk * 4  # a single head's float32 Tq x Tk matrix
    assert largest_allocation(forward_backward("cpu")) < one_score_matrix / 8
    # The measurement can see such a matrix: the dense reference makes one.
    assert largest_allocation(forward_backward("reference")) >= one_score_matrix / 2
