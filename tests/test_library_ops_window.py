"""hybridrag::sliding_window_fwd/_bwd as torch.library ops: opcheck on both backends, and
`sliding_window_attention` compiled with fullgraph=True equal to eager (outputs, lse, gradients through both)
without recompiling across lengths."""
import pytest
import torch
from conftest import DEVICE
from library_checks import BACKENDS, OPCHECKS, assert_compiled_equals_eager

import hybridrag as hr


def _qkv(tq, tk, device, dtype=torch.float32, requires_grad=True):
    q = torch.randn(1, 2, tq, 16, device=device, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(1, 1, tk, 16, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_opcheck_forward(backend, device, dtype):
    q, k, v = _qkv(12, 20, device, dtype)  # Tq < Tk: queries aligned to the end of the keys
    torch.library.opcheck(torch.ops.hybridrag.sliding_window_fwd, (q, k, v, 5, 2, 0.25, backend),
                          test_utils=OPCHECKS)


@pytest.mark.parametrize("with_grad_lse", [True, False])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_opcheck_backward(backend, device, with_grad_lse):
    q, k, v = _qkv(16, 16, device, requires_grad=False)
    out, lse = torch.ops.hybridrag.sliding_window_fwd(q, k, v, 5, 0, 0.25, backend)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    torch.library.opcheck(torch.ops.hybridrag.sliding_window_bwd,
                          (q, k, v, out, lse, torch.randn_like(out), grad_lse, 5, 0, 0.25, backend),
                          test_utils=OPCHECKS)


def test_compiled_with_fullgraph_equals_eager_without_recompiling():
    def attend(q, k, v):
        return hr.sliding_window_attention(q, k, v, 8, return_lse=True)

    def make_inputs(length):
        q = torch.randn(2, 4, length, 32, device=DEVICE, requires_grad=True)
        k, v = (torch.randn(2, 2, length, 32, device=DEVICE, requires_grad=True) for _ in range(2))
        return q, k, v
    # every row sees itself, so lse is finite; its gradient runs through the op's backward too
    assert_compiled_equals_eager(attend, make_inputs, loss=lambda outs: outs[0].square().sum() + outs[1].sum())
