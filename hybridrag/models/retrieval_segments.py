"""`RetrievalAugmentedSegments`: the processing state asks for passages (DynamicQueryGenerator), a NeuralRetriever
scores the knowledge base, and the top-k passages enter through RetrievalCrossAttention weighted by their
retrieval probabilities, so the LM loss reaches the retriever's towers."""
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import RetrievalCrossAttention
from ..nn.common import _check_flag, _check_hidden_states, _check_positive_int
from ..retrieval.neural import NeuralRetriever
from ..retrieval.query_generator import DynamicQueryGenerator


@dataclass
class Retrieval:
    """What one call retrieved, per batch row, best first.

    indices: (B, k) int64 passage ids (rows of the knowledge base).
    scores: (B, k) float32 relevance logits: the cosines of the Q queries to the passage over the temperature,
        fused as logsumexp over the queries - log Q; differentiable in the towers and the query generator.
    log_probs, probs: (B, k) log_softmax / softmax of scores over the k passages (the top-k approximation of
        p(passage | input) used by RAG and REALM's marginal likelihood: -log sum_z p(z) p(y | x, z)).
    query_vectors: (B, Q, passage_dim) the generator's unit queries.
    """
    indices: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor
    probs: torch.Tensor
    query_vectors: torch.Tensor


def _check_float_tensor(name, value, shape_text, ndim, last, device):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a callable, got {type(value).__name__}")
    if value.dim() != ndim or 0 in value.shape or value.shape[-1] != last:
        raise ValueError(f"{name} must be {shape_text} with no empty dim, got shape {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the module is on {device}")


def _check_mask(name, mask, shape):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        detail = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor (True = real token) or None, got {detail}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


class RetrievalAugmentedSegments(nn.Module):
    """Retrieve k passages for each row from its hidden states and add what they say, weighted by relevance.

        queries  = DynamicQueryGenerator(hidden_states)                       (B, Q, passage_dim), unit rows
        scores   = logsumexp_q(cos(query_tower(q), document_tower(v_n)) / tau) - log Q     over passages n
        top k by score; probs = softmax(scores of the k)                                   (B, k)
        out      = hidden_states + sum_z probs[:, z] * (RCA(hidden_states, passage z) - hidden_states)

    RCA is a RetrievalCrossAttention (gate tanh(gate), zero at init) called on each passage alone, so `out` is the
    expectation of the cross-attention update under the retrieval distribution and its gradient reaches the
    retriever's towers and the query generator through `probs` (once the gate is open; `Retrieval.log_probs` carries
    gradients to them from the start, for a marginal-likelihood loss). One passage per call makes RCA's own learned
    segment-relevance bias a constant of its softmax: it gets no gradient here (the retriever scores passages).
    Causality: the queries read every token that query_mask lets through, so with a causal LM pass a query_mask over
    the prompt (the question), not over tokens the loss predicts.

    Args:
        hidden_size: width of hidden_states and of the passage states.
        passage_dim: size of the knowledge base's passage vectors (e.g. DenseEncoder outputs); also the generator's
            query size, so one NeuralRetriever (features mode) maps both through its towers.
        num_heads: heads of the generator and the cross attention. num_queries: Q. top_k: k passages per row.
        num_tasks: task embeddings of the generator (task_ids needed when > 1).
        retriever_dim: the towers' output size (default passage_dim). temperature: the retriever's initial tau.
        backend: for the generator's hybrid_attention call ("auto", "triton", "cpu", "reference").

    Shapes:
        forward(hidden_states (B, T, hidden_size), passage_vectors, passages, passage_mask=None, *, query_mask
                (B, T) bool or None, task_ids (B,) int or None, return_retrieval=True)
        - passage_vectors: (N, passage_dim) float tensor (every passage scored; N >= top_k), or a callable
          search(query_vectors (B, Q, passage_dim), detached) -> (ids (B, C) int64, vectors (B, C, passage_dim)):
          C >= top_k candidates from an external index, rescored here by the towers (gradients flow to them).
        - passages: (N, Lp, hidden_size) float states of every passage with passage_mask (N, Lp) bool, or a
          callable fetch(indices (B, k)) -> (states (B, k, Lp, hidden_size), mask (B, k, Lp) bool or None).
        -> (out (B, T, hidden_size), Retrieval), or out alone with return_retrieval=False.

    Memory: the (B, Q, N) score matrix (or (B, Q, C)); the cross attention runs on B * k rows of T tokens:
    (B * k, T, hidden_size) activations and (B * k, H, T, Lp) attention scores at most.
    """

    def __init__(self, hidden_size, passage_dim, *, num_heads=4, num_queries=4, top_k=4, num_tasks=1,
                 retriever_dim=None, temperature=0.05, backend="auto"):
        super().__init__()
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("passage_dim", passage_dim)
        _check_positive_int("top_k", top_k)
        self.hidden_size, self.passage_dim, self.top_k = hidden_size, passage_dim, top_k
        self.query_generator = DynamicQueryGenerator(hidden_size, passage_dim, num_queries=num_queries,
                                                     num_heads=num_heads, num_tasks=num_tasks, backend=backend)
        self.retriever = NeuralRetriever(passage_dim, retriever_dim, temperature=temperature)
        self.cross_attention = RetrievalCrossAttention(hidden_size, num_heads, causal=True)

    def extra_repr(self):
        return f"hidden_size={self.hidden_size}, passage_dim={self.passage_dim}, top_k={self.top_k}"

    def _scores(self, queries, passage_vectors):
        """Fused relevance logits of each row's candidates -> (scores (B, C) float32, ids (B, C) or None = 0..N-1)."""
        batch, count, dim = queries.shape
        q = self.retriever.encode_queries(queries.reshape(batch * count, dim)).view(batch, count, -1)
        if callable(passage_vectors):
            ids, vectors = passage_vectors(queries.detach())
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != batch \
                    or ids.shape[1] < self.top_k or ids.dtype != torch.long:
                raise ValueError(f"the search callable must return ids, an int64 ({batch}, C) tensor with C >= "
                                 f"top_k={self.top_k}, got {getattr(ids, 'shape', type(ids).__name__)} "
                                 f"{getattr(ids, 'dtype', '')}")
            _check_float_tensor("the search callable's vectors", vectors, f"({batch}, {ids.shape[1]}, "
                                f"{self.passage_dim})", 3, self.passage_dim, queries.device)
            if tuple(vectors.shape[:2]) != tuple(ids.shape):
                raise ValueError(f"the search callable's vectors must be {tuple(ids.shape)} x passage_dim like its "
                                 f"ids, got {tuple(vectors.shape)}")
            docs = self.retriever.encode_documents(vectors.reshape(-1, self.passage_dim)).view(*ids.shape, -1)
            cos = q @ docs.transpose(1, 2)  # (B, Q, C)
        else:
            _check_float_tensor("passage_vectors", passage_vectors, f"(N, {self.passage_dim})", 2, self.passage_dim,
                                queries.device)
            if passage_vectors.shape[0] < self.top_k:
                raise ValueError(f"passage_vectors has {passage_vectors.shape[0]} passages, fewer than top_k="
                                 f"{self.top_k}")
            ids = None
            cos = q @ self.retriever.encode_documents(passage_vectors).T  # (B, Q, N)
        logits = cos.float() / self.retriever.temperature
        return torch.logsumexp(logits, dim=1) - math.log(count), ids

    def retrieve(self, hidden_states, passage_vectors, *, query_mask=None, task_ids=None):
        """The Retrieval of each row (see the class docstring for passage_vectors)."""
        _check_hidden_states(hidden_states, self.hidden_size)
        if not callable(passage_vectors):
            _check_float_tensor("passage_vectors", passage_vectors, f"(N, {self.passage_dim})", 2, self.passage_dim,
                                hidden_states.device)
        queries = self.query_generator(hidden_states, task_ids, query_mask)  # (B, Q, passage_dim)
        scores, candidate_ids = self._scores(queries, passage_vectors)
        top = torch.topk(scores, self.top_k, dim=1)
        indices = top.indices if candidate_ids is None else candidate_ids.gather(1, top.indices)
        log_probs = torch.log_softmax(top.values, dim=1)
        return Retrieval(indices, top.values, log_probs, log_probs.exp(), queries)

    def _passage_states(self, passages, passage_mask, indices, dtype):
        batch, k = indices.shape
        if callable(passages):
            states, mask = passages(indices)
            _check_float_tensor("the fetch callable's states", states, f"({batch}, {k}, Lp, {self.hidden_size})",
                                4, self.hidden_size, indices.device)
            if tuple(states.shape[:2]) != (batch, k):
                raise ValueError(f"the fetch callable's states must start with ({batch}, {k}), got "
                                 f"{tuple(states.shape)}")
            mask = _check_mask("the fetch callable's mask", mask, states.shape[:3])
        else:
            if indices.min().item() < 0 or indices.max().item() >= passages.shape[0]:
                raise ValueError(f"retrieved passage ids must lie in [0, {passages.shape[0]}) (rows of passages), "
                                 f"got {indices.min().item()} .. {indices.max().item()}")
            mask = None if passage_mask is None else passage_mask[indices]
            states = passages[indices]  # (B, k, Lp, hidden)
        if states.dtype != dtype:
            raise TypeError(f"passage states have dtype {states.dtype} but hidden_states has {dtype}")
        return states, mask

    def _check_passages(self, passages, passage_mask, device):
        if callable(passages):
            if passage_mask is not None:
                raise ValueError("passage_mask goes with a passages tensor; a fetch callable returns its own mask")
            return
        _check_float_tensor("passages", passages, f"(N, Lp, {self.hidden_size})", 3, self.hidden_size, device)
        _check_mask("passage_mask", passage_mask, passages.shape[:2])

    def forward(self, hidden_states, passage_vectors, passages, passage_mask=None, *, query_mask=None,
                task_ids=None, return_retrieval=True):
        _check_hidden_states(hidden_states, self.hidden_size)
        _check_flag("return_retrieval", return_retrieval)
        self._check_passages(passages, passage_mask, hidden_states.device)
        if not callable(passages) and isinstance(passage_vectors, torch.Tensor) \
                and passages.shape[0] != passage_vectors.shape[0]:
            raise ValueError(f"passages has {passages.shape[0]} passages but passage_vectors has "
                             f"{passage_vectors.shape[0]}; pass one row per passage in both")
        retrieval = self.retrieve(hidden_states, passage_vectors, query_mask=query_mask, task_ids=task_ids)
        states, mask = self._passage_states(passages, passage_mask, retrieval.indices, hidden_states.dtype)
        batch, length, width = hidden_states.shape
        k, plen = states.shape[1], states.shape[2]
        # each passage alone: B * k rows, one segment each
        rows = hidden_states[:, None].expand(batch, k, length, width).reshape(batch * k, length, width)
        attended = self.cross_attention(rows, states.reshape(batch * k, 1, plen, width),
                                        None if mask is None else mask.reshape(batch * k, 1, plen))
        update = (attended - rows).view(batch, k, length, width)
        weights = retrieval.probs.to(update.dtype)[:, :, None, None]
        out = hidden_states + (weights * update).sum(dim=1)
        return (out, retrieval) if return_retrieval else out
