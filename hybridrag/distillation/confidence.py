"""How confident a model is in one answer, from what the answer carries. Every measure is "higher = more confident",
so a cascade keeps an answer when its confidence is at least the threshold.

From a retrieval result (its scores, best first or in any order):
- score_margin(scores): top-1 minus top-2 score (>= 0; inf for a single score: nothing competes). Same units as the
  scores: cosine for dense search, BM25 or fused scores otherwise, so its threshold is set on validation data.
- score_entropy(scores, temperature): the entropy of softmax(scores / temperature) divided by log(n), in [0, 1]
  (0: one score dominates, 1: all equal; 0 for a single score). Its confidence is 1 - that.
From a generation (logits (T, V) of its T generated tokens, an optional (T,) mask of real tokens):
- token_entropy(logits, mask): the mean over tokens of each token distribution's entropy / log(V), in [0, 1]. Its
  confidence is 1 - that.
- max_probability(logits, mask): the mean over tokens of the most likely token's probability, in [1 / V, 1].
From attention, where given: attention_quality, in [0, 1] (HybridRAGSystem.analyze_attention_patterns: the share of
the answer's attention on the passages its words come from).

`confidence(answer, measure)` picks the field of an answer dict (see hybridrag.distillation.cascade for the dict)
that `measure` needs. An answer with no scores at all (a search that found nothing) has confidence -inf: it is
always escalated. A NaN anywhere is a ValueError, never a confidence.
"""
import math

import numpy as np
import torch

__all__ = ["score_margin", "score_entropy", "token_entropy", "max_probability", "confidence", "MEASURES",
           "BOUNDED_MEASURES"]

# measure -> the answer field it reads
MEASURES = {"margin": "scores", "entropy": "scores", "token_entropy": "logits", "max_prob": "logits",
            "attention": "attention_quality", "given": "confidence"}
# measures whose confidence lies in [0, 1] (a threshold outside that range is refused)
BOUNDED_MEASURES = ("entropy", "token_entropy", "max_prob", "attention")


def _scores(scores, name="scores"):
    """scores as a finite float64 1-D numpy array (possibly empty)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    if isinstance(scores, (str, bytes)) or not hasattr(scores, "__len__"):
        raise TypeError(f"{name} must be a list, numpy array or tensor of numbers, got {type(scores).__name__}")
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must hold numbers, got {scores!r}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per retrieved item), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return array


def score_margin(scores):
    """Top-1 minus top-2 of `scores` (order does not matter): >= 0; inf for one score; -inf for none."""
    array = np.sort(_scores(scores))[::-1]
    if array.size == 0:
        return -math.inf
    if array.size == 1:
        return math.inf
    return float(array[0] - array[1])


def score_entropy(scores, temperature=1.0):
    """Entropy of softmax(scores / temperature) / log(n), in [0, 1]; 0 for one score; 1 (no information) for
    none. temperature: a finite number > 0 (cosine scores in [-1, 1] are flat at 1: try 0.05)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    array = _scores(scores)
    if array.size == 0:
        return 1.0
    if array.size == 1:
        return 0.0
    z = array / temperature
    z = z - z.max()
    p = np.exp(z) / np.exp(z).sum()
    nonzero = p[p > 0]
    return float(min(max(-(nonzero * np.log(nonzero)).sum() / math.log(array.size), 0.0), 1.0))


def _token_distributions(logits, mask):
    """(probabilities (n, V) float64 of the real tokens)."""
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        got = f"a tensor of {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a floating-point tensor or numpy array (T, V), got {got}")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (T, V) with T >= 1 generated tokens and V >= 2, got "
                         f"{tuple(logits.shape)}")
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits hold NaN")
    logits = logits.detach().cpu().double()
    if mask is not None:
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, torch.Tensor) or mask.shape != logits.shape[:1]:
            raise ValueError(f"mask must be a ({logits.shape[0]},) bool tensor (True = a real token), got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        mask = mask.cpu().bool()
        if not bool(mask.any()):
            raise ValueError("mask has no real token")
        logits = logits[mask]
    return torch.softmax(logits, dim=-1)


def token_entropy(logits, mask=None):
    """Mean over the real tokens of entropy(softmax(logits_t)) / log(V), in [0, 1]."""
    p = _token_distributions(logits, mask)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1) / math.log(p.shape[-1])
    return float(entropy.mean().clamp(0.0, 1.0))


def max_probability(logits, mask=None):
    """Mean over the real tokens of the most likely token's probability, in [1 / V, 1]."""
    return float(_token_distributions(logits, mask).max(dim=-1).values.mean())


def confidence(answer, measure, *, score_temperature=1.0):
    """The confidence of one answer dict under `measure` (a name of MEASURES or a callable(answer) -> float).

    "margin": score_margin(answer["scores"]); "entropy": 1 - score_entropy(scores, score_temperature), -inf with
    no score; "token_entropy": 1 - token_entropy(answer["logits"], answer.get("mask")); "max_prob":
    max_probability(...); "attention": answer["attention_quality"] in [0, 1]; "given": answer["confidence"].
    A missing field is a ValueError naming the measure and the field; so is a NaN result.
    """
    if callable(measure):
        value = measure(answer)
        where = f"measure {getattr(measure, '__name__', measure)!r}"
    else:
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {tuple(MEASURES)} or a callable(answer) -> float, "
                             f"got {measure!r}")
        field = MEASURES[measure]
        if field not in answer or answer[field] is None:
            raise ValueError(f"measure {measure!r} needs the answer's {field!r}, but the answer has "
                             f"{sorted(k for k, v in answer.items() if v is not None)}")
        where = f"measure {measure!r}"
        if measure == "margin":
            value = score_margin(answer["scores"])
        elif measure == "entropy":
            scores = _scores(answer["scores"])
            value = -math.inf if scores.size == 0 else 1.0 - score_entropy(scores, score_temperature)
        elif measure == "token_entropy":
            value = 1.0 - token_entropy(answer["logits"], answer.get("mask"))
        elif measure == "max_prob":
            value = max_probability(answer["logits"], answer.get("mask"))
        else:
            value = answer[field]
            if measure == "attention" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                           or not 0.0 <= value <= 1.0):
                raise ValueError(f"attention_quality must be a number in [0, 1], got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{where} must give a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{where} gave NaN for this answer")
    return value
