"""Packed sequences (flash-attn's varlen layout) for hybrid attention: each sequence runs as its own batch row, on
views of the packed tensors, so no sequence sees another and nothing is copied or padded."""
from dataclasses import replace

import torch

from hybridrag.kernels.hybrid import hybrid_attention_reference
from hybridrag.kernels.patterns import resolve_landmarks

from .library import backend_functions
from .validation import unit_last_stride, unit_last_strides


def _sequence_patterns(pattern, landmarks, sequences):
    """One pattern per sequence: landmark positions count within the sequence (those past its end are dropped),
    and its slice of the key mask."""
    patterns = []
    for _, _, k_lo, k_hi in sequences:
        if isinstance(landmarks, torch.Tensor):
            positions = pattern.landmarks[pattern.landmarks < k_hi - k_lo]
        else:
            positions = resolve_landmarks(landmarks, k_hi - k_lo, pattern.landmarks.device)
        key_mask = None if pattern.key_mask is None else pattern.key_mask[:, k_lo:k_hi]
        patterns.append(replace(pattern, landmarks=positions, key_mask=key_mask))
    return patterns


def _check_keys_present(sequences):
    for index, (q_lo, q_hi, k_lo, k_hi) in enumerate(sequences):
        if q_hi > q_lo and k_hi == k_lo:
            raise ValueError(f"packed sequence {index} has {q_hi - q_lo} queries but no keys (cu_seqlens_k gives it "
                             "length 0)")


class PackedHybridAttentionFunction(torch.autograd.Function):
    """(o, lse) of packed sequences through a backend's forward and backward, one sequence at a time."""

    @staticmethod
    def forward(ctx, q, k, v, memory_k, memory_v, patterns, sequences, functions):
        forward_fn, backward_fn = functions
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        for (q_lo, q_hi, k_lo, k_hi), pattern in zip(sequences, patterns):
            if q_hi == q_lo:
                continue
            o_seq, lse_seq = forward_fn(q[:, :, q_lo:q_hi], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], *pattern.args(),
                                        memory_k, memory_v, *pattern.hidden_keys())
            out[:, :, q_lo:q_hi], lse[:, :, q_lo:q_hi] = o_seq, lse_seq
        ctx.save_for_backward(q, k, v, memory_k, memory_v, out, lse)
        ctx.patterns, ctx.sequences, ctx.backward_fn = patterns, sequences, backward_fn
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, memory_k, memory_v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else unit_last_stride(grad_out)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dmemory_k = None if memory_k is None else torch.zeros_like(memory_k, dtype=torch.float32)
        dmemory_v = None if memory_v is None else torch.zeros_like(memory_v, dtype=torch.float32)
        for (q_lo, q_hi, k_lo, k_hi), pattern in zip(ctx.sequences, ctx.patterns):
            if q_hi == q_lo:
                continue
            rows, keys = slice(q_lo, q_hi), slice(k_lo, k_hi)
            seq_grad_lse = None if grad_lse is None else grad_lse[:, :, rows].contiguous()
            grads = ctx.backward_fn(q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
                                    lse[:, :, rows].contiguous(),  # kernels index statistics as (B, H, T)
                                    grad_out[:, :, rows], seq_grad_lse, *pattern.args(), memory_k, memory_v,
                                    *pattern.hidden_keys())
            dq[:, :, rows], dk[:, :, keys], dv[:, :, keys] = grads[:3]
            if memory_k is not None:
                dmemory_k += grads[3]
                dmemory_v += grads[4]
        if memory_k is not None:
            dmemory_k, dmemory_v = dmemory_k.to(memory_k.dtype), dmemory_v.to(memory_v.dtype)
        return dq, dk, dv, dmemory_k, dmemory_v, None, None, None


def _packed_reference(q, k, v, memory_k, memory_v, patterns, sequences):
    """The dense reference per sequence, joined (differentiable through autograd)."""
    outs, lses = [], []
    for (q_lo, q_hi, k_lo, k_hi), pattern in zip(sequences, patterns):
        if q_hi == q_lo:
            continue
        o_seq, lse_seq = hybrid_attention_reference(q[:, :, q_lo:q_hi], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi],
                                                    *pattern.args(), memory_k, memory_v, *pattern.hidden_keys())
        outs.append(o_seq)
        lses.append(lse_seq)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def packed_attention(q, k, v, memory_k, memory_v, pattern, landmarks, sequences, backend):
    """(o (1, H, total_q, D), lse (1, H, total_q)) of packed sequences, bounds [(q_lo, q_hi, k_lo, k_hi), ...].

    Memory: o and lse, and per sequence what one call of the backend needs for that sequence alone."""
    _check_keys_present(sequences)
    patterns = _sequence_patterns(pattern, landmarks, sequences)
    if backend == "reference":
        if all(q_hi == q_lo for q_lo, q_hi, _, _ in sequences):
            return torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), device=q.device)
        return _packed_reference(q, k, v, memory_k, memory_v, patterns, sequences)
    q, k, v, memory_k, memory_v = unit_last_strides(q, k, v, memory_k, memory_v)
    forward_fn, backward_fn, _ = backend_functions(backend)
    return PackedHybridAttentionFunction.apply(q, k, v, memory_k, memory_v, patterns, sequences,
                                               (forward_fn, backward_fn))
