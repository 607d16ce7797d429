"""attention_mass: the Triton kernel (interpreted on CPU, compiled on GPU) and the tiled CPU path against the reference
built from dense probabilities, on the hybrid patterns; its sums against the attention probabilities; and the CPU
path's memory."""
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE
from conftest import CPU_IMPLEMENTATIONS  # (a line of its own: gpu_check.sh finds the CUDA tests by the one above)
from tolerance import tolerance_error

import hybridrag as hr
from hybridrag.kernels.patterns import hybrid_key_counts, resolve_landmarks, resolve_window

TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
BACKEND_DTYPES = [("triton", dtype) for dtype in TRITON_DTYPES]
BACKENDS = ["triton"]
if DEVICE == "cpu":  # both CPU implementations: the C++ kernels and the blockwise PyTorch path
    BACKEND_DTYPES += [(cpu, dtype) for cpu in CPU_IMPLEMENTATIONS
                       for dtype in (torch.float32, torch.float16, torch.bfloat16)]
    BACKENDS += CPU_IMPLEMENTATIONS
BACKEND_DTYPE_IDS = [f"{backend}-{str(dtype).removeprefix('torch.')}" for backend, dtype in BACKEND_DTYPES]


@dataclass(frozen=True)
class MassCase:
    """One attention-mass problem. landmarks: None, a stride or a tuple of positions; segments: "random" (ids in
    [-1, S), -1 included) or "chunks" (S contiguous runs, -1 on padding keys); rows: "all" (query_mask None),
    "some" (a random half of the rows) or "some-empty" (a random half, and no row at all in the last batch row)."""
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
    num_segments: int = 5
    segments: str = "random"
    rows: str = "all"

    def id(self):
        parts = [f"B{self.batch}H{self.heads}kv{self.kv_heads}q{self.tq}k{self.tk}D{self.dim}w{self.window}",
                 "c" if self.causal else "b"]
        if self.landmarks is not None:
            parts.append(f"-L{self.landmarks}" + ("g" if self.global_queries else ""))
        if self.memory:
            parts.append(f"-M{self.memory}x{self.memory_batch}")
        if self.kv_start is not None:
            parts.append(f"-pad{self.kv_start}")
        parts.append(f"-S{self.num_segments}{self.segments}-rows_{self.rows}")
        return "".join(parts).replace(" ", "")

    def make(self, dtype, device=DEVICE):
        """(q, k, memory_k or None) in dtype and the keyword arguments of attention_mass but those three."""
        q = torch.randn(self.batch, self.heads, self.tq, self.dim, device=device, dtype=dtype)
        k = torch.randn(self.batch, self.kv_heads, self.tk, self.dim, device=device, dtype=dtype)
        memory_k = None
        if self.memory:
            memory_k = torch.randn(self.memory_batch, self.kv_heads, self.memory, self.dim, device=device,
                                   dtype=dtype)
        kv_start = None if self.kv_start is None else torch.tensor(self.kv_start, device=device)
        if self.segments == "random":
            segments = torch.randint(-1, self.num_segments, (self.batch, self.tk), device=device)
        else:
            segments = (torch.arange(self.tk, device=device) * self.num_segments // self.tk).repeat(self.batch, 1)
            if kv_start is not None:
                segments[torch.arange(self.tk, device=device) < kv_start[:, None]] = -1
        query_mask = None
        if self.rows != "all":
            query_mask = torch.rand(self.batch, self.tq, device=device) < 0.5
            query_mask[:, -1] = True  # at least one row
            if self.rows == "some-empty":
                query_mask[-1] = False
        landmarks = self.landmarks
        if isinstance(landmarks, tuple):
            landmarks = torch.tensor(landmarks, device=device)
        return q, k, memory_k, dict(segments=segments, num_segments=self.num_segments, window=self.window,
                                    landmarks=landmarks, global_queries=self.global_queries, query_mask=query_mask,
                                    causal=self.causal, kv_start=kv_start)


def mass(q, k, memory_k, args, backend):
    return hr.attention_mass(q, k, args["segments"], args["num_segments"], args["window"], memory_k=memory_k,
                             backend=backend, **{name: value for name, value in args.items()
                                                 if name not in ("segments", "num_segments", "window")})


def compare(backend, case, dtype):
    """The tolerance rule: the error against the reference on float64 inputs is at most twice the error of the
    reference run in the input dtype, plus the floor. Returns the failure message or None."""
    q, k, memory_k, args = case.make(dtype)
    truth = mass(q.double(), k.double(), None if memory_k is None else memory_k.double(), args, "reference")
    baseline = mass(q, k, memory_k, args, "reference")
    got = mass(q, k, memory_k, args, backend)
    assert got.dtype == torch.float32 and got.shape == (case.batch, case.heads, case.num_segments)
    assert truth.dtype == torch.float64
    if case.rows == "some-empty":  # a batch row with no selected query row gets zeros
        assert torch.equal(got[-1], torch.zeros_like(got[-1]))
    return tolerance_error("mass", got, truth, baseline, dtype)


CASES = [
    # T = 1: one query, one key, a landmark and a global row
    MassCase(1, 1, 64, 1, landmarks=1, num_segments=1),
    # GQA, stride landmarks and global rows, random segments with -1, some rows, a batch row with none selected
    MassCase(113, 113, 64, 16, batch=2, heads=4, kv_heads=2, landmarks=32, num_segments=7, rows="some-empty"),
    # MQA, Tq < Tk, bidirectional band, landmarks at the first and the last key, memory tokens, chunk segments
    MassCase(63, 300, 40, (8, 8), causal=False, kv_heads=1, landmarks=(0, 150, 299), memory=4, num_segments=10,
             segments="chunks"),
    # long: band, landmarks, global rows, memory tokens, padding, some rows
    MassCase(300, 300, 100, 64, landmarks=50, memory=2, kv_start=(20,), segments="chunks", rows="some"),
    # unbounded window, landmark keys without global rows, per-batch memory, per-batch padding (one row none)
    MassCase(113, 113, 128, -1, batch=2, kv_heads=1, landmarks=(0, 40, 112), global_queries=False, memory=3,
             memory_batch=2, kv_start=(0, 50), rows="some"),
    # Tq > Tk: rows at negative positions see nothing and add zero mass to the average
    MassCase(63, 15, 64, 8, landmarks=4, num_segments=3),
    # one segment for every key; global rows that see the future
    MassCase(15, 63, 40, (3, 5), causal=False, heads=4, kv_heads=1, landmarks=7, num_segments=1, segments="chunks"),
]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS, indirect=["backend"])
@pytest.mark.parametrize("case", CASES, ids=MassCase.id)
def test_matches_reference(case, backend, dtype):
    failure = compare(backend, case, dtype)
    assert failure is None, failure


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_contiguous_inputs(backend):
    """q and k as transposes of (B, T, H, D) with padded head dims; memory_k too."""
    q = torch.randn(2, 63, 4, 72, device=DEVICE)[..., :64].transpose(1, 2)
    k = torch.randn(2, 80, 2, 72, device=DEVICE)[..., :64].transpose(1, 2)
    memory_k = torch.randn(1, 3, 2, 72, device=DEVICE)[..., :64].transpose(1, 2)
    segments = torch.randint(-1, 6, (2, 80), device=DEVICE)
    query_mask = torch.rand(2, 63, device=DEVICE) < 0.7
    kwargs = dict(landmarks=9, memory_k=memory_k, query_mask=query_mask, kv_start=torch.tensor([3, 0], device=DEVICE))
    truth = hr.attention_mass(q.double(), k.double(), segments, 6, 12, **{**kwargs, "memory_k": memory_k.double()},
                              backend="reference")
    baseline = hr.attention_mass(q, k, segments, 6, 12, **kwargs, backend="reference")
    got = hr.attention_mass(q, k, segments, 6, 12, **kwargs, backend=backend)
    failure = tolerance_error("mass", got, truth, baseline, torch.float32)
    assert failure is None, failure


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("wrong", [dict(landmarks=9), dict(query_mask=None)], ids=["stride", "all-rows"])
def test_tolerance_rule_can_fail(backend, wrong):
    """The check rejects the mass for a neighbouring problem: the landmark stride off by one, every row averaged."""
    q, k = torch.randn(1, 2, 63, 64, device=DEVICE), torch.randn(1, 2, 63, 64, device=DEVICE)
    segments = torch.arange(63, device=DEVICE)[None] // 8
    kwargs = dict(landmarks=8, query_mask=torch.arange(63, device=DEVICE)[None] % 3 == 0)
    truth = hr.attention_mass(q.double(), k.double(), segments, 8, 4, **kwargs, backend="reference")
    baseline = hr.attention_mass(q, k, segments, 8, 4, **kwargs, backend="reference")
    assert tolerance_error("mass", hr.attention_mass(q, k, segments, 8, 4, **kwargs, backend=backend), truth,
                           baseline, torch.float32) is None
    wrong_mass = hr.attention_mass(q, k, segments, 8, 4, **{**kwargs, **wrong}, backend=backend)
    assert tolerance_error("mass", wrong_mass, truth, baseline, torch.float32) is not None


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS, indirect=True)
@pytest.mark.parametrize("memory", [0, 3])
def test_mass_per_key_sums_to_the_probability_off_the_memory_tokens(backend, memory):
    """With one segment per key (S = Tk) and every row selected, the mass summed over segments is the mean over rows
    of 1 - (probability on the memory tokens): 1 for every row that sees a key when there are no memory tokens.
    With memory tokens, padding leaves some rows with the memory tokens alone; without, Tq > Tk leaves the first
    rows with nothing, and they add 0."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    batch, heads, kv_heads, dim = 2, 4, 2, 64
    tq, tk = (40, 52) if memory else (52, 40)
    window, landmarks = 6, 7
    q = torch.randn(batch, heads, tq, dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, kv_heads, tk, dim, device=DEVICE, dtype=dtype)
    memory_k = torch.randn(1, kv_heads, memory, dim, device=DEVICE, dtype=dtype) if memory else None
    kv_start = torch.tensor([0, 21], device=DEVICE) if memory else None
    segments = torch.arange(tk, device=DEVICE).repeat(batch, 1)
    total = hr.attention_mass(q, k, segments, tk, window, landmarks=landmarks, memory_k=memory_k, kv_start=kv_start,
                              backend=backend).sum(-1)
    if memory:
        # probability on the memory tokens = exp(logsumexp(memory scores) - lse), lse from the same backend
        _, lse = hr.hybrid_attention(q, k, k, window, landmarks=landmarks, memory_k=memory_k, memory_v=memory_k,
                                     kv_start=kv_start, return_lse=True, backend=backend)
        memory_scores = q @ memory_k.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2) * dim ** -0.5
        on_memory = torch.exp(torch.logsumexp(memory_scores, dim=-1) - lse)
        # batch row 1: rows at positions < 21 see only padding (window 6, landmarks 0, 7, 14) and the memory tokens
        torch.testing.assert_close(on_memory[1, :, :21 - (tk - tq)], torch.ones_like(on_memory[1, :, :9]))
        expected = (1 - on_memory).mean(-1)
    else:
        left, right = resolve_window(window, True)
        sees_a_key = hybrid_key_counts(tq, tk, left, right, True, resolve_landmarks(landmarks, tk), True) > 0
        assert 0 < sees_a_key.sum() < tq  # both kinds of row occur
        expected = torch.full((batch, heads), sees_a_key.double().mean().item(), dtype=dtype, device=DEVICE)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(total, expected.to(total.dtype), rtol=0, atol=tolerance)


def largest_allocation(fn):
    """Bytes of the largest allocation one aten op makes while fn runs (from the profiler's memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events() if event.name.startswith("aten::"))


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU path runs on CPU tensors")
def test_cpu_path_never_allocates_a_t_by_t_matrix():
    tq = tk = 2048
    q, k = torch.randn(1, 2, tq, 64), torch.randn(1, 2, tk, 64)
    memory_k = torch.randn(1, 2, 4, 64)
    segments = (torch.arange(tk) // 128)[None]
    query_mask = torch.rand(1, tq) < 0.5

    def step(backend):
        return lambda: hr.attention_mass(q, k, segments, 16, 256, landmarks=64, memory_k=memory_k,
                                         query_mask=query_mask, backend=backend)

    one_score_matrix = tq * tk * 4  # a single head's float32 Tq x Tk matrix
    assert largest_allocation(step("cpu")) < one_score_matrix / 8
    # The measurement can see such a matrix: the dense reference makes one.
    assert largest_allocation(step("reference")) >= one_score_matrix / 2
