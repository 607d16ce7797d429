"""The threshold mapping from attention to feedback, and the input checks that both FeedbackExtractor forms share.

With threshold t, positive p, negative n and neutral u, a value a maps to (seed 004's formula, in its order):

    a >= t:  p + (a - t) / (1 - t) * (1 - p)     p at the threshold, 1 at a = 1 (1 for every a >= 1 when t = 1)
    a <  t:  n + a / t * (u - n)                 n at a = 0, up to u just below the threshold
"""
import math
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["threshold_feedback", "to_numpy", "check_number", "check_attention", "merge_config"]


def threshold_feedback(values, threshold, positive, negative, neutral):
    """The mapping above, elementwise: float64 array of values' shape."""
    values = np.asarray(values, dtype=np.float64)
    if threshold < 1:
        high = positive + (values - threshold) / (1.0 - threshold) * (1.0 - positive)
    else:
        high = np.ones_like(values)
    low = negative + values / threshold * (neutral - negative)
    return np.where(values >= threshold, high, low)


def to_numpy(name, value):
    """A numpy array from a numpy array or a torch tensor (half precision widened to float32)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")


def check_number(name, value):
    """A finite real number (not bool), returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_attention(name, value, ndim):
    """A non-empty real array with one of the dims in `ndim`, finite and >= 0 -> float64."""
    array = to_numpy(name, value)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim not in ndim or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty array of {' or '.join(map(str, ndim))} dims, got shape "
                         f"{array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or inf values")
    if (array < 0).any():
        raise ValueError(f"{name} must be >= 0 (attention probabilities), got a minimum of {array.min()}")
    return array


def merge_config(config, defaults):
    """The seed's config dict over its defaults: None = all defaults; a non-dict or an unknown key is an error."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    unknown = sorted(map(repr, set(config) - set(defaults)))
    if unknown:
        raise ValueError(f"config has unknown keys {', '.join(unknown)}; the keys are {tuple(defaults)}")
    return {**defaults, **config}

