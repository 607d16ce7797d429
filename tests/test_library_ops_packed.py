"""hybridrag::packed_hybrid_attention_fwd/_bwd as torch.library ops: opcheck on both backends, and packed
`hybrid_attention` under torch.compile equal to eager (outputs, lse and gradients). Not fullgraph: checking the
offsets reads cu_seqlens to the host (a graph break, by design: bad offsets raise before any kernel), and the
sequence bounds read there are constants of the graph that follows, so each packing compiles its own."""
import pytest
import torch
from conftest import DEVICE
from library_checks import OPCHECKS

import hybridrag as hr

CU_SEQLENS_Q, CU_SEQLENS_K = [0, 5, 5, 14], [0, 7, 9, 20]  # (q, k) lengths (5, 7), (0, 2), (9, 11)
# what check_cu_seqlens reads from them: q_lo, q_hi, k_lo, k_hi of each sequence (the second has no queries)
BOUNDS = [b for i in range(3) for b in (CU_SEQLENS_Q[i], CU_SEQLENS_Q[i + 1], CU_SEQLENS_K[i], CU_SEQLENS_K[i + 1])]


def _packed(device, memory, requires_grad=True):
    q = torch.randn(1, 2, 14, 16, device=device, requires_grad=requires_grad)
    k, v = (torch.randn(1, 1, 20, 16, device=device, requires_grad=requires_grad) for _ in range(2))
    memory_k, memory_v = (torch.randn(1, 1, 2, 16, device=device, requires_grad=requires_grad) if memory else None
                          for _ in range(2))
    return q, k, v, memory_k, memory_v


# the interpreter is slow: the Triton kernels once, with memory tokens
@pytest.mark.parametrize("memory, backend, device", [(True, "cpu", "cpu"), (False, "cpu", "cpu"),
                                                     (True, "triton", DEVICE)])
def test_opcheck(backend, device, memory):
    q, k, v, memory_k, memory_v = _packed(device, memory)
    key_mask = torch.rand(1, 20, device=device) > 0.2
    landmarks = torch.arange(0, 11, 3, device=device)  # positions within each sequence; the longest has 11 keys
    constants = (BOUNDS, 3, 0, True, True, 0.25, backend)
    torch.library.opcheck(torch.ops.hybridrag.packed_hybrid_attention_fwd,
                          (q, k, v, landmarks, memory_k, memory_v, key_mask, *constants), test_utils=OPCHECKS)
    q, k, v, memory_k, memory_v = (None if t is None else t.detach() for t in (q, k, v, memory_k, memory_v))
    out, lse = torch.ops.hybridrag.packed_hybrid_attention_fwd(q, k, v, landmarks, memory_k, memory_v, key_mask,
                                                               *constants)
    torch.library.opcheck(torch.ops.hybridrag.packed_hybrid_attention_bwd,
                          (q, k, v, out, lse, torch.randn_like(out), torch.randn_like(lse), landmarks, memory_k,
                           memory_v, key_mask, *constants), test_utils=OPCHECKS)


def test_compiled_equals_eager_with_gradients():
    q, k, v, memory_k, memory_v = _packed(DEVICE, memory=True)
    cu_q, cu_k = (torch.tensor(cu, dtype=torch.int32, device=DEVICE) for cu in (CU_SEQLENS_Q, CU_SEQLENS_K))

    def attend(q, k, v, memory_k, memory_v):
        return hr.hybrid_attention(q, k, v, 4, landmarks=3, memory_k=memory_k, memory_v=memory_v, return_lse=True,
                                   cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    leaves = (q, k, v, memory_k, memory_v)
    results = []
    for run in (attend, torch.compile(attend, backend="aot_eager")):
        out, lse = run(*leaves)
        results.append([out, lse, *torch.autograd.grad(out.square().sum() + lse.sum(), leaves)])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
