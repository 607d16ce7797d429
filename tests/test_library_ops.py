"""hybridrag::hybrid_attention_fwd/_bwd as torch.library ops: torch's own consistency checks (schema, fake tensors,
autograd registration), compiled with fullgraph=True equal to eager (outputs and gradients), and no torch._dynamo
import on a plain eager call."""
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE

import hybridrag as hr


def _args(key_mask=True, memory=True):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 20, 32, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, 2, 20, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    memory_k, memory_v = (torch.randn(1, 2, 3, 32, device=DEVICE, requires_grad=True) if memory else None
                          for _ in range(2))
    mask = (torch.rand(2, 20, device=DEVICE) > 0.3) if key_mask else None
    landmarks = torch.arange(0, 20, 4, device=DEVICE)
    return (q, k, v, landmarks, memory_k, memory_v, None, mask, 7, 0, True, True, 32 ** -0.5,
            "triton" if DEVICE == "cuda" else "cpu")


@pytest.mark.parametrize("key_mask, memory", [(True, True), (False, False)])
def test_opcheck(key_mask, memory):
    torch.library.opcheck(torch.ops.hybridrag.hybrid_attention_fwd, _args(key_mask, memory),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiled_with_fullgraph_equals_eager_with_gradients():
    q, k, v, _, memory_k, memory_v, _, key_mask, *_ = _args()

    def attend(q, k, v, memory_k, memory_v, key_mask):
        return hr.hybrid_attention(q, k, v, 8, landmarks=4, key_mask=key_mask, memory_k=memory_k, memory_v=memory_v)
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    leaves = (q, k, v, memory_k, memory_v)
    results = []
    for fn in (attend, compiled):
        out = fn(*leaves, key_mask)
        results.append([out, *torch.autograd.grad(out.square().sum(), leaves)])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def test_an_eager_call_does_not_import_dynamo():
    # torch.library.custom_op's wrapper imports torch._dynamo on the first call (about a second); the ops avoid it
    code = ("import sys, torch, hybridrag as hr\n"
            "q = torch.randn(1, 2, 16, 32, requires_grad=True)\n"
            "hr.hybrid_attention(q, q, q, 4, landmarks=4).sum().backward()\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
