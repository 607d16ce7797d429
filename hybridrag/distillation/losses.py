"""Distillation losses: KL divergence between temperature-softened logits (Hinton et al. 2015) and embedding losses.

    loss = kl_distillation_loss(student_logits, teacher_logits, temperature=2.0, mask=attention_mask)
    loss = embedding_distillation_loss(student_vectors, teacher_vectors, kind="cosine")

The teacher's side is a target: it is detached, so gradients reach the student only. Both losses compute in float32
(float64 when an input is float64) whatever the inputs' dtype, and return a 0-dim tensor (reduction "mean" or
"sum") or one value per position / row (reduction "none").

Bad input is a ValueError or TypeError naming the argument, before anything is computed: shapes that differ, a
temperature that is not a finite number > 0, a mask of the wrong shape or with no real position, NaN in either
input (a NaN is never averaged in quietly).
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["kl_distillation_loss", "embedding_distillation_loss", "EMBEDDING_LOSSES", "REDUCTIONS"]

EMBEDDING_LOSSES = ("cosine", "mse")
REDUCTIONS = ("mean", "sum", "none")


def _check_float_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(x.shape)}")
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{name} holds NaN (at {tuple(torch.isnan(x).nonzero()[0].tolist())}); a NaN would make "
                         "the loss NaN")


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_mask(mask, shape, device):
    """mask as a bool tensor of `shape` (True = a real position), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have the logits' shape without the vocabulary axis, {tuple(shape)}, got "
                         f"{tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"mask must be bool or hold only 0 and 1, got dtype {mask.dtype}")
        mask = mask.bool()
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, the logits on {device}")
    if not bool(mask.any()):
        raise ValueError(f"mask has no real position (all {mask.numel()} entries False): there is nothing to "
                         "distill")
    return mask


def kl_distillation_loss(student_logits, teacher_logits, temperature=2.0, *, mask=None, reduction="mean"):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), per position, then reduced over the real positions.

    Args:
        student_logits, teacher_logits: (..., V) float tensors of one shape (e.g. (B, L, V) for a language model,
            (B, C) for a classifier). The teacher's are detached.
        temperature: T, a finite number > 0. Both distributions are softened by T; the T^2 factor keeps the
            gradients' scale independent of T (Hinton et al. 2015: the soft targets' gradients scale as 1 / T^2).
        mask: None (every position counts) or (...) bool / 0-1, the logits' shape without V; False marks a padded
            position, which adds nothing to the loss and gets no gradient. At least one position must be real.
        reduction: "mean" (over real positions), "sum" (over real positions) or "none" ((...) per position, 0 at
            padded ones).

    A teacher probability of exactly 0 (a -inf teacher logit) adds nothing (0 log 0 = 0); a student logit of -inf
    where the teacher gives probability > 0 makes the loss inf, as the divergence is.
    """
    _check_float_tensor("student_logits", student_logits)
    _check_float_tensor("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits is on {student_logits.device}, teacher_logits on {teacher_logits.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    _check_reduction(reduction)
    mask = _check_mask(mask, student_logits.shape[:-1], student_logits.device)
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    with torch.no_grad():
        log_teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
        teacher = log_teacher.exp()
        seen = teacher > 0
    # sum_v p_t (log p_t - log p_s), with 0 where p_t = 0 (torch.where keeps -inf - -inf out of the sum)
    terms = torch.where(seen, teacher * (log_teacher - log_student), torch.zeros((), dtype=dtype,
                                                                              device=teacher.device))
    per_position = terms.sum(dim=-1) * (temperature ** 2)
    if mask is not None:
        per_position = torch.where(mask, per_position, torch.zeros((), dtype=dtype, device=per_position.device))
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    count = per_position.numel() if mask is None else int(mask.sum())
    return total / count


def embedding_distillation_loss(student, teacher, kind="cosine", *, reduction="mean"):
    """How far the student's embeddings are from the teacher's, row by row.

    Args:
        student, teacher: (..., d) float tensors of one shape (e.g. (N, d) pooled sentence embeddings). A student of
            another width must be projected first (a Linear(d_student, d_teacher)): a ValueError says so.
        kind: "cosine": 1 - cos(student_i, teacher_i) per row, in [0, 2] (scale-free: what matters for an
            inner-product index of normalised vectors); "mse": the mean squared difference over each row's d values
            (F.mse_loss's scale when reduced by "mean").
        reduction: "mean" over rows, "sum" over rows, or "none" (one value per row, shape (...)).
    The teacher is detached. A zero row has cosine 0 with anything (F.cosine_similarity's eps).
    """
    if kind not in EMBEDDING_LOSSES:
        raise ValueError(f"kind must be one of {EMBEDDING_LOSSES}, got {kind!r}")
    _check_float_tensor("student", student)
    _check_float_tensor("teacher", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student has {student.shape[-1]}-dim embeddings but teacher has {teacher.shape[-1]}-dim "
                         f"ones: project the student to {teacher.shape[-1]} first (e.g. a Linear"
                         f"({student.shape[-1]}, {teacher.shape[-1]}))")
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher must have one shape (one teacher row per student row), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device}, teacher on {teacher.device}")
    _check_reduction(reduction)
    dtype = _compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.detach().to(dtype)
    if kind == "cosine":
        per_row = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        per_row = (s - t).pow(2).mean(dim=-1)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()
