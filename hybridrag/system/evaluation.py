"""Answer metrics, SQuAD style: exact match, gold contained in the answer, token F1 (each the best over the golds).

    score_answer("It returns None.", ["None"])  # {"exact_match": 0.0, "contains_gold": 1.0, "token_f1": 0.5}
    summarize([score_answer(p, g) for p, g in pairs])
"""
import re
import string
import unicodedata
from collections import Counter

METRICS = ("exact_match", "contains_gold", "token_f1")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _is_punctuation(character):
    return character in _ASCII_PUNCTUATION or unicodedata.category(character).startswith("P")


def normalize_answer(text):
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's normalisation).

    Punctuation is ASCII's (as SQuAD) plus Unicode's (categories P*: curly quotes, dashes), which the Python docs
    use; it is removed, not replaced by a space, so "__init__" becomes "init" and "utf-8" "utf8".
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = "".join(character for character in text.lower() if not _is_punctuation(character))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(golds):
    """`golds` (a str or a non-empty list of str) normalised; a gold that normalises to nothing is refused."""
    if isinstance(golds, str):
        golds = [golds]
    if not isinstance(golds, (list, tuple)) or not golds:
        raise TypeError(f"golds must be a str or a non-empty list of str, got {golds!r}")
    normalized = []
    for position, gold in enumerate(golds):
        if not isinstance(gold, str):
            raise TypeError(f"golds[{position}] must be a str, got {type(gold).__name__}")
        if not normalize_answer(gold):
            raise ValueError(f"golds[{position}] is {gold!r}, which is empty once normalised (punctuation and "
                             "articles removed): it would match anything or nothing")
        normalized.append(normalize_answer(gold))
    return normalized


def _prediction(prediction):
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    return normalize_answer(prediction)


def exact_match(prediction, golds):
    """1.0 when the normalised prediction equals a normalised gold, else 0.0."""
    prediction = _prediction(prediction)
    return float(any(prediction == gold for gold in _golds(golds)))


def contains_gold(prediction, golds):
    """1.0 when a normalised gold occurs in the normalised prediction as whole words ("1" is not in "10")."""
    padded = f" {_prediction(prediction)} "
    return float(any(f" {gold} " in padded for gold in _golds(golds)))


def _f1(prediction_tokens, gold_tokens):
    common = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction, golds):
    """Harmonic mean of token precision and recall against each gold (bag of normalised words), the best one."""
    tokens = _prediction(prediction).split()
    return max(_f1(tokens, gold.split()) for gold in _golds(golds))


def score_answer(prediction, golds):
    """{"exact_match", "contains_gold", "token_f1"} of one prediction."""
    return {"exact_match": exact_match(prediction, golds), "contains_gold": contains_gold(prediction, golds),
            "token_f1": token_f1(prediction, golds)}


def summarize(scores):
    """Means of each metric over a non-empty list of score_answer dicts, with "count" (answers scored) and
    "exact_match_count" / "contains_gold_count" (answers scoring 1); other keys in the dicts are ignored."""
    if isinstance(scores, dict) or not isinstance(scores, (list, tuple)) or not scores:
        raise ValueError(f"scores must be a non-empty list of score_answer dicts, got {scores!r}")
    for position, score in enumerate(scores):
        missing = [name for name in METRICS if not isinstance(score, dict) or name not in score]
        if missing:
            raise ValueError(f"scores[{position}] lacks {missing}; expected the dicts of score_answer")
    count = len(scores)
    summary = {"count": count}
    for name in METRICS:
        summary[name] = sum(score[name] for score in scores) / count
    for name in ("exact_match", "contains_gold"):
        summary[f"{name}_count"] = sum(score[name] == 1.0 for score in scores)
    return summary
