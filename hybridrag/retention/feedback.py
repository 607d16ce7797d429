"""Feedback from attention: how much a generated answer used each retrieved item, and per-item retrieval weights
updated from it. Both classes have two forms, chosen by how they are constructed:

- the keyword form, FeedbackExtractor(*, threshold, ...) and WeightUpdater(*, method, ...): feedback in [-1, 1] from
  attention shares, weights held by the updater (below);
- the seed form, FeedbackExtractor(embedding_func, config) and WeightUpdater(graph, config): seed 004's contract as
  written, feedback in [0, 1] from raw attention and weights stored in a graph (seed_feedback, seed_weights).

Keyword form, the mapping in one place. Every input form is reduced to a raw attention mass m_i >= 0 per item
(S items). The shares a_i = m_i / sum_j m_j in [0, 1] (summing to 1; all 0 when the items got no attention at all) say
which items the answer used, relative to each other: attention to non-item tokens (the question, the answer itself)
does not count. The shares go through feedback_mapping.threshold_feedback with threshold t, positive p, negative n
and neutral u:

    a_i >= t:  feedback = p + (a_i - t) / (1 - t) * (1 - p)     p at the threshold, up to 1 at a_i = 1 (1 when t = 1)
    a_i <  t:  feedback = n + a_i / t * (u - n)                 n at zero attention, up to u just below the threshold

Defaults: t = 1 / S (an item is "used" when it got at least the share of a uniform spread; the largest share always
qualifies), p = 0.5, n = -0.5, u = 0.0. The jump from u = 0 to p = 0.5 at the threshold separates used items from the
rest; the negative side is milder than the positive one (-0.5 at worst) because an ignored item is weaker evidence
(the answer may not have needed it) than a used one, and items just below the threshold get almost no signal.
"""
import functools
import inspect

import numpy as np
import torch

from ..ops.validation import check_int
from .feedback_mapping import check_attention as _attention
from .feedback_mapping import check_number as _number
from .feedback_mapping import threshold_feedback
from .feedback_mapping import to_numpy as _to_numpy
from .seed_feedback import SeedFeedback
from .seed_weights import SeedWeights

__all__ = ["FeedbackExtractor", "WeightUpdater", "METHODS"]

METHODS = ("ema", "additive", "multiplicative")


def _form(form):
    """Marks a method of one constructor form ("keyword" or "seed"); on an object built in the other form it raises
    a TypeError naming both constructors (the class's _FORMS)."""
    def decorate(method):
        def check(self):
            built = "keyword" if self._seed is None else "seed"
            if built != form:
                forms = type(self)._FORMS
                raise TypeError(f"{method.__name__} belongs to the {form} form {forms[form]}, but this "
                                f"{type(self).__name__} was built in the {built} form {forms[built]}")

        if inspect.iscoroutinefunction(method):
            @functools.wraps(method)
            async def checked(self, *args, **kwargs):
                check(self)
                return await method(self, *args, **kwargs)
        else:
            @functools.wraps(method)
            def checked(self, *args, **kwargs):
                check(self)
                return method(self, *args, **kwargs)
        return checked
    return decorate


def _seed_form(cls, first, config, keywords):
    """Whether cls(...) was called in the seed form (positional arguments); refuses a mix of both forms."""
    if first is None and config is None:
        return False
    given = [name for name, value in keywords.items() if value is not None]
    if given:
        raise TypeError(f"{cls.__name__} takes the seed form {cls._FORMS['seed']} or the keyword form "
                        f"{cls._FORMS['keyword']}, not both: got positional arguments and {', '.join(given)}")
    return True


def _token_to_item(token_to_item, tokens, num_items, what):
    """(T,) integer ids in [-1, num_items) (-1 = the token belongs to no item)."""
    array = _to_numpy("token_to_item", token_to_item)
    if array.dtype.kind not in "iu" or array.ndim != 1:
        raise TypeError(f"token_to_item must be a 1-D integer array, got dtype {array.dtype} and shape {array.shape}")
    if array.shape[0] != tokens:
        raise ValueError(f"token_to_item has {array.shape[0]} entries but {what} has {tokens} context tokens")
    if array.size and (array.min() < -1 or array.max() >= num_items):
        raise ValueError(f"token_to_item ids must lie in [-1, {num_items}) (num_items = {num_items}), got "
                         f"{array.min()} .. {array.max()}")
    return array.astype(np.int64)


class FeedbackExtractor:
    """Per-item feedback from attention, in two forms chosen by the constructor.

    Keyword form, FeedbackExtractor(*, threshold=None, positive=0.5, negative=-0.5, neutral=0.0): feedback in [-1, 1]
    from attention shares (the module docstring); the from_* methods and extract.
        threshold: share in (0, 1) above which an item counts as used, or None for 1 / S.
        positive, negative, neutral: p, n, u with -1 <= n <= u <= p <= 1, so feedback never decreases with attention.
    Every method returns float64 numpy feedback, (S,) per answer or (B, S) for a batch, and accepts numpy arrays or
    torch tensors.

    Seed form, FeedbackExtractor(embedding_func, config): seed 004's contract, `await extract_feedback(answer,
    retrieved, metadata)` -> {id: feedback in [0, 1]} from raw attention, see hybridrag.retention.seed_feedback.
    config keys: method ("embedding"), attention_threshold (0.1), positive_feedback (1.0), negative_feedback (0.3),
    neutral_feedback (0.5), similarity_threshold (0.7, the embedding fallback's).

    A method of one form called on an object of the other raises a TypeError.
    """
    _FORMS = {"keyword": "FeedbackExtractor(*, threshold, positive, negative, neutral)",
              "seed": "FeedbackExtractor(embedding_func, config)"}

    def __init__(self, embedding_func=None, config=None, /, *, threshold=None, positive=None, negative=None,
                 neutral=None):
        keywords = dict(threshold=threshold, positive=positive, negative=negative, neutral=neutral)
        if _seed_form(type(self), embedding_func, config, keywords):
            self._seed = SeedFeedback(embedding_func, config)
            return
        self._seed = None
        positive, negative, neutral = (0.5 if positive is None else positive, -0.5 if negative is None else negative,
                                       0.0 if neutral is None else neutral)
        if threshold is not None:
            threshold = _number("threshold", threshold)
            if not 0 < threshold < 1:
                raise ValueError(f"threshold must be None (1 / number of items) or in (0, 1), got {threshold}")
        self.threshold = threshold
        self.positive, self.negative, self.neutral = (_number(name, value) for name, value in
                                                      (("positive", positive), ("negative", negative),
                                                       ("neutral", neutral)))
        if not -1 <= self.negative <= self.neutral <= self.positive <= 1:
            raise ValueError(f"need -1 <= negative <= neutral <= positive <= 1, got negative={self.negative}, "
                             f"neutral={self.neutral}, positive={self.positive}")

    def __repr__(self):
        if self._seed is not None:
            return repr(self._seed)
        return (f"FeedbackExtractor(threshold={self.threshold}, positive={self.positive}, negative={self.negative}, "
                f"neutral={self.neutral})")

    @_form("seed")
    async def extract_feedback(self, answer, retrieved, metadata=None):
        """Seed form: {id: feedback} for `retrieved` (id strings or {"id", "text"} dicts) from the attention in
        metadata (hyperedge_attention; attention_weights + context_mapping; attention_matrix [L, H, T, T],
        [H, T, T] or [T, T] + context_texts + answer_start_pos + context_end_pos), else by embeddings."""
        return await self._seed.extract(answer, retrieved, metadata)

    @_form("keyword")
    def from_scores(self, scores):
        """Feedback from raw per-item attention mass, (S,) or (B, S) (one answer per row), >= 0."""
        mass = _attention("scores", scores, (1, 2))
        total = mass.sum(axis=-1, keepdims=True)
        shares = np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)
        t = 1.0 / mass.shape[-1] if self.threshold is None else self.threshold
        return threshold_feedback(shares, t, self.positive, self.negative, self.neutral)

    @_form("keyword")
    def from_token_attention(self, attention, token_to_item, num_items):
        """Feedback from token-level attention (T,) over the context: an item's mass is the sum over its tokens.

        token_to_item: (T,) int, the item of each token in [0, num_items), -1 for tokens of no item.
        """
        attention = _attention("attention", attention, (1,))
        num_items = check_int("num_items", num_items, 1, numpy_ints=True)
        items = _token_to_item(token_to_item, attention.shape[0], num_items, "attention")
        keep = items >= 0
        return self.from_scores(np.bincount(items[keep], weights=attention[keep], minlength=num_items))

    @_form("keyword")
    def from_attention_matrix(self, attention, token_to_item, num_items):
        """Feedback from a full attention matrix (Tq, Tk): rows are the answer's tokens, columns the context tokens.

        An item's mass is the attention of its columns summed per row and averaged over the rows (the meaning of
        `hybridrag.attention_mass`). token_to_item: (Tk,) as in `from_token_attention`. Memory: the matrix itself.
        """
        attention = _attention("attention", attention, (2,))
        num_items = check_int("num_items", num_items, 1, numpy_ints=True)
        _token_to_item(token_to_item, attention.shape[1], num_items, "attention")
        return self.from_token_attention(attention.mean(axis=0), token_to_item, num_items)

    @_form("keyword")
    def from_model(self, q, k, segments, num_segments, window, *, answer_mask=None, landmarks=None,
                   global_queries=True, causal=True, scale=None, backend="auto"):
        """Feedback (B, S) from queries and keys without an attention matrix, via `hybridrag.attention_mass`.

        q (B, H, Tq, D), k (B, Hkv, Tk, D), segments (B, Tk) int item id per key (-1 = none), num_segments S, and
        the attention pattern (window, landmarks, global_queries, causal, scale, backend) as in `hybrid_attention`.
        answer_mask: (B, Tq) bool, the answer's query rows (default all rows); each batch row needs at least one.
        The mass is attention_mass averaged over the H heads. Memory: (B, H, Tq) float32 log-sum-exps and (B, H, S).
        """
        import hybridrag as hr

        if (isinstance(answer_mask, torch.Tensor) and answer_mask.dtype == torch.bool and isinstance(q, torch.Tensor)
                and q.dim() == 4 and tuple(answer_mask.shape) == (q.shape[0], q.shape[2])):
            empty = (~answer_mask.any(dim=-1)).nonzero().flatten().tolist()
            if empty:  # attention_mass would give these rows zeros, which would read as "every item ignored"
                raise ValueError(f"answer_mask selects no query row in batch rows {empty}: there is no answer to "
                                 "take feedback from")
        mass = hr.attention_mass(q, k, segments, num_segments, window, landmarks=landmarks,
                                 global_queries=global_queries, query_mask=answer_mask, causal=causal, scale=scale,
                                 backend=backend)
        return self.from_scores(mass.float().mean(dim=1))

    @_form("keyword")
    def from_embeddings(self, answer_embedding, item_embeddings, *, temperature=0.1):
        """Fallback without attention: the answer "attends" to the items by embedding similarity.

        answer_embedding (d,), item_embeddings (S, d). The mass is softmax(cos(answer, item_i) / temperature) (the
        attention a query with those cosine logits would pay), then the same shares and mapping as attention.
        With temperature 0.1, a cosine higher by 0.1 weighs e times more.
        """
        answer = _to_numpy("answer_embedding", answer_embedding)
        items = _to_numpy("item_embeddings", item_embeddings)
        if answer.ndim != 1 or items.ndim != 2 or items.shape[1] != answer.shape[0] or 0 in items.shape:
            raise ValueError(f"answer_embedding must be (d,) and item_embeddings (S, d) with S, d >= 1, got shapes "
                             f"{answer.shape} and {items.shape}")
        for name, array in (("answer_embedding", answer), ("item_embeddings", items)):
            if array.dtype.kind not in "iuf":
                raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
            if not np.isfinite(array).all():
                raise ValueError(f"{name} has NaN or inf values")
        temperature = _number("temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        answer, items = answer.astype(np.float64), items.astype(np.float64)
        norms = np.linalg.norm(items, axis=1) * np.linalg.norm(answer)
        if (norms == 0).any():
            raise ValueError("answer_embedding and item_embeddings must be non-zero vectors (cosine similarity)")
        logits = items @ answer / norms / temperature
        return self.from_scores(np.exp(logits - logits.max()))

    @_form("keyword")
    def extract(self, *, scores=None, token_attention=None, attention_matrix=None, token_to_item=None,
                num_items=None, answer_embedding=None, item_embeddings=None):
        """One entry point: the attention form given (at most one of scores, token_attention, attention_matrix;
        the last two with token_to_item and num_items), else the embedding fallback (answer_embedding and
        item_embeddings). Embeddings are ignored when attention is given."""
        given = [name for name, value in (("scores", scores), ("token_attention", token_attention),
                                          ("attention_matrix", attention_matrix)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"pass one attention form, got {' and '.join(given)}")
        if given and given[0] != "scores" and (token_to_item is None or num_items is None):
            raise ValueError(f"{given[0]} needs token_to_item and num_items")
        if scores is not None:
            return self.from_scores(scores)
        if token_attention is not None:
            return self.from_token_attention(token_attention, token_to_item, num_items)
        if attention_matrix is not None:
            return self.from_attention_matrix(attention_matrix, token_to_item, num_items)
        if answer_embedding is None or item_embeddings is None:
            raise ValueError("no attention was given, and the embedding fallback needs answer_embedding and "
                             "item_embeddings")
        return self.from_embeddings(answer_embedding, item_embeddings)


class WeightUpdater:
    """Per-item weights moved by feedback, in two forms chosen by the constructor.

    Keyword form, WeightUpdater(*, method="ema", rate=0.1, bounds=(0.1, 10.0), initial=1.0): weights held here,
    moved by feedback in [-1, 1] and used to re-rank retrieval scores. Update of an item's weight w by feedback f,
    then clipped to `bounds`:
        ema:            w <- (1 - rate) * w + rate * initial * (1 + f)   (converges to initial * (1 + f) under a
                                                                          repeated f; neutral feedback 0 pulls back
                                                                          towards initial)
        additive:       w <- w + rate * f
        multiplicative: w <- w * exp(rate * f)
    Ranking: adjusted = score + log(w), i.e. the item's softmax weight exp(score) is multiplied by w. Unlike
    score * w this is monotone in w for negative inner-product scores too; w = 1 leaves a score unchanged.
        method: "ema", "additive" or "multiplicative".
        rate: step size in (0, 1] for ema, > 0 otherwise.
        bounds: (low, high) with 0 < low <= initial <= high.
        initial: the weight of an item never updated.
    Item ids are str or int (numpy ints become int); state_dict() is JSON-serialisable when the ids are str.

    Seed form, WeightUpdater(graph, {"strategy": "ema", "update_alpha": 0.1}): seed 004's contract, weights stored in
    the graph (async get_node / upsert_node, e.g. HyperedgeGraph) and `await update_weights(id, signal)` with signal
    in [0, 1]: weight <- (1 - update_alpha) * weight + update_alpha * signal; see hybridrag.retention.seed_weights.

    A method of one form called on an object of the other raises a TypeError.
    """
    _FORMS = {"keyword": "WeightUpdater(*, method, rate, bounds, initial)", "seed": "WeightUpdater(graph, config)"}

    def __init__(self, graph=None, config=None, /, *, method=None, rate=None, bounds=None, initial=None):
        keywords = dict(method=method, rate=rate, bounds=bounds, initial=initial)
        if _seed_form(type(self), graph, config, keywords):
            self._seed = SeedWeights(graph, config)
            return
        self._seed = None
        method, rate = ("ema" if method is None else method), (0.1 if rate is None else rate)
        bounds, initial = ((0.1, 10.0) if bounds is None else bounds), (1.0 if initial is None else initial)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        rate = _number("rate", rate)
        if not (0 < rate <= 1 if method == "ema" else rate > 0):
            raise ValueError(f"rate must be {'in (0, 1]' if method == 'ema' else '> 0'} for method {method!r}, "
                             f"got {rate}")
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise TypeError(f"bounds must be a (low, high) pair, got {bounds!r}")
        low, high = _number("bounds[0]", bounds[0]), _number("bounds[1]", bounds[1])
        initial = _number("initial", initial)
        if not 0 < low <= initial <= high:
            raise ValueError(f"need 0 < low <= initial <= high, got bounds=({low}, {high}) and initial={initial}")
        self.method, self.rate, self.bounds, self.initial = method, rate, (low, high), initial
        self._weights = {}

    @_form("seed")
    async def update_weights(self, hyperedge_id, signal):
        """Seed form: move the graph's weight of hyperedge_id (str) by signal in [0, 1]; returns the new weight."""
        return await self._seed.update(hyperedge_id, signal)

    @_form("keyword")
    def __len__(self):
        return len(self._weights)

    def __repr__(self):
        if self._seed is not None:
            return repr(self._seed)
        return (f"WeightUpdater(method={self.method!r}, rate={self.rate}, bounds={self.bounds}, "
                f"initial={self.initial}, items={len(self)})")

    @_form("keyword")
    def weight(self, ids):
        """float64 (n,) weights of `ids` (initial for items never updated)."""
        return np.array([self._weights.get(key, self.initial) for key in self._ids(ids)], dtype=np.float64)

    @_form("keyword")
    def update(self, ids, feedback):
        """Apply feedback (n,) in [-1, 1] to the n distinct `ids`; returns their new weights float64 (n,)."""
        ids = self._ids(ids)
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be distinct within one update; update once per answer")
        feedback = _to_numpy("feedback", feedback)
        if feedback.dtype.kind not in "iuf" or feedback.shape != (len(ids),):
            raise ValueError(f"feedback must be a real ({len(ids)},) array (one value per id), got dtype "
                             f"{feedback.dtype} and shape {feedback.shape}")
        feedback = feedback.astype(np.float64)
        if not (np.isfinite(feedback).all() and (np.abs(feedback) <= 1).all()):
            raise ValueError(f"feedback must be finite and in [-1, 1], got {feedback.min()} .. {feedback.max()}")
        weights = self.weight(ids)
        if self.method == "ema":
            weights = (1 - self.rate) * weights + self.rate * self.initial * (1 + feedback)
        elif self.method == "additive":
            weights = weights + self.rate * feedback
        else:
            weights = weights * np.exp(self.rate * feedback)
        weights = np.clip(weights, *self.bounds)
        self._weights.update(zip(ids, weights.tolist()))
        return weights

    @_form("keyword")
    def apply(self, ids, scores):
        """Re-rank: (ids, adjusted scores float64), best first, with adjusted = score + log(weight).

        ids: n item ids; scores: (n,) finite. Ties keep the input order. ids come back as a list.
        """
        ids = self._ids(ids)
        scores = _to_numpy("scores", scores)
        if scores.dtype.kind not in "iuf" or scores.shape != (len(ids),):
            raise ValueError(f"scores must be a real ({len(ids)},) array (one per id), got dtype {scores.dtype} and "
                             f"shape {scores.shape}")
        if not np.isfinite(scores).all():
            raise ValueError("scores has NaN or inf values")
        adjusted = scores.astype(np.float64) + np.log(self.weight(ids))
        order = np.argsort(-adjusted, kind="stable")
        return [ids[i] for i in order], adjusted[order]

    @_form("keyword")
    def state_dict(self):
        """The configuration and every stored weight."""
        return {"method": self.method, "rate": self.rate, "bounds": list(self.bounds), "initial": self.initial,
                "weights": dict(self._weights)}

    @_form("keyword")
    def load_state_dict(self, state):
        """Replace the weights by those of `state` (from state_dict); its configuration must equal this one's."""
        if not isinstance(state, dict) or "weights" not in state:
            raise TypeError(f"state must be a dict from WeightUpdater.state_dict(), got {type(state).__name__}")
        for name, mine in (("method", self.method), ("rate", self.rate), ("bounds", list(self.bounds)),
                           ("initial", self.initial)):
            if state.get(name) != mine:
                raise ValueError(f"state has {name}={state.get(name)!r} but this updater has {name}={mine!r}")
        ids = self._ids(list(state["weights"]))
        weights = np.array([state["weights"][key] for key in state["weights"]], dtype=np.float64)
        low, high = self.bounds
        if not (np.isfinite(weights).all() and ((weights >= low) & (weights <= high)).all()):
            raise ValueError(f"state weights must be finite and within bounds {self.bounds}")
        self._weights = dict(zip(ids, weights.tolist()))

    @staticmethod
    def _ids(ids):
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"ids must be a sequence of item ids, got {type(ids).__name__}")
        out = []
        for position, key in enumerate(ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else ids):
            if isinstance(key, np.integer):
                key = int(key)
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"ids[{position}] must be a str or an int, got {type(key).__name__}")
            out.append(key)
        return out
