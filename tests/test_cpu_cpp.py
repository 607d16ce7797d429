"""The C++ CPU kernels (csrc/, hybridrag.kernels.cpp): W8A16 for decode sizes against the float64 reference over odd
shapes, group sizes, every float dtype and strided x, with gradients; the op's schema and fake (torch.library's
opcheck); its own checks; and what happens where the kernels do not build (one warning, the PyTorch path; an
error when "cpp" is asked for)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from int8_checks import assert_cpu_matches_reference

import hybridrag as hr
from hybridrag.kernels import cpp

pytestmark = pytest.mark.parametrize("cpu_kernels", ["cpp"], indirect=True)

SHAPES = [(1, 40, 24), (3, 100, 113), (8, 64, 1), (5, 300, 72), (1, 4096, 40)]  # (M, K, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group_size", [None, 4, 20], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("m, k, n", SHAPES, ids=lambda v: str(v))
def test_w8a16_matches_the_reference(m, k, n, group_size, dtype, cpu_kernels):
    from hybridrag.ops.int8 import cpu_route
    if group_size is not None and k % group_size:
        pytest.skip("the group size must divide K")
    qweight = hr.quantize_int8(torch.randn(n, k), group_size=group_size)
    x = torch.randn(m, k).to(dtype)
    assert cpu_route(x, qweight) == "cpp"
    assert_cpu_matches_reference(x, qweight, torch.randn(n).to(dtype))


def test_strided_and_offset_x(cpu_kernels):
    qweight = hr.quantize_int8(torch.randn(24, 64), group_size=16)
    base = torch.randn(3 * 64 + 3)
    for x in (base[3:].view(3, 64), torch.randn(64, 3).T, torch.randn(3, 72)[:, 4:68]):
        assert_cpu_matches_reference(x, qweight)


def test_the_op_passes_opcheck(cpu_kernels):
    data = torch.randint(-127, 128, (24, 40), dtype=torch.int8)
    for scale, group_size in ((torch.rand(24) + 0.1, 0), (torch.rand(24, 2) + 0.1, 20)):
        torch.library.opcheck(torch.ops.hybridrag_cpu.w8a16_matmul.default,
                              (torch.randn(3, 40), data, scale, group_size))


@pytest.mark.parametrize("change, match", [
    ({"x": torch.randn(3, 40).double()}, "x must be a contiguous float32"),
    ({"x": torch.randn(40, 3).T}, "x must be a contiguous float32"),
    ({"data": torch.zeros(24, 40, dtype=torch.uint8)}, "data must be a contiguous int8"),
    ({"x": torch.randn(3, 41)}, r"x is \(3, 41\) but data is \(24, 40\)"),
    ({"group_size": 7}, "group_size 7 must divide K 40"),
    ({"scale": torch.ones(23)}, "scale holds 23 values, expected 24"),
], ids=["dtype", "strided", "data", "shapes", "group", "scale"])
def test_the_op_refuses_what_it_cannot_compute(change, match, cpu_kernels):
    args = {"x": torch.randn(3, 40), "data": torch.zeros(24, 40, dtype=torch.int8), "scale": torch.ones(24),
            "group_size": 0, **change}
    with pytest.raises(RuntimeError, match=match):
        torch.ops.hybridrag_cpu.w8a16_matmul(args["x"], args["data"], args["scale"], args["group_size"])


def test_the_build_command_reports_success(cpu_kernels):
    done = subprocess.run([sys.executable, "-m", "hybridrag.kernels.build"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "the C++ CPU kernels are built" in done.stdout


def _without_a_compiler(tmp_path, choice):
    """Runs two int8 calls where the kernels cannot build (no compiler, an empty extensions cache)."""
    script = textwrap.dedent("""
        import warnings
        import torch
        import hybridrag as hr
        qweight = hr.quantize_int8(torch.randn(24, 64))
        x = torch.randn(1, 64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = hr.int8_matmul(x, qweight, backend="cpu")
            second = hr.int8_matmul(x, qweight, backend="cpu")
        from hybridrag.ops.int8 import cpu_route
        print("warnings", sum("did not build" in str(w.message) for w in caught))
        print("route", cpu_route(x, qweight))
        print("equal", torch.equal(first, second))
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "HYBRIDRAG_CPU_KERNELS": choice}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def test_without_a_compiler_auto_warns_once_and_runs_the_pytorch_path(tmp_path, cpu_kernels):
    done = _without_a_compiler(tmp_path, "auto")
    assert done.returncode == 0, done.stderr
    assert "warnings 1" in done.stdout and "route fp32" in done.stdout and "equal True" in done.stdout


def test_without_a_compiler_cpp_is_an_error_that_says_what_to_install(tmp_path, cpu_kernels):
    done = _without_a_compiler(tmp_path, "cpp")
    assert done.returncode == 1
    assert "RuntimeError: the C++ CPU kernels did not build: it needs a C++ compiler" in done.stderr
    assert "HYBRIDRAG_CPU_KERNELS=blockwise" in done.stderr


def test_bad_choices_are_refused(cpu_kernels):
    with pytest.raises(ValueError, match=r"choice must be one of \('auto', 'cpp', 'blockwise'\), got 'fast'"):
        cpp.set_cpu_kernels("fast")
    env = {**os.environ, "HYBRIDRAG_CPU_KERNELS": "fast"}
    done = subprocess.run([sys.executable, "-c", "import torch, hybridrag as hr; "
                           "hr.int8_matmul(torch.randn(1, 64), hr.quantize_int8(torch.randn(8, 64)))"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and "$HYBRIDRAG_CPU_KERNELS must be one of" in done.stderr
