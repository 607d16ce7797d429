"""hybridrag::int8_matmul_fwd/_grad_input as torch.library ops: opcheck on both backends, and `int8_matmul`
compiled with fullgraph=True equal to eager (outputs, gradients to x and bias; the no-grad path and the CPU cache
too) without recompiling across lengths."""
import pytest
import torch
from conftest import DEVICE
from library_checks import BACKENDS, OPCHECKS, assert_compiled_equals_eager

import hybridrag as hr

CASES = {  # (group_size, bias, activations, x dtype, accumulate)
    "w8a16": (None, True, "fp", torch.float32, "fp32"),
    "w8a16-groups": (8, False, "fp", torch.float16, "fp32"),
    "w8a8": (None, True, "int8", torch.float32, "fp32"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_opcheck(backend, device, case):
    group_size, with_bias, activations, dtype, accumulate = CASES[case]
    qweight = hr.quantize_int8(torch.randn(24, 32, device=device), group_size=group_size)
    x = torch.randn(5, 32, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(24, device=device, dtype=dtype, requires_grad=True) if with_bias else None
    args = (qweight.data, qweight.scale)
    torch.library.opcheck(torch.ops.hybridrag.int8_matmul_fwd,
                          (x, *args, bias, group_size, activations, accumulate, backend), test_utils=OPCHECKS)
    torch.library.opcheck(torch.ops.hybridrag.int8_matmul_grad_input,
                          (torch.randn(5, 24, device=device, dtype=dtype), *args, group_size, accumulate, backend),
                          test_utils=OPCHECKS)


@pytest.mark.skipif(DEVICE != "cuda", reason="accumulate='fp16' is a Triton option; opcheck on the GPU")
def test_opcheck_fp16_accumulation():
    qweight = hr.quantize_int8(torch.randn(24, 32, device=DEVICE))
    x = torch.randn(5, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    torch.library.opcheck(torch.ops.hybridrag.int8_matmul_fwd,
                          (x, qweight.data, qweight.scale, None, None, "fp", "fp16", "triton"), test_utils=OPCHECKS)


def _make_inputs(requires_grad=True):
    def make_inputs(length):
        x = torch.randn(2, length, 40, device=DEVICE, requires_grad=requires_grad)
        return x, torch.randn(24, device=DEVICE, requires_grad=requires_grad)
    return make_inputs


@pytest.mark.parametrize("activations", ["fp", "int8"])
def test_compiled_with_fullgraph_equals_eager_without_recompiling(activations):
    qweight = hr.quantize_int8(torch.randn(24, 40, device=DEVICE))
    assert_compiled_equals_eager(lambda x, bias: hr.int8_matmul(x, qweight, bias, activations=activations),
                                 _make_inputs())


def test_compiled_without_grad_equals_the_eager_fast_path():
    # eager skips the op when nothing needs a gradient; the compiled graph calls it: the same numbers (group-wise)
    qweight = hr.quantize_int8(torch.randn(24, 40, device=DEVICE), group_size=8)
    assert_compiled_equals_eager(lambda x, bias: hr.int8_matmul(x, qweight, bias), _make_inputs(requires_grad=False))


@pytest.mark.parametrize("cpu_cache, dtype, rows", [("fp32", torch.float32, 15), ("bf16", torch.bfloat16, 15),
                                                    ("bf16", torch.bfloat16, 4)])
def test_compiled_cpu_cache_equals_eager(cpu_cache, dtype, rows):
    # the graph dequantizes in the cache's dtype where eager reads the cache; bfloat16 at 4 rows takes int8pack
    qweight = hr.quantize_int8(torch.randn(24, 64))
    qweight.cpu_cache = cpu_cache
    x = torch.randn(rows, 64, dtype=dtype, requires_grad=True)
    compiled = torch.compile(lambda x: hr.int8_matmul(x, qweight, backend="cpu"), fullgraph=True, backend="aot_eager")
    results = []
    for run in (lambda x: hr.int8_matmul(x, qweight, backend="cpu"), compiled):
        out = run(x)
        results.append([out, *torch.autograd.grad(out.float().square().sum(), x)])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    qweight.data.neg_()  # an in-place change: eager rebuilds its cache, the graph reads the new weight
    torch.testing.assert_close(compiled(x), hr.int8_matmul(x, qweight, backend="cpu"), rtol=0, atol=0)
