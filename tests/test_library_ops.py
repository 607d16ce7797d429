"""hybridrag::hybrid_attention_fwd/_bwd as torch.library ops: torch's own consistency checks (schema, fake tensors,
autograd registration, AOT dispatch with dynamic shapes) on both backends, compiled with fullgraph=True equal to
eager (outputs and gradients) without recompiling across lengths, and no torch._dynamo import on a plain eager call
of any hybridrag op (the other ops' tests: tests/test_library_ops_*.py)."""
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE
from library_checks import BACKENDS, OPCHECKS, assert_compiled_equals_eager

import hybridrag as hr


def _args(key_mask=True, memory=True, backend="cpu", device="cpu"):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 20, 32, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 20, 32, device=device, requires_grad=True) for _ in range(2))
    memory_k, memory_v = (torch.randn(1, 2, 3, 32, device=device, requires_grad=True) if memory else None
                          for _ in range(2))
    mask = (torch.rand(2, 20, device=device) > 0.3) if key_mask else None
    landmarks = torch.arange(0, 20, 4, device=device)
    return (q, k, v, landmarks, memory_k, memory_v, None, mask, 7, 0, True, True, 32 ** -0.5, backend)


# the interpreter is slow: the Triton kernels once, with every optional input
@pytest.mark.parametrize("key_mask, memory, backend, device", [
    (True, True, "cpu", "cpu"), (False, False, "cpu", "cpu"), (True, True, "triton", DEVICE)])
def test_opcheck(key_mask, memory, backend, device):
    torch.library.opcheck(torch.ops.hybridrag.hybrid_attention_fwd, _args(key_mask, memory, backend, device),
                          test_utils=OPCHECKS)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_opcheck_backward(backend, device):
    q, k, v, landmarks, memory_k, memory_v, kv_start, key_mask, *constants = _args(True, True, backend, device)
    q, k, v, memory_k, memory_v = (t.detach() for t in (q, k, v, memory_k, memory_v))
    tensors = (landmarks, memory_k, memory_v, kv_start, key_mask)
    out, lse = torch.ops.hybridrag.hybrid_attention_fwd(q, k, v, *tensors, *constants)
    torch.library.opcheck(torch.ops.hybridrag.hybrid_attention_bwd,
                          (q, k, v, out, lse, torch.randn_like(out), torch.randn_like(lse), *tensors, *constants),
                          test_utils=OPCHECKS)


def test_compiled_across_lengths_without_recompiling():
    def attend(q, k, v, memory_k, memory_v, key_mask):
        return hr.hybrid_attention(q, k, v, 8, landmarks=4, key_mask=key_mask, memory_k=memory_k, memory_v=memory_v,
                                   return_lse=True)

    def make_inputs(length):
        q = torch.randn(2, 4, length, 32, device=DEVICE, requires_grad=True)
        k, v = (torch.randn(2, 2, length, 32, device=DEVICE, requires_grad=True) for _ in range(2))
        memory_k, memory_v = (torch.randn(1, 2, 3, 32, device=DEVICE, requires_grad=True) for _ in range(2))
        return q, k, v, memory_k, memory_v, torch.rand(2, length, device=DEVICE) > 0.3
    # memory tokens: every row sees a key, so lse is finite
    assert_compiled_equals_eager(attend, make_inputs, loss=lambda outs: outs[0].square().sum() + outs[1].sum())


def test_compiled_with_fullgraph_equals_eager_with_gradients():
    q, k, v, _, memory_k, memory_v, _, key_mask, *_ = _args(device=DEVICE)

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
    # torch.library.custom_op's wrapper imports torch._dynamo on the first call (about a second); the ops avoid it.
    # Every op, forward and backward: hybrid, sliding window, int8 (grad and no-grad paths), streaming, packed.
    code = ("import sys, torch, hybridrag as hr\n"
            "q = torch.randn(1, 2, 16, 32, requires_grad=True)\n"
            "hr.hybrid_attention(q, q, q, 4, landmarks=4).sum().backward()\n"
            "o, lse = hr.sliding_window_attention(q, q, q, 4, return_lse=True)\n"
            "(o.sum() + lse.sum()).backward()\n"
            "qweight, bias = hr.quantize_int8(torch.randn(8, 32)), torch.zeros(8, requires_grad=True)\n"
            "hr.int8_matmul(q, qweight, bias).sum().backward()\n"
            "with torch.no_grad():\n"
            "    hr.int8_matmul(q, qweight, bias)\n"
            "    cache = hr.StreamingKVCache(1, 2, 32, 4, sinks=1)\n"
            "    hr.streaming_attention(q, q, q, cache)\n"
            "cu = torch.tensor([0, 5, 16], dtype=torch.int32)\n"
            "hr.hybrid_attention(q, q, q, 4, cu_seqlens_q=cu, cu_seqlens_k=cu).sum().backward()\n"
            "assert q.grad is not None and bias.grad is not None and cache.length == 16\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
