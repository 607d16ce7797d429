"""kernels/targets.py: the target every launcher's config choice reads, and compile_for, which the compile report
uses to choose an A100's or an H100's configs on a machine without a GPU."""
import pytest
import torch

from hybridrag.kernels import triton_common
from hybridrag.kernels.int8 import triton_kernels as int8_kernels
from hybridrag.kernels.targets import A100, H100, Target, compile_for, gpu_target


def test_no_target_under_the_interpreter_or_off_cuda():
    assert gpu_target() is None and gpu_target(torch.device("cpu")) is None
    assert triton_common._fwd_config(64, torch.float16) == (32, 32, 4, 1)  # the interpreter's blocks


def test_compile_for_sets_the_target_and_restores_it():
    with compile_for(H100):
        assert gpu_target(torch.device("cpu")) is H100
        with compile_for(A100):
            assert gpu_target() is A100
        assert gpu_target() is H100
    assert gpu_target() is None


def test_configs_follow_the_target():
    for target in (A100, H100):
        with compile_for(target):
            table = triton_common._FWD_CONFIGS[target.arch]
            assert triton_common._fwd_config(64, torch.bfloat16) == table["d64"]
            assert triton_common._fwd_config(100, torch.float16) == table["padded"]
            assert triton_common._fwd_config(128, torch.float16) == table["d128"]
            for kernel, by_dim in triton_common._BWD_CONFIGS[target.arch].items():
                for dim, key in ((40, "d64"), (100, "padded"), (128, "d128")):
                    assert triton_common._bwd_config(dim, torch.bfloat16, kernel) == by_dim[key]
            tiled = int8_kernels._tiled_config(512, 4096, 4096, torch.float16, torch.device("cpu"))
            assert tiled.num_stages == (4 if target.arch >= 90 else 3)
            splitk = int8_kernels._splitk_config(1, 4096, 4096, torch.float16, torch.device("cpu"))
            assert splitk.splits == min(-(-2 * target.sm_count // 64), -(-4096 // (4 * 128)))
    assert A100.shared_memory_limit == 166_912 and H100.shared_memory_limit == 232_448


def test_backward_config_names_its_kernel():
    with pytest.raises(ValueError, match="kernel must be one of .*'dq'.*, got 'dk'"):
        triton_common._bwd_config(64, torch.float16, "dk")


def test_compile_for_refuses_what_is_not_a_target():
    with pytest.raises(TypeError, match="target must be a Target, got int"):
        with compile_for(90):
            pass
    assert Target(86, 84).shared_memory_limit == 101_376
