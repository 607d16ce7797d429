"""Which GPU the Triton kernels are compiled for: every launcher's config choice (block sizes, warps, stages, splits)
reads it here, so the compile report (benchmarks/compile_report.py) can compile the launchers' real choices for an
A100 or an H100 on a machine without a GPU.

`gpu_target(device)` is the Target of the CUDA device a launch runs on, None under the Triton interpreter or off
CUDA (the launchers then take their interpreter configs). Inside `compile_for(target)` it is `target` whatever the
device: the report hands CPU tensors to the launchers and compiles without launching.
"""
import contextlib
import functools
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    """arch: compute capability as major * 10 + minor (80 = A100, 90 = H100/H200); sm_count: multiprocessors."""

    arch: int
    sm_count: int

    @property
    def shared_memory_limit(self):
        """Bytes of shared memory one block may use (opt-in): A100 163 KiB, H100 227 KiB."""
        return SHARED_MEMORY_LIMIT.get(self.arch, SHARED_MEMORY_LIMIT[80])


SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
A100, H100 = Target(80, 108), Target(90, 132)

_compile_target = None


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _device_target(index):
    props = torch.cuda.get_device_properties(index)
    return Target(props.major * 10 + props.minor, props.multi_processor_count)


def gpu_target(device=None):
    """The Target a launch on `device` (None: the current CUDA device) compiles for, or None (interpreter, or not
    CUDA). Inside compile_for: its target."""
    if _compile_target is not None:
        return _compile_target
    if interpreting() or (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _device_target(index)


@contextlib.contextmanager
def compile_for(target):
    """Inside the block every config choice is `target`'s (the compile report)."""
    global _compile_target
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, got {type(target).__name__}")
    saved, _compile_target = _compile_target, target
    try:
        yield target
    finally:
        _compile_target = saved
