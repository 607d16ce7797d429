"""Seed 004's feedback contract, as written: `FeedbackExtractor(embedding_func, config)` and
`await extract_feedback(answer, retrieved, metadata)` -> {item id: feedback in [negative_feedback, 1]}.

Each retrieved item (an id string, or a dict with "id" and "text") gets an attention a in [0, 1], taken as it is (not
normalised across items), mapped by feedback_mapping.threshold_feedback with t = attention_threshold,
p = positive_feedback, n = negative_feedback, u = neutral_feedback. metadata gives the attention in one of three forms:

    hyperedge_attention                  {id: a}
    attention_weights + context_mapping  {token position: attention} (or a 1-D array) and {id: [positions]};
                                         a = the mean over the item's positions
    attention_matrix + context_texts     [L, H, T, T], [H, T, T] or [T, T], averaged over layers and heads; the
    + answer_start_pos                   answer's rows answer_start_pos .. T - 1 averaged: one attention per context
    + context_end_pos                    token j < context_end_pos. Those tokens split into one contiguous span per
    (+ context_spans, optional)          context text (the sizes of np.array_split, or context_spans
                                         [(start, end), ...]); an item belongs to the chunks whose text contains its
                                         text (casefolded, whitespace collapsed); a = the mean over their tokens.

No attention form in metadata (None, or other keys only): the embedding fallback. embedding_func(texts) (plain or
async, texts -> (n, d)) embeds [answer, *item texts]; an item's similarity s = (1 + cos(answer, item)) / 2 in [0, 1]
is mapped like attention with t = similarity_threshold. method "embedding" always takes this path and refuses
attention metadata rather than ignore it.
"""
import inspect
from collections.abc import Mapping

import numpy as np
import torch

from ..ops.validation import check_int
from .feedback_mapping import check_attention, check_number, merge_config, threshold_feedback, to_numpy

__all__ = ["SeedFeedback", "CONFIG_DEFAULTS", "METHODS", "FORMS"]

METHODS = ("embedding", "attention")
CONFIG_DEFAULTS = {"method": "embedding", "attention_threshold": 0.1, "positive_feedback": 1.0,
                   "negative_feedback": 0.3, "neutral_feedback": 0.5, "similarity_threshold": 0.7}
FORMS = {"hyperedge_attention": ("hyperedge_attention",),
         "attention_weights": ("attention_weights", "context_mapping"),
         "attention_matrix": ("attention_matrix", "context_texts", "answer_start_pos", "context_end_pos")}
OPTIONAL_KEYS = {"attention_matrix": ("context_spans",)}


class SeedFeedback:
    """The seed form's state and `extract`; FeedbackExtractor(embedding_func, config) holds one.

    config: a dict of CONFIG_DEFAULTS' keys (the seed's five and similarity_threshold); missing keys take the
    defaults, unknown keys are refused.
    """

    def __init__(self, embedding_func, config=None):
        if not callable(embedding_func):
            raise TypeError(f"embedding_func must be callable (texts -> (n, d) embeddings), got "
                            f"{type(embedding_func).__name__}")
        values = merge_config(config, CONFIG_DEFAULTS)
        if values["method"] not in METHODS:
            raise ValueError(f"config['method'] must be one of {METHODS}, got {values['method']!r}")
        for name in CONFIG_DEFAULTS:
            if name != "method":
                values[name] = check_number(f"config[{name!r}]", values[name])
        for name in ("attention_threshold", "similarity_threshold"):
            if not 0 < values[name] < 1:
                raise ValueError(f"config[{name!r}] must be in (0, 1), got {values[name]}")
        p, n, u = values["positive_feedback"], values["negative_feedback"], values["neutral_feedback"]
        if not 0 <= n <= u <= p <= 1:
            raise ValueError(f"need 0 <= negative_feedback <= neutral_feedback <= positive_feedback <= 1, got "
                             f"negative_feedback={n}, neutral_feedback={u}, positive_feedback={p}")
        self.embedding_func, self.config = embedding_func, values

    def __repr__(self):
        name = getattr(self.embedding_func, "__name__", type(self.embedding_func).__name__)
        return f"FeedbackExtractor({name}, {self.config})"

    async def extract(self, answer, retrieved, metadata=None):
        """{id: feedback} for the retrieved items, in their order; see the module docstring."""
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a str, got {type(answer).__name__}")
        items = _items(retrieved)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        form = _metadata_form(metadata)
        if form is not None and self.config["method"] == "embedding":
            raise ValueError(f"config['method'] is 'embedding' but metadata has the {form} form; set method "
                             "'attention' to use it")
        if not items:
            return {}
        if form is None:
            values, threshold = await self._similarities(answer, items), self.config["similarity_threshold"]
        else:
            reader = {"hyperedge_attention": _item_attention, "attention_weights": _token_attention,
                      "attention_matrix": _matrix_attention}[form]
            values, threshold = reader(metadata, items), self.config["attention_threshold"]
        feedback = threshold_feedback(values, threshold, self.config["positive_feedback"],
                                      self.config["negative_feedback"], self.config["neutral_feedback"])
        return dict(zip((key for key, _ in items), feedback.tolist()))

    async def _similarities(self, answer, items):
        """(S,) (1 + cos(answer, item)) / 2 from one embedding_func call."""
        bare = [key for key, text in items if text is None]
        if bare:
            raise ValueError(f"the embedding fallback embeds each item's text, but {bare} came as bare ids: pass "
                             "{'id': ..., 'text': ...} dicts, or attention in metadata")
        if not answer.strip():
            raise ValueError("answer must be non-empty text for the embedding fallback")
        texts = [answer] + [text for _, text in items]
        vectors = self.embedding_func(texts)
        if inspect.isawaitable(vectors):
            vectors = await vectors
        vectors = _embeddings(vectors, len(texts))
        norms = np.linalg.norm(vectors, axis=1)
        if (norms == 0).any():
            raise ValueError(f"embedding_func gave zero vectors (no cosine) for texts {np.flatnonzero(norms == 0)}")
        cosine = vectors[1:] @ vectors[0] / (norms[1:] * norms[0])
        return (1.0 + np.clip(cosine, -1.0, 1.0)) / 2.0


def _items(retrieved):
    """[(id, text or None)] from id strings and {"id", "text"} dicts; ids non-empty and distinct."""
    if not isinstance(retrieved, (list, tuple)):
        raise TypeError(f"retrieved must be a list of ids or {{'id', 'text'}} dicts, got {type(retrieved).__name__}")
    items = []
    for position, item in enumerate(retrieved):
        if isinstance(item, str):
            key, text = item, None
        elif isinstance(item, Mapping):
            missing = [name for name in ("id", "text") if name not in item]
            if missing:
                raise ValueError(f"retrieved[{position}] has no {' and '.join(map(repr, missing))}; a dict item "
                                 "needs 'id' and 'text'")
            key, text = item["id"], item["text"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"retrieved[{position}]['text'] must be a non-empty str, got {text!r}")
        else:
            raise TypeError(f"retrieved[{position}] must be an id str or a dict with 'id' and 'text', got "
                            f"{type(item).__name__}")
        if not isinstance(key, str):
            raise TypeError(f"retrieved[{position}]'s id must be a str, got {type(key).__name__}")
        if not key:
            raise ValueError(f"retrieved[{position}]'s id must be a non-empty str, got ''")
        items.append((key, text))
    keys = [key for key, _ in items]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"retrieved repeats the ids {repeated}")
    return items


def _metadata_form(metadata):
    """The attention form whose keys metadata holds (all of them), or None for the embedding fallback."""
    present = [form for form, keys in FORMS.items()
               if any(key in metadata for key in keys + OPTIONAL_KEYS.get(form, ()))]
    if len(present) > 1:
        raise ValueError(f"metadata mixes the {' and '.join(present)} forms; pass one")
    if not present:
        return None
    form = present[0]
    missing = [key for key in FORMS[form] if key not in metadata]
    if missing:
        raise ValueError(f"metadata has no {', '.join(map(repr, missing))}: the {form} form needs "
                         f"{', '.join(map(repr, FORMS[form]))}")
    return form


def _probability(name, value):
    value = check_number(name, value)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be an attention in [0, 1], got {value}")
    return value


def _entry(name, mapping, key):
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{name} must be a dict keyed by item id, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"{name} has no entry for the retrieved item {key!r}")
    return mapping[key]


def _item_attention(metadata, items):
    """hyperedge_attention: (S,) the given attention of each item."""
    scores = metadata["hyperedge_attention"]
    return np.array([_probability(f"hyperedge_attention[{key!r}]", _entry("hyperedge_attention", scores, key))
                     for key, _ in items])


def _token_attention(metadata, items):
    """attention_weights + context_mapping: (S,) the mean attention over each item's token positions."""
    weights = metadata["attention_weights"]
    if isinstance(weights, Mapping):
        weights = {check_int(f"attention_weights key {position!r}", position, 0, numpy_ints=True):
                   _probability(f"attention_weights[{position!r}]", value) for position, value in weights.items()}
    elif isinstance(weights, (np.ndarray, torch.Tensor)):
        array = check_attention("attention_weights", weights, (1,))
        if array.max() > 1:
            raise ValueError(f"attention_weights must be attentions in [0, 1], got a maximum of {array.max()}")
        weights = dict(enumerate(array.tolist()))
    else:
        raise TypeError(f"attention_weights must be a {{position: attention}} dict or a 1-D array, got "
                        f"{type(weights).__name__}")
    mapping, out = metadata["context_mapping"], []
    for key, _ in items:
        name = f"context_mapping[{key!r}]"
        positions = _entry("context_mapping", mapping, key)
        if isinstance(positions, (np.ndarray, torch.Tensor)):
            positions = to_numpy(name, positions).tolist()
        if not isinstance(positions, (list, tuple)) or not positions:
            raise ValueError(f"{name} must be a non-empty list of token positions, got {positions!r}")
        positions = [check_int(f"{name}[{i}]", p, 0, numpy_ints=True) for i, p in enumerate(positions)]
        if len(set(positions)) != len(positions):
            raise ValueError(f"{name} repeats a token position: {positions}")
        absent = [p for p in positions if p not in weights]
        if absent:
            raise ValueError(f"{name} has the positions {absent}, which attention_weights does not have")
        out.append(sum(weights[p] for p in positions) / len(positions))
    return np.array(out)


def _matrix_attention(metadata, items):
    """attention_matrix + context_texts + answer_start_pos + context_end_pos: (S,) the mean answer-row attention
    over the tokens of each item's chunks."""
    matrix = check_attention("attention_matrix", metadata["attention_matrix"], (2, 3, 4))
    if matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"attention_matrix must end in [T, T] (queries, keys), got shape {matrix.shape}")
    if matrix.max() > 1:
        raise ValueError(f"attention_matrix must hold attentions in [0, 1], got a maximum of {matrix.max()}")
    tokens = matrix.shape[-1]
    answer_start = check_int("answer_start_pos", metadata["answer_start_pos"], 0, numpy_ints=True)
    if answer_start >= tokens:
        raise ValueError(f"answer_start_pos must be < T = {tokens} (the answer needs at least one row), got "
                         f"{answer_start}")
    context_end = check_int("context_end_pos", metadata["context_end_pos"], 1, numpy_ints=True)
    if context_end > answer_start:
        raise ValueError(f"context_end_pos must be <= answer_start_pos = {answer_start} (the context comes before "
                         f"the answer), got {context_end}")
    texts = metadata["context_texts"]
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"context_texts must be a non-empty list of non-empty str, got {texts!r}")
    spans = _spans(metadata.get("context_spans"), len(texts), context_end)
    per_token = matrix.reshape(-1, tokens, tokens).mean(axis=0)[answer_start:, :context_end].mean(axis=0)
    chunks = [" ".join(text.casefold().split()) for text in texts]
    out = []
    for key, text in items:
        if text is None:
            raise ValueError(f"the attention_matrix form matches items to context_texts by text, but {key!r} came as "
                             "a bare id: pass {'id': ..., 'text': ...} dicts")
        needle = " ".join(text.casefold().split())
        matched = [c for c, chunk in enumerate(chunks) if needle in chunk]
        if not matched:
            raise ValueError(f"the text of retrieved item {key!r} ({text!r}) is in none of the context_texts")
        columns = np.unique(np.concatenate([np.arange(*spans[c]) for c in matched]))
        out.append(per_token[columns].mean())
    return np.array(out)


def _spans(spans, count, context_end):
    """[(start, end)] token span per context text: given, or contiguous near-equal spans over [0, context_end)."""
    if spans is None:
        if count > context_end:
            raise ValueError(f"{count} context_texts cannot share context_end_pos = {context_end} tokens (one at "
                             "least each); pass context_spans")
        bounds = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(context_end), count)])
        return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    if not isinstance(spans, (list, tuple)) or len(spans) != count:
        raise ValueError(f"context_spans must be a list of {count} (start, end) pairs, one per context text, got "
                         f"{spans!r}")
    out = []
    for c, span in enumerate(spans):
        if not isinstance(span, (list, tuple)) or len(span) != 2:
            raise ValueError(f"context_spans[{c}] must be a (start, end) pair, got {span!r}")
        start = check_int(f"context_spans[{c}][0]", span[0], 0, numpy_ints=True)
        end = check_int(f"context_spans[{c}][1]", span[1], 0, numpy_ints=True)
        if not start < end <= context_end:
            raise ValueError(f"context_spans[{c}] must satisfy 0 <= start < end <= context_end_pos = {context_end}, "
                             f"got ({start}, {end})")
        out.append((start, end))
    return out


def _embeddings(vectors, count):
    """(count, d) float64 finite from embedding_func's result (numpy, torch, or a list of vectors)."""
    if isinstance(vectors, (list, tuple)):
        try:
            vectors = np.array(vectors, dtype=np.float64)
        except ValueError as error:  # ragged rows or non-numbers
            raise ValueError(f"embedding_func must return ({count}, d) real embeddings, got a list numpy cannot "
                             f"read as one: {error}") from error
    array = to_numpy("embedding_func's result", vectors)
    if array.dtype.kind not in "iuf" or array.ndim != 2 or array.shape[0] != count or array.shape[1] == 0:
        raise ValueError(f"embedding_func must return ({count}, d) real embeddings for the answer and the "
                         f"{count - 1} items, got dtype {array.dtype} and shape {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("embedding_func's result has NaN or inf values")
    return array
