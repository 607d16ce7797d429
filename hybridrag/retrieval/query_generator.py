"""Task-conditioned retrieval queries from a model's hidden states, and fusion of what the queries retrieve."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.common import (_check_backend, _check_hidden_states, _check_positive_int, _head_layout, _merge_heads,
                         _qkvo_projections, _split_heads)
from ..ops.hybrid import hybrid_attention
from .fusion import reciprocal_rank_fusion

FUSIONS = ("rrf", "max", "mean")


class DynamicQueryGenerator(nn.Module):
    """num_queries learned query slots, conditioned on a task embedding, read the hidden states with multi-head
    attention and become L2-normalised retrieval query vectors.

        seed[b, s] = slots[s] + task_embedding[task_ids[b]]                       (B, S, hidden)
        x = seed + o_proj(attention(q_proj(seed), k_proj(hidden_states), v_proj(hidden_states)))
        queries = normalize(out_proj(layer_norm(x)))                              (B, S, query_dim)

    The attention is `hybridrag.hybrid_attention(q, k, v, window=(-1, -1), causal=False, kv_start=...)`: every slot
    sees every real token (with an unbounded two-sided window, the alignment of the S query rows to the end of the
    T keys does not matter). Padding (attention_mask False) is handled exactly: since every slot sees every key and
    the attention is invariant to the order of keys, each row's keys are permuted (stable) so its padding comes first,
    and kv_start[b] = number of padded keys hides them. Any padding pattern works (right, left or scattered); padded
    hidden states are zeroed first, so NaN/inf there cannot leak.

    Args:
        hidden_size: width of hidden_states. query_dim: size of the query vectors.
        num_queries: S, the query slots. num_heads: attention heads. head_dim: per head (default
            hidden_size // num_heads; must be in the kernels' range 16..256).
        num_tasks: size of the task embedding table; task_ids index it.
        bias: bias on the q/k/v/o projections.
        backend: passed to hybrid_attention ("auto", "triton", "cpu", "reference").
        device, dtype: for the parameters.

    Shapes:
        forward(hidden_states (B, T, hidden_size) in the parameters' dtype, task_ids (B,) integer or None (allowed
        only when num_tasks == 1), attention_mask (B, T) bool or None (True = real token; every row needs one))
        -> (B, S, query_dim), unit rows, in the parameters' dtype.

    Memory: q (B, H, S, D), k and v (B, H, T, D) (plus a permuted copy of them when a mask has padding); the kernel
    never builds an S x T matrix.
    """

    def __init__(self, hidden_size, query_dim, *, num_queries=4, num_heads=4, head_dim=None, num_tasks=1, bias=False,
                 backend="auto", device=None, dtype=None):
        super().__init__()
        _, head_dim = _head_layout(hidden_size, num_heads, None, head_dim)
        _check_positive_int("query_dim", query_dim)
        _check_positive_int("num_queries", num_queries)
        _check_positive_int("num_tasks", num_tasks)
        _check_backend(backend)
        self.hidden_size, self.query_dim, self.num_queries = hidden_size, query_dim, num_queries
        self.num_heads, self.head_dim, self.num_tasks, self.backend = num_heads, head_dim, num_tasks, backend
        factory = {"device": device, "dtype": dtype}
        self.slots = nn.Parameter(torch.randn(num_queries, hidden_size, **factory))
        self.task_embedding = nn.Embedding(num_tasks, hidden_size, **factory)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = _qkvo_projections(
            hidden_size, num_heads, num_heads, head_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(hidden_size, **factory)
        self.out_proj = nn.Linear(hidden_size, query_dim, **factory)

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, query_dim={self.query_dim}, num_queries={self.num_queries}, "
                f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_tasks={self.num_tasks}, "
                f"backend={self.backend!r}")

    def _check_inputs(self, hidden_states, task_ids, attention_mask):
        _check_hidden_states(hidden_states, self.hidden_size)
        batch, length, _ = hidden_states.shape
        if batch == 0 or length == 0:
            raise ValueError(f"hidden_states needs B, T >= 1, got shape {tuple(hidden_states.shape)}")
        if hidden_states.dtype != self.slots.dtype:
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the parameters have "
                            f"{self.slots.dtype}; pass one dtype")
        if hidden_states.device != self.slots.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but the parameters are on "
                             f"{self.slots.device}")
        if task_ids is None:
            if self.num_tasks != 1:
                raise ValueError(f"task_ids is required when num_tasks > 1 (num_tasks={self.num_tasks})")
            task_ids = torch.zeros(batch, dtype=torch.long, device=hidden_states.device)
        elif not isinstance(task_ids, torch.Tensor) or task_ids.dtype.is_floating_point \
                or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
            detail = f"dtype {task_ids.dtype}" if isinstance(task_ids, torch.Tensor) else type(task_ids).__name__
            raise TypeError(f"task_ids must be an integer tensor or None, got {detail}")
        elif task_ids.shape != (batch,) or task_ids.device != hidden_states.device:
            raise ValueError(f"task_ids must have shape ({batch},) on {hidden_states.device}, got "
                             f"{tuple(task_ids.shape)} on {task_ids.device}")
        elif task_ids.min().item() < 0 or task_ids.max().item() >= self.num_tasks:
            raise ValueError(f"task_ids must lie in [0, {self.num_tasks}), got {task_ids.min().item()} .. "
                             f"{task_ids.max().item()}")
        if attention_mask is None:
            return task_ids, None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
            detail = f"dtype {attention_mask.dtype}" if isinstance(attention_mask, torch.Tensor) \
                else type(attention_mask).__name__
            raise TypeError(f"attention_mask must be a bool tensor (True = real token) or None, got {detail}")
        if attention_mask.shape != (batch, length) or attention_mask.device != hidden_states.device:
            raise ValueError(f"attention_mask must have shape ({batch}, {length}) on {hidden_states.device}, got "
                             f"{tuple(attention_mask.shape)} on {attention_mask.device}")
        empty = ~attention_mask.any(dim=1)
        if empty.any():
            raise ValueError(f"attention_mask row {torch.nonzero(empty)[0].item()} has no real token; every row "
                             "needs at least one")
        return task_ids, attention_mask

    def forward(self, hidden_states, task_ids=None, attention_mask=None):
        task_ids, attention_mask = self._check_inputs(hidden_states, task_ids, attention_mask)
        kv_start = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # padding first in each row (stable), then hidden from every slot through kv_start
            order = torch.argsort(attention_mask.to(torch.int8), dim=1, stable=True)  # (B, T)
            hidden_states = hidden_states.masked_fill(~attention_mask[..., None], 0)
            hidden_states = hidden_states.gather(1, order[..., None].expand_as(hidden_states))
            kv_start = (~attention_mask).sum(dim=1)
        seed = self.slots[None] + self.task_embedding(task_ids)[:, None]  # (B, S, hidden)
        q = _split_heads(self.q_proj(seed), self.num_heads, self.head_dim)  # (B, H, S, D)
        k = _split_heads(self.k_proj(hidden_states), self.num_heads, self.head_dim)  # (B, H, T, D)
        v = _split_heads(self.v_proj(hidden_states), self.num_heads, self.head_dim)
        o = hybrid_attention(q, k, v, (-1, -1), causal=False, kv_start=kv_start, backend=self.backend)
        x = seed + self.o_proj(_merge_heads(o))
        return F.normalize(self.out_proj(self.norm(x)), dim=-1)

    @staticmethod
    def fuse(scores, ids, k, fusion="rrf", rrf_k=60):
        """`fuse_rankings` (below): S rankings per batch row -> (scores (B, k), ids (B, k))."""
        return fuse_rankings(scores, ids, k, fusion, rrf_k)

    @staticmethod
    def retrieve(query_vectors, search_fn, k, *, fusion="rrf", depth=None, rrf_k=60):
        """Search with each of the S query vectors of every batch row, then fuse the S rankings per row.

        Args:
            query_vectors: (B, S, d) tensor (e.g. forward's output; detached here) or float array.
            search_fn: `search_fn(vectors float32 (n, d), depth) -> (scores (n, w), ids (n, w) int)` with
                w <= depth, the `VectorIndex.search` contract (w = min(depth, index size); id -1 = empty slot).
                Called once with all B * S vectors.
            k: results per batch row. depth: results asked per query vector (default k).
            fusion, rrf_k: see `fuse_rankings`.
        Returns:
            (scores float32 (B, k), ids int64 (B, k)), best first; missing slots id -1, score -inf.
        """
        if isinstance(query_vectors, torch.Tensor):
            query_vectors = query_vectors.detach().to("cpu", torch.float32).numpy()
        query_vectors = np.asarray(query_vectors)
        if query_vectors.ndim != 3 or 0 in query_vectors.shape or query_vectors.dtype.kind != "f":
            raise ValueError(f"query_vectors must be a float (B, S, d) array or tensor with no empty dim, got shape "
                             f"{query_vectors.shape} dtype {query_vectors.dtype}")
        if not callable(search_fn):
            raise TypeError(f"search_fn must be callable, got {type(search_fn).__name__}")
        depth = k if depth is None else depth
        _check_positive_int("depth", depth)
        batch, slots, dim = query_vectors.shape
        flat = np.ascontiguousarray(query_vectors.reshape(batch * slots, dim), dtype=np.float32)
        scores, ids = search_fn(flat, depth)
        scores, ids = np.asarray(scores), np.asarray(ids)
        if scores.ndim != 2 or scores.shape != ids.shape or scores.shape[0] != batch * slots \
                or not 1 <= scores.shape[1] <= depth:
            raise ValueError(f"search_fn must return scores and ids of one shape ({batch * slots}, w) with "
                             f"1 <= w <= {depth}, got {scores.shape} and {ids.shape}")
        width = scores.shape[1]
        return fuse_rankings(scores.reshape(batch, slots, width), ids.reshape(batch, slots, width), k, fusion, rrf_k)


def fuse_rankings(scores, ids, k, fusion="rrf", rrf_k=60):
    """Fuse S rankings per batch row into one.

    Args:
        scores: (B, S, n) float, each ranking best first; ids: (B, S, n) int, -1 = empty slot (ignored). An id
            repeated inside one ranking counts at its first occurrence only.
        k: results per row.
        fusion: "rrf": `reciprocal_rank_fusion` of hybridrag.retrieval.fusion, sum over rankings of 1 / (rrf_k + rank),
            rank 1-based (scores unused); "max": the best score the id got in any ranking; "mean": the sum of the
            scores the id got divided by S (a ranking that did not return the id adds 0, so agreement between the
            queries counts; meant for similarity scores >= 0, such as cosines of related vectors).
        rrf_k: the RRF constant, > 0.
    Returns:
        (scores float32 (B, k), ids int64 (B, k)): best first; ties go to the id with the better best rank, then to
        the id met first reading the rankings in order; missing slots id -1, score -inf.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    _check_positive_int("k", k)
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, (int, float)) or not 0 < rrf_k < float("inf"):
        raise ValueError(f"rrf_k must be a finite number > 0, got {rrf_k!r}")
    scores, ids = np.asarray(scores, dtype=np.float64), np.asarray(ids)
    if ids.ndim != 3 or scores.shape != ids.shape or ids.dtype.kind not in "iu":
        raise ValueError(f"scores and ids must be (B, S, n) arrays of one shape, ids integer; got scores "
                         f"{scores.shape} and ids {ids.shape} dtype {ids.dtype}")
    batch, slots, _ = ids.shape
    out_scores = np.full((batch, k), -np.inf, dtype=np.float32)
    out_ids = np.full((batch, k), -1, dtype=np.int64)
    for b in range(batch):
        rankings = [[int(i) for i in row if i >= 0] for row in ids[b]]
        if fusion == "rrf":
            fused = reciprocal_rank_fusion(rankings, k=rrf_k)
        else:
            fused = _score_fusion(rankings, [row[ids[b, s] >= 0] for s, row in enumerate(scores[b])], fusion, slots)
        for i, (doc, value) in enumerate(fused[:k]):
            out_ids[b, i], out_scores[b, i] = doc, value
    return out_scores, out_ids


def _score_fusion(rankings, scores, fusion, slots):
    """"max" / "mean" fusion of rankings (lists of ids) with their scores -> [(id, score)], best first."""
    fused, best_rank, first_seen = {}, {}, {}
    for ranking, values in zip(rankings, scores):
        seen = set()
        for doc, value in zip(ranking, values):
            if doc in seen:
                continue
            seen.add(doc)
            value = float(value) if fusion == "max" else float(value) / slots
            if doc not in fused:
                fused[doc], first_seen[doc] = value, len(first_seen)
            else:
                fused[doc] = max(fused[doc], value) if fusion == "max" else fused[doc] + value
            best_rank[doc] = min(best_rank.get(doc, len(seen)), len(seen))
    order = sorted(fused, key=lambda doc: (-fused[doc], best_rank[doc], first_seen[doc]))
    return [(doc, fused[doc]) for doc in order]
