"""Sliding-window attention on the Triton kernels: the hybrid kernels (`kernels/hybrid/triton_kernels.py`) with no
landmarks, no global rows and no memory tokens, where they reduce to the band alone.

One kernel family serves both ops, so there is one set of kernels to tune and the window-only benchmark measures
exactly what the landmarks add. Work is O(Tq x (window + block)); extra memory is O(B x H x Tq) for lse and delta.
"""
import torch

from ..hybrid.triton_kernels import hybrid_bwd_triton, hybrid_fwd_triton


def _no_landmarks(device):
    return torch.empty(0, dtype=torch.long, device=device)


def sliding_window_fwd_triton(q, k, v, left, right, scale):
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), unit last stride, band (left, right) with causality folded into right
    -> (o (B, H, Tq, D), lse (B, H, Tq) float32). Extra memory: o and lse only."""
    return hybrid_fwd_triton(q, k, v, left, right, False, _no_landmarks(q.device), False, scale)


def sliding_window_bwd_triton(q, k, v, out, lse, grad_out, grad_lse, left, right, scale):
    """Gradients (dq, dk, dv) of out and lse (grad_lse may be None). Extra memory: delta (B, H, Tq) float32 besides
    the three gradients; deterministic (no atomics)."""
    dq, dk, dv, _, _ = hybrid_bwd_triton(q, k, v, out, lse, grad_out, grad_lse, left, right, False,
                                         _no_landmarks(q.device), False, scale)
    return dq, dk, dv
