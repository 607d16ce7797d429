"""The blockwise CPU kernels compute in float32 whatever autocast asks for.

They are written around float32 scores and softmax statistics (lse, row maxima) that they write into float32
buffers; under torch.autocast their matmuls would return bfloat16 and those writes fail (or lose the statistics'
precision). Inputs keep their dtype and outputs are cast back to it, as without autocast.
"""
import functools

import torch


def without_autocast(kernel):
    """kernel(q, ...) run with autocast off on q's device type."""
    @functools.wraps(kernel)
    def run(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return kernel(q, *args, **kwargs)
    return run
