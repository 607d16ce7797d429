"""A reward for RAG answers (correctness, citations, unsupported claims, length) and a lexical hallucination check.

`check_hallucination` reads the retrieved text itself: the answer is cut into sentences (citation groups such as
"[DOC_1]" taken out), and a sentence is a claim when it holds a content word (not a stopword). A claim is supported
when some passage holds at least `threshold` of its content words (lowercased, crudely stemmed: "raises" ~ "raise")
and every number and named entity in it (a number; an identifier with "_", a digit or an inner capital such as
"AssertionError" or "__exit__"; a capitalised word that does not start the sentence) occurs in some passage.
It is lexical support, not entailment: a paraphrase with other words reads as unsupported, and a negation of a
passage ("X does not raise") as supported.
"""
import re
from collections.abc import Mapping

from ..retrieval.prompting import check_citations, extract_citations
from ..system.evaluation import contains_gold, normalize_answer, token_f1
from .formatting import as_passages

__all__ = ["check_hallucination", "compute_rag_reward", "DEFAULT_WEIGHTS", "content_words", "split_sentences"]

DEFAULT_WEIGHTS = {"correctness": 1.0, "citation": 0.3, "unsupported": 0.5, "length": 0.1, "empty": 1.0}
_STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each either else few for from further had has have having he her
here hers him his how i if in into is it its itself just may me might more most must my neither no nor not now of
off on once only or other our ours out over own same shall she should so some such than that the their theirs them
then there these they this those through to too under until up upon very was we were what when where which while
who whom why will with would yes you your yours
""".split())
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:'[a-z]+)?|\d+(?:[.,]\d+)*")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CITATION = re.compile(r"\[\s*doc_\d+(?:\s*,\s*doc_\d+)*\s*\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _stem(word):
    """Lowercase and strip a plural/verb ending, so "raises", "raised", "raising" meet "raise"."""
    word = word.lower()
    if word.endswith("'s"):
        word = word[:-2]
    for suffix, keep in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            return word[:-len(suffix)] + keep
    return word


def split_sentences(text):
    """Non-empty sentences of `text` (split after . ! ? followed by space, and at newlines)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def content_words(text):
    """The stems of the words of `text` that are not stopwords (numbers included), in order."""
    return [_stem(w) for w in _WORD.findall(text) if w.lower() not in _STOPWORDS]


def _number(token):
    return token.replace(",", "")


def _is_entity(token, first):
    if _NUMBER.fullmatch(token) or token.lower() in _STOPWORDS:
        return False
    inner_capital = any(c.isupper() for c in token[1:])
    return "_" in token or any(c.isdigit() for c in token) or inner_capital or (token[0].isupper() and not first)


class _Passage:
    """What support is checked against in one passage: its word stems, lowercase words and numbers."""

    def __init__(self, text):
        words = _WORD.findall(text)
        self.stems = {_stem(w) for w in words}
        self.words = {w.lower() for w in words}
        self.numbers = {_number(n) for n in _NUMBER.findall(text)}


def _claim(sentence, passages, threshold, cited, first_number):
    clean = _CITATION.sub(" ", sentence)
    tokens = _WORD.findall(clean)
    words = [_stem(w) for w in tokens if w.lower() not in _STOPWORDS]
    if not words:
        return None
    supports = [sum(w in p.stems for w in words) / len(words) for p in passages]
    best = max(range(len(passages)), key=supports.__getitem__) if passages else None
    numbers = [_number(t) for t in tokens if _NUMBER.fullmatch(t)]
    entities = [t for i, t in enumerate(tokens) if _is_entity(t, i == 0)]
    missing_numbers = [n for n in numbers if not any(n in p.numbers for p in passages)]
    missing_entities = [e for e in entities if not any(e.lower() in p.words for p in passages)]
    support = supports[best] if passages else 0.0
    cited_support = {n: supports[n - first_number] for n in cited if first_number <= n < first_number + len(passages)}
    return {"text": sentence, "support": support, "best_passage": best, "cited": cited,
            "cited_support": cited_support, "unsupported_numbers": missing_numbers,
            "unsupported_entities": missing_entities,
            "supported": support >= threshold and not missing_numbers and not missing_entities}


def check_hallucination(answer: str, documents, *, threshold: float = 0.5, start: int = 1) -> dict:
    """Claims of `answer` that no retrieved passage supports (the rule is in the module docstring).

    Args:
        answer: the model's answer.
        documents: the passages it was given (Documents, SearchResults or passage dicts), in prompt order.
        threshold: the share of a claim's content words one passage must hold (0 < threshold <= 1).
        start: the number of the first passage in "[DOC_n]" citations.
    Returns:
        {"hallucinated": bool (some claim unsupported), "score": unsupported claims / claims (0.0 when there is no
        claim), "claims": [{"text", "support" (best passage's share), "best_passage" (index or None), "cited"
        (numbers), "cited_support" ({n: share} of the cited numbers that name a passage), "unsupported_numbers",
        "unsupported_entities", "supported"}], "unsupported_claims": [texts], "unsupported_numbers",
        "unsupported_entities", "sentences": int (claims plus sentences without a content word)}.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    passages = [_Passage(f"{p['title']}\n{p['text']}") for p in as_passages(documents)]
    sentences = split_sentences(answer)
    claims = []
    for sentence in sentences:
        claim = _claim(sentence, passages, threshold, extract_citations(sentence), start)
        if claim is not None:
            claims.append(claim)
    unsupported = [c for c in claims if not c["supported"]]
    return {"hallucinated": bool(unsupported), "score": len(unsupported) / len(claims) if claims else 0.0,
            "claims": claims, "unsupported_claims": [c["text"] for c in unsupported],
            "unsupported_numbers": sorted({n for c in claims for n in c["unsupported_numbers"]}),
            "unsupported_entities": sorted({e for c in claims for e in c["unsupported_entities"]}),
            "sentences": len(sentences)}


def _weights(weights):
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a dict of {sorted(DEFAULT_WEIGHTS)} -> float, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"weights has unknown components {unknown}; expected some of {sorted(DEFAULT_WEIGHTS)}")
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
            raise ValueError(f"weights[{name!r}] must be a number >= 0, got {value!r}")
    return {**DEFAULT_WEIGHTS, **{name: float(value) for name, value in weights.items()}}


def compute_rag_reward(answer: str, gold, documents, *, weights=None, max_words: int = 64,
                       threshold: float = 0.5, start: int = 1) -> dict:
    """The reward of one RAG answer, and its components.

        total = w_correctness * correctness + w_citation * citation
                - w_unsupported * unsupported - w_length * length - w_empty * empty

    correctness: 1.0 when a gold occurs in the answer as whole words, else the best token F1 to a gold (SQuAD
        normalisation, hybridrag.system.evaluation).
    citation: valid * used, where valid = cited numbers that name a given passage / cited numbers and used =
        valid cited passages that support (share >= threshold) a claim citing them / valid cited passages;
        0.0 when the answer cites nothing.
    unsupported: check_hallucination's score (unsupported claims / claims).
    length: min(1, max(0, words - max_words) / max_words), words counted on whitespace.
    empty: 1.0 when the answer has no word (so silence is not a safe answer), else 0.0.
    Default weights DEFAULT_WEIGHTS (correctness 1, citation 0.3, unsupported 0.5, length 0.1, empty 1); pass a
    dict to change some. Returns {"total", "components", "weights", "hallucination"}.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"max_words must be an int >= 1, got {max_words!r}")
    weights = _weights(weights)
    passages = as_passages(documents)
    report = check_hallucination(answer, passages, threshold=threshold, start=start)
    empty = not normalize_answer(answer)
    correctness = max(contains_gold(answer, gold), token_f1(answer, gold))
    cites = check_citations(answer, num_documents=len(passages), start=start)
    cited = len(cites.valid) + len(cites.invalid)
    used = {n for c in report["claims"] for n, share in c["cited_support"].items() if share >= threshold}
    citation = (len(cites.valid) / cited) * (len(used) / len(cites.valid)) if cites.valid else 0.0
    words = len(answer.split())
    components = {"correctness": float(correctness), "citation": citation, "unsupported": report["score"],
                  "length": min(1.0, max(0, words - max_words) / max_words), "empty": float(empty)}
    total = (weights["correctness"] * components["correctness"] + weights["citation"] * components["citation"]
             - weights["unsupported"] * components["unsupported"] - weights["length"] * components["length"]
             - weights["empty"] * components["empty"])
    return {"total": total, "components": components, "weights": weights, "hallucination": report}
