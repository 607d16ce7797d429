"""Packed sequences (flash-attn's varlen layout) for hybrid attention: each sequence runs as its own batch row, on
views of the packed tensors, so no sequence sees another and nothing is copied or padded (the kernels through the
`hybridrag::packed_hybrid_attention_fwd` op, `library_packed.py`; the reference per sequence here)."""
from dataclasses import replace

import torch

from hybridrag.kernels.hybrid import hybrid_attention_reference
from hybridrag.kernels.patterns import resolve_landmarks

from .library_packed import packed_hybrid_attention_fwd
from .validation import unit_last_strides


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
    if backend == "reference":
        if all(q_hi == q_lo for q_lo, q_hi, _, _ in sequences):
            return torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), device=q.device)
        patterns = _sequence_patterns(pattern, landmarks, sequences)
        return _packed_reference(q, k, v, memory_k, memory_v, patterns, sequences)
    q, k, v, memory_k, memory_v = unit_last_strides(q, k, v, memory_k, memory_v)
    return packed_hybrid_attention_fwd(q, k, v, pattern.landmarks, memory_k, memory_v, pattern.key_mask,
                                       [bound for sequence in sequences for bound in sequence], pattern.left,
                                       pattern.right, pattern.causal, pattern.global_queries, pattern.scale, backend)
