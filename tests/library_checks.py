"""Shared checks of the torch.library op tests (tests/test_library_ops*.py): torch's opcheck, and a function compiled
with fullgraph=True against eager over several lengths, counting the frames torch.compile compiles."""
import pytest
import torch
from conftest import DEVICE
from torch._dynamo.testing import CompileCounterWithBackend

OPCHECKS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
LENGTHS = (15, 63, 113)
# (backend, device): the CPU kernels on the CPU, the Triton kernels on the GPU or, without one, interpreted
BACKENDS = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("triton", DEVICE, id="triton")]


def squares(outs):
    """The default loss: sum of squares of every output."""
    return sum(out.float().square().sum() for out in outs)


def assert_compiled_equals_eager(fn, make_inputs, lengths=LENGTHS, loss=squares):
    """fn(*inputs) -> a tensor or a tuple of tensors; make_inputs(T) -> inputs for length T.

    fn compiled with fullgraph=True and dynamic=True on aot_eager (dynamo, then AOT autograd through the ops' fake
    implementations and autograd formulas): at every length its outputs and the gradients of loss(outputs) to every
    input that requires grad equal eager's exactly, and only the first length compiles (one frame in all)."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for length in lengths:
        inputs = make_inputs(length)
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        results = []
        for run in (fn, compiled):
            outs = run(*inputs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            grads = torch.autograd.grad(loss(outs), leaves) if leaves else ()
            results.append([*outs, *grads])
        for eager, traced in zip(*results):
            torch.testing.assert_close(traced, eager, rtol=0, atol=0)
        assert counter.frame_count == 1, f"recompiled at length {length}: {counter.frame_count} frames"
