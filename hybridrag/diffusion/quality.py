"""Judging generated embeddings: a quality filter (relevance to the condition, novelty against the corpus, a score
threshold), precision and recall against real embeddings (k-NN manifolds), the Frechet distance, and the hand-over
of accepted samples to a knowledge base and a ContinualLearner.

Inputs are torch tensors or numpy arrays of floats; everything is computed in float64 on the CPU. A NaN or inf row,
an empty set or a dimension mismatch is a ValueError naming the argument.
"""
import re
from typing import NamedTuple

import numpy as np
import torch

SYNTHETIC = "synthetic"  # the metadata flag of synthetic documents in a knowledge base
_BLOCK_ELEMENTS = 1 << 22  # pairwise-distance blocks hold at most this many float64 (32 MiB)


def _as_matrix(name, x, *, min_rows=1, dim=None, allow_vector=False):
    """x as a float64 CPU tensor (N, d) (or (d,) when allow_vector); ValueError/TypeError naming `name`."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")
    if not (x.dtype.is_floating_point or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold numbers, got {x.dtype}")
    shape = "(d,) or (N, d)" if allow_vector else "(N, d)"
    if x.dim() != 2 and not (allow_vector and x.dim() == 1):
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.shape[-1] == 0 or (x.dim() == 2 and x.shape[0] < min_rows):
        raise ValueError(f"{name} must hold at least {min_rows} row(s) of at least 1 value, got shape "
                         f"{tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[-1]} but samples have {dim}")
    x = x.detach().to("cpu", torch.float64)
    finite = torch.isfinite(x).reshape(-1, x.shape[-1]).all(dim=1)
    if not finite.all():
        raise ValueError(f"{name} row {int(torch.nonzero(~finite)[0, 0])} holds NaN or inf values")
    return x


def _unit(name, x):
    """Rows of x scaled to norm 1; a zero row (no direction, so no cosine) is a ValueError."""
    norms = x.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        row = int(torch.nonzero(norms.reshape(-1) == 0)[0, 0])
        raise ValueError(f"{name} row {row} is all zeros: its cosine similarity is undefined")
    return x / norms


def _check_bound(name, value, low=-1.0, high=1.0):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be None or a number in [{low}, {high}], got {value!r}")
    return float(value)


class FilterResult(NamedTuple):
    """What filter_samples found, per sample (N,) float64 except `accepted`.

    accepted: int64 indices of the accepted samples, ascending.
    score: similarity * (1 - max(corpus_similarity, 0)): relevance discounted by redundancy (= similarity without a
        corpus).
    similarity: cosine similarity to the condition.
    corpus_similarity: the largest cosine similarity to a corpus vector (-inf without a corpus).
    copy_bound: with authentic=True, the cosine similarity of the sample's nearest corpus vector to that vector's own
        nearest other corpus vector (a sample more similar than this is a copy); NaN otherwise.
    """

    accepted: torch.Tensor
    score: torch.Tensor
    similarity: torch.Tensor
    corpus_similarity: torch.Tensor
    copy_bound: torch.Tensor


def filter_samples(samples, condition, corpus=None, *, min_similarity=None, max_corpus_similarity=None,
                   threshold=None, authentic=False, corpus_neighbour_similarity=None):
    """Accept generated vectors that are relevant to their condition and new to the corpus.

    samples: (N, d). condition: (d,) shared by all, or (N, d) one per sample. corpus: None or (M, d) (what the
    store already holds). A sample is accepted when every criterion that is set holds:
    similarity >= min_similarity, corpus_similarity <= max_corpus_similarity (novelty), score >= threshold
    (see FilterResult; bounds are numbers in [-1, 1], None = not checked), and with authentic=True,
    corpus_similarity <= copy_bound.

    authentic: the copy test of Alaa et al. 2022 ("How faithful is your synthetic data?"): a sample is a copy when it
        is more similar to its nearest corpus vector than that vector is to its own nearest other corpus vector.
        The bound adapts to the corpus's density, where one fixed max_corpus_similarity either lets near-copies in
        dense regions through or refuses new points in sparse ones. Needs a corpus of at least 2 rows (or 1 with
        corpus_neighbour_similarity).
    corpus_neighbour_similarity: None, or (M,) each corpus row's cosine similarity to its nearest other row in the
        whole store, for when `corpus` is only part of it (e.g. the samples' nearest neighbours found by an index);
        None computes it within `corpus`.
    Cosine similarities throughout; a zero vector anywhere is a ValueError. Memory: an N x M float64 similarity
    matrix; authentic=True without corpus_neighbour_similarity adds blocks of the M x M one (<= 32 MiB), time
    O(M^2 d).
    """
    samples = _as_matrix("samples", samples)
    n, d = samples.shape
    condition = _as_matrix("condition", condition, dim=d, allow_vector=True)
    if condition.dim() == 2 and condition.shape[0] != n:
        raise ValueError(f"condition must be (d,) or have one row per sample ({n}), got {condition.shape[0]} rows")
    min_similarity = _check_bound("min_similarity", min_similarity)
    max_corpus_similarity = _check_bound("max_corpus_similarity", max_corpus_similarity)
    threshold = _check_bound("threshold", threshold)
    if not isinstance(authentic, bool):
        raise TypeError(f"authentic must be True or False, got {authentic!r}")
    if authentic and (corpus is None or (_rows(corpus) < 2 and corpus_neighbour_similarity is None)):
        raise ValueError("authentic=True compares each sample with its nearest corpus vector's own nearest "
                         f"neighbour: it needs a corpus of at least 2 rows, got "
                         f"{'none' if corpus is None else _rows(corpus)}")
    if corpus_neighbour_similarity is not None and not authentic:
        raise ValueError("corpus_neighbour_similarity is used by the copy test only: pass authentic=True with it")
    unit = _unit("samples", samples)
    similarity = (unit * _unit("condition", condition).expand(n, d)).sum(dim=1).clamp(-1, 1)
    copy_bound = torch.full((n,), torch.nan, dtype=torch.float64)
    if corpus is None:
        corpus_similarity = torch.full((n,), -torch.inf, dtype=torch.float64)
    else:
        corpus = _unit("corpus", _as_matrix("corpus", corpus, dim=d))
        corpus_similarity, nearest = (unit @ corpus.T).max(dim=1)
        corpus_similarity = corpus_similarity.clamp(-1, 1)
        if authentic:
            copy_bound = _neighbour_similarity(corpus, corpus_neighbour_similarity)[nearest]
    score = similarity * (1 - corpus_similarity.clamp(min=0))
    keep = torch.ones(n, dtype=torch.bool)
    if min_similarity is not None:
        keep &= similarity >= min_similarity
    if max_corpus_similarity is not None:
        keep &= corpus_similarity <= max_corpus_similarity
    if threshold is not None:
        keep &= score >= threshold
    if authentic:
        keep &= corpus_similarity <= copy_bound
    return FilterResult(torch.nonzero(keep).reshape(-1), score, similarity, corpus_similarity, copy_bound)


def _rows(x):
    return x.shape[0] if getattr(x, "ndim", 0) == 2 else 0


def _neighbour_similarity(corpus, given):
    """(M,) each unit corpus row's cosine similarity to its nearest other row: `given` checked, or computed in row
    blocks (a duplicate row counts as a neighbour at similarity 1)."""
    m = corpus.shape[0]
    if given is not None:
        given = _as_matrix("corpus_neighbour_similarity", given, allow_vector=True)
        if given.dim() != 1 or given.shape[0] != m:
            raise ValueError(f"corpus_neighbour_similarity must have shape ({m},), one value per corpus row, got "
                             f"{tuple(given.shape)}")
        if given.abs().max() > 1:
            raise ValueError("corpus_neighbour_similarity holds cosine similarities: values in [-1, 1]")
        return given
    rows = max(1, _BLOCK_ELEMENTS // m)
    parts = []
    for start in range(0, m, rows):
        block = corpus[start:start + rows] @ corpus.T
        block[torch.arange(block.shape[0]), torch.arange(start, start + block.shape[0])] = -torch.inf
        parts.append(block.amax(dim=1).clamp(-1, 1))
    return torch.cat(parts)


def _distances_to(x, y, reduce):
    """Euclidean distances of x (n, d) to y (m, d) in row blocks, each passed to reduce(block (b, m)) -> (b, ...);
    returns the concatenation. Exact (no |x|^2 - 2xy + |y|^2 cancellation), so identical points are at 0."""
    rows = max(1, _BLOCK_ELEMENTS // y.shape[0])
    parts = []
    for start in range(0, x.shape[0], rows):
        block = torch.cdist(x[start:start + rows], y, compute_mode="donot_use_mm_for_euclid_dist")
        parts.append(reduce(block))
    return torch.cat(parts)


def _knn_radii(x, k):
    """Distance from each row of x to its k-th nearest other row (the row itself excluded, duplicates counted)."""
    return _distances_to(x, x, lambda block: block.topk(k + 1, dim=1, largest=False).values[:, k])


def _coverage(points, centers, radii):
    """Fraction of points that lie in at least one ball (centers (m, d), radii (m,))."""
    inside = _distances_to(points, centers, lambda block: (block <= radii[None]).any(dim=1))
    return float(inside.to(torch.float64).mean())


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake (M, d) against real (N, d).

    Each set's manifold is the union of balls around its points, each ball's radius the distance to the point's k-th
    nearest neighbour in its own set. precision = the fraction of fake points inside the real manifold (fidelity);
    recall = the fraction of real points inside the fake manifold (coverage). Both in [0, 1]; needs N, M > k.
    Returns {"precision": float, "recall": float}. Memory: blocks of pairwise distances (<= 32 MiB), time O(N M d).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    real = _as_matrix("real", real, min_rows=k + 1)
    fake = _as_matrix("fake", fake, min_rows=k + 1, dim=real.shape[1])
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return {"precision": precision, "recall": recall}


def _sqrt_psd(matrix):
    """The symmetric square root of a symmetric positive semi-definite float64 matrix (eigh; negative rounding
    eigenvalues set to 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(real, fake):
    """The Frechet distance between Gaussians fitted to real (N, d) and fake (M, d) (N, M >= 2):
    |mu_r - mu_f|^2 + Tr(C_r + C_f - 2 (C_r C_f)^(1/2)), covariances with the N - 1 denominator (as FID).

    The trace of the matrix square root is computed by eigen-decompositions in float64, never with scipy.linalg.sqrtm:
    Tr (C_r C_f)^(1/2) = sum_i sqrt(lambda_i(S C_f S)) with S = C_r^(1/2) (C_r C_f is similar to the symmetric
    S C_f S, whose eigenvalues are real and >= 0), so singular covariances (d > N) need no offset and give no
    complex parts. Returns a float >= 0 (rounding clamped). Memory and time: O(d^2) and O(d^3 + (N + M) d^2).
    """
    real = _as_matrix("real", real, min_rows=2)
    fake = _as_matrix("fake", fake, min_rows=2, dim=real.shape[1])
    mu_r, mu_f = real.mean(dim=0), fake.mean(dim=0)
    cov_r, cov_f = torch.cov(real.T).reshape(real.shape[1], -1), torch.cov(fake.T).reshape(real.shape[1], -1)
    root = _sqrt_psd(cov_r)
    middle = root @ cov_f @ root
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_r - mu_f).pow(2).sum() + torch.trace(cov_r) + torch.trace(cov_f) - 2 * trace_sqrt
    return max(float(distance), 0.0)


# ---------------------------------------------------------------- hand-over


def hand_over(result, *, texts=None, samples=None, conditions=None, knowledge_base=None, learner=None,
              id_prefix=SYNTHETIC, metadata=None):
    """Give the samples that `result` (a FilterResult) accepted to a knowledge base and/or a ContinualLearner.

    knowledge_base: a hybridrag.retrieval.KnowledgeBase; needs `texts` (one str per sample, e.g. the text model's
        decoded outputs). Each accepted text becomes a Document with id "<id_prefix>-<n>" (n counts on from the
        largest such id already there) and metadata {"synthetic": True, "score", "similarity", plus `metadata`}; the
        knowledge base encodes it with its own encoder, as every document. List them with synthetic_ids(kb) and
        remove them with kb.remove(synthetic_ids(kb)). Generated vectors cannot go in: KnowledgeBase.add encodes
        text and takes no precomputed vectors.
    learner: a hybridrag.retention.ContinualLearner whose retriever is in features mode; needs `conditions`
        (N, input_dim) (the query embeddings) and `samples` (N, input_dim): each accepted (condition, sample) pair
        is observed as a (query, positive) example with source "synthetic" (`learner.sources()` counts them,
        `learner.remove("synthetic")` drops them).
    Returns {"document_ids": [...], "observed": int, "dropped": int (examples the learner's full buffer pushed
    out)}. Nothing is given when nothing was accepted.
    """
    if not isinstance(result, FilterResult):
        raise TypeError(f"result must be the FilterResult of filter_samples, got {type(result).__name__}")
    if knowledge_base is None and learner is None:
        raise ValueError("hand_over needs a knowledge_base, a learner or both; got neither")
    count = result.score.shape[0]
    accepted = result.accepted.tolist()
    out = {"document_ids": [], "observed": 0, "dropped": 0}
    if learner is not None:
        pairs = _learner_pairs(learner, samples, conditions, count)  # checked before the knowledge base changes
    if knowledge_base is not None:
        documents = _synthetic_documents(knowledge_base, result, texts, count, accepted, id_prefix, metadata)
        if documents:
            knowledge_base.add(documents)
        out["document_ids"] = [d.id for d in documents]
    if learner is not None and accepted:
        queries, positives = pairs
        index = torch.tensor(accepted, dtype=torch.long)
        out["dropped"] = learner.observe(queries[index], positives[index], source=SYNTHETIC)
        out["observed"] = len(accepted)
    return out


def synthetic_ids(knowledge_base, id_prefix=None):
    """The ids of the knowledge base's synthetic documents (metadata "synthetic" is True), optionally only those
    whose id starts with "<id_prefix>-"."""
    return [d.id for d in knowledge_base.documents if d.metadata.get(SYNTHETIC) is True
            and (id_prefix is None or d.id.startswith(f"{id_prefix}-"))]


def _learner_pairs(learner, samples, conditions, count):
    from ..retention.continual import ContinualLearner

    if not isinstance(learner, ContinualLearner):
        raise TypeError(f"learner must be a ContinualLearner, got {type(learner).__name__}")
    if learner.retriever.mode != "features":
        raise ValueError("learner's retriever must be in features mode (input_dim) to learn from generated vectors, "
                         f"got mode {learner.retriever.mode!r}")
    if samples is None or conditions is None:
        raise ValueError("a learner needs samples and conditions (the generated vectors and their query "
                         "embeddings), got " + ("samples=None" if samples is None else "conditions=None"))
    pairs = []
    for name, x in (("conditions", conditions), ("samples", samples)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != count:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a tensor (N={count}, d) matching the filtered samples, got {shape}")
        pairs.append(x.detach())
    queries, positives = pairs
    learner.retriever._check_inputs("conditions", queries)  # what observe checks, before anything changes
    learner.retriever._check_inputs("samples", positives, rows=count)
    return pairs


def _synthetic_documents(knowledge_base, result, texts, count, accepted, id_prefix, metadata):
    from ..retrieval.documents import Document

    if texts is None:
        raise ValueError("a knowledge_base needs texts (one str per sample): KnowledgeBase.add encodes document text "
                         "with its own encoder and takes no precomputed vectors, so generated embeddings alone "
                         "cannot be stored")
    if isinstance(texts, str) or len(texts) != count:
        raise ValueError(f"texts must be a list of {count} str (one per filtered sample), got "
                         f"{'a str' if isinstance(texts, str) else len(texts)}")
    if not isinstance(id_prefix, str) or not id_prefix:
        raise ValueError(f"id_prefix must be a non-empty str, got {id_prefix!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be None or a dict, got {type(metadata).__name__}")
    pattern = re.compile(re.escape(id_prefix) + r"-(\d+)")
    numbers = [int(m.group(1)) for d in knowledge_base.documents if (m := pattern.fullmatch(d.id))]
    start = max(numbers, default=-1) + 1
    documents = []
    for n, i in enumerate(accepted):
        if not isinstance(texts[i], str):
            raise TypeError(f"texts[{i}] must be a str, got {type(texts[i]).__name__}")
        if not texts[i].strip():
            raise ValueError(f"texts[{i}] (an accepted sample) is empty or whitespace only: there is nothing to index")
        fields = {**(metadata or {}), SYNTHETIC: True, "score": float(result.score[i]),
                  "similarity": float(result.similarity[i])}
        documents.append(Document(f"{id_prefix}-{start + n}", texts[i], metadata=fields))
    return documents
