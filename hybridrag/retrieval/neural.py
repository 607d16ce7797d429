"""Learnable dense retriever: query and document towers, temperature-scaled cosine similarity and an InfoNCE loss."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.common import _check_flag, _check_positive_int

MODES = ("features", "tokens")


def _check_number(name, value, low, high=math.inf):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not (low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


class NeuralRetriever(nn.Module):
    """Two towers (query, document) map inputs to L2-normalised vectors; relevance is their cosine over a temperature.

    Input modes (exactly one):
    - features (`input_dim` given): inputs are float tensors (N, input_dim), e.g. `DenseEncoder` outputs. Each tower is
      a bias-free linear map initialised to the identity (zero-padded when output_dim > input_dim), which preserves
      inner products: the untrained retriever ranks exactly like the base encoder. When output_dim < input_dim the
      towers start as the same random orthogonal projection (rankings then only approximately preserved).
    - tokens (`vocab_size` given): inputs are integer token ids (N, L); `padding_idx` marks padding, which the masked
      mean ignores (nn.EmbeddingBag, mode "mean"). Tower = embedding (vocab_size, embedding_dim) -> mean over the real
      tokens -> linear (embedding_dim -> output_dim, identity-initialised when the dims match). Every row needs at
      least one real token.

    `shared_towers=True` uses one tower for queries and documents (a symmetric similarity; it cannot learn an
    asymmetric map such as a rotation between query and document space).

    Temperature tau = exp(log_temperature), clamped below at `min_temperature`; learned unless
    learn_temperature=False (then a buffer).

    Args:
        input_dim: feature size (features mode). output_dim: embedding size (default input_dim, or embedding_dim).
        vocab_size, embedding_dim (default output_dim, or 64), padding_idx (int or None): tokens mode.
        shared_towers, temperature (> 0), learn_temperature, min_temperature: as above.
        device, dtype: for the parameters.
    """

    def __init__(self, input_dim=None, output_dim=None, *, vocab_size=None, embedding_dim=None, padding_idx=0,
                 shared_towers=False, temperature=0.05, learn_temperature=True, min_temperature=1e-3, device=None,
                 dtype=None):
        super().__init__()
        if (input_dim is None) == (vocab_size is None):
            raise ValueError("pass exactly one of input_dim (features mode) and vocab_size (tokens mode), got "
                             f"input_dim={input_dim!r} and vocab_size={vocab_size!r}")
        _check_flag("shared_towers", shared_towers)
        _check_flag("learn_temperature", learn_temperature)
        min_temperature = _check_number("min_temperature", min_temperature, 1e-6)
        temperature = _check_number("temperature", temperature, min_temperature)
        factory = {"device": device, "dtype": dtype}
        if input_dim is not None:
            _check_positive_int("input_dim", input_dim)
            output_dim = input_dim if output_dim is None else output_dim
            _check_positive_int("output_dim", output_dim)
            self.mode, self.input_dim, self.vocab_size, self.padding_idx = "features", input_dim, None, None
            towers = [nn.Linear(input_dim, output_dim, bias=False, **factory) for _ in range(1 if shared_towers else 2)]
            with torch.no_grad():
                if output_dim >= input_dim:
                    towers[0].weight.copy_(torch.eye(output_dim, input_dim))
                else:
                    nn.init.orthogonal_(towers[0].weight)
                for tower in towers[1:]:
                    tower.weight.copy_(towers[0].weight)
        else:
            _check_positive_int("vocab_size", vocab_size)
            embedding_dim = (output_dim or 64) if embedding_dim is None else embedding_dim
            output_dim = embedding_dim if output_dim is None else output_dim
            _check_positive_int("embedding_dim", embedding_dim)
            _check_positive_int("output_dim", output_dim)
            if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
                                            or not 0 <= padding_idx < vocab_size):
                raise ValueError(f"padding_idx must be None or an int in [0, {vocab_size}), got {padding_idx!r}")
            self.mode, self.input_dim, self.vocab_size, self.padding_idx = "tokens", None, vocab_size, padding_idx
            towers = [self._token_tower(vocab_size, embedding_dim, output_dim, padding_idx, factory)
                      for _ in range(1 if shared_towers else 2)]
        self.output_dim, self.shared_towers, self.min_temperature = output_dim, shared_towers, min_temperature
        self.query_tower = towers[0]
        self.document_tower = towers[0] if shared_towers else towers[1]
        log_temperature = torch.tensor(math.log(temperature), device=device, dtype=torch.float32)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)

    @staticmethod
    def _token_tower(vocab_size, embedding_dim, output_dim, padding_idx, factory):
        projection = nn.Linear(embedding_dim, output_dim, bias=False, **factory)
        if embedding_dim == output_dim:
            with torch.no_grad():
                projection.weight.copy_(torch.eye(output_dim))
        return nn.Sequential(nn.EmbeddingBag(vocab_size, embedding_dim, mode="mean", padding_idx=padding_idx,
                                             **factory), projection)

    def extra_repr(self):
        source = f"input_dim={self.input_dim}" if self.mode == "features" else \
            f"vocab_size={self.vocab_size}, padding_idx={self.padding_idx}"
        return f"mode={self.mode!r}, {source}, output_dim={self.output_dim}, shared_towers={self.shared_towers}"

    @property
    def temperature(self):
        """tau, a float32 scalar tensor (differentiable when learned)."""
        return self.log_temperature.exp().clamp(min=self.min_temperature)

    def _check_inputs(self, name, x, ndim=2, rows=None):
        """Raise unless x is a batch of inputs of this mode: (N, input_dim) float or (N, L) token ids (with an extra
        leading dim (N, M, ...) when ndim=3)."""
        if not isinstance(x, torch.Tensor):
            hint = " (wrap numpy arrays with torch.from_numpy)" if type(x).__module__ == "numpy" else ""
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")
        lead = "(N, M, " if ndim == 3 else "(N, "
        expected = f"{lead}{self.input_dim}) features" if self.mode == "features" else f"{lead}L) token ids"
        if x.dim() != ndim or x.numel() == 0 or (self.mode == "features" and x.shape[-1] != self.input_dim):
            raise ValueError(f"{name} must have shape {expected} with no empty dim, got {tuple(x.shape)}")
        if rows is not None and x.shape[0] != rows:
            raise ValueError(f"{name} has {x.shape[0]} rows but queries has {rows}; pass one row per query")
        device = self.log_temperature.device
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the retriever is on {device}")
        if self.mode == "features":
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor of features, got dtype {x.dtype}")
            return
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {x.dtype}")
        low, high = x.min().item(), x.max().item()
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"{name} token ids must lie in [0, {self.vocab_size}), got {low} .. {high}")
        if self.padding_idx is not None:
            empty = (x == self.padding_idx).all(dim=-1)
            if empty.any():
                first = tuple(torch.nonzero(empty)[0].tolist())
                raise ValueError(f"{name} row {first} holds only padding (padding_idx={self.padding_idx}); every "
                                 "row needs at least one real token")

    def _encode(self, tower, x):
        if self.mode == "features":
            out = tower(x.to(tower.weight.dtype))
        else:
            out = tower(x.long())
        return F.normalize(out, dim=-1)

    def encode_queries(self, queries):
        """queries (N, input_dim) float or (N, L) token ids -> (N, output_dim) L2-normalised, differentiable."""
        self._check_inputs("queries", queries)
        return self._encode(self.query_tower, queries)

    def encode_documents(self, documents):
        """documents (N, input_dim) float or (N, L) token ids -> (N, output_dim) L2-normalised, differentiable."""
        self._check_inputs("documents", documents)
        return self._encode(self.document_tower, documents)

    def similarity(self, queries, documents):
        """Temperature-scaled cosine similarity cos(q_i, d_j) / tau, (Nq, Nd) float, differentiable."""
        return self.encode_queries(queries) @ self.encode_documents(documents).T / self.temperature

    @torch.no_grad()
    def top_k(self, queries, document_embeddings, k):
        """The k documents with the highest cosine to each query.

        Args:
            queries: query inputs (Nq, input_dim) or (Nq, L).
            document_embeddings: (Nd, output_dim) float, e.g. from encode_documents (rows are normalised again here).
            k: 1 <= k <= Nd.
        Returns:
            (scores (Nq, k) cosines, best first; indices (Nq, k) int64 rows of document_embeddings). No gradients.
            Memory: the (Nq, Nd) score matrix.
        """
        if not isinstance(document_embeddings, torch.Tensor):
            raise TypeError(f"document_embeddings must be a torch.Tensor, got {type(document_embeddings).__name__}")
        if document_embeddings.dim() != 2 or document_embeddings.shape[1] != self.output_dim \
                or document_embeddings.shape[0] == 0:
            raise ValueError(f"document_embeddings must have shape (Nd >= 1, {self.output_dim}), "
                             f"got {tuple(document_embeddings.shape)}")
        if not document_embeddings.dtype.is_floating_point:
            raise TypeError(f"document_embeddings must be floating point, got dtype {document_embeddings.dtype}")
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 1 <= k <= document_embeddings.shape[0]:
            raise ValueError(f"k must be in [1, {document_embeddings.shape[0]}] (the number of documents), got {k}")
        q = self.encode_queries(queries)
        scores = q @ F.normalize(document_embeddings.to(q.dtype), dim=-1).T
        top = torch.topk(scores, k, dim=1)
        return top.values, top.indices

    def loss(self, queries, positives, hard_negatives=None, *, hard_negative_ratio=1.0, margin=0.0,
             in_batch_negatives=True):
        """InfoNCE (contrastive cross-entropy) with in-batch and hard negatives and an additive cosine margin.

        With q_i = encode_queries(queries)[i], p_j = encode_documents(positives)[j], n_im the hard negatives of query
        i, tau the temperature and s(a, b) the cosine:

            loss = mean_i -log( exp((s(q_i, p_i) - margin) / tau) /
                                [ exp((s(q_i, p_i) - margin) / tau) + sum_{j != i} exp(s(q_i, p_j) / tau)
                                  + sum_{m < M'} exp(s(q_i, n_im) / tau) ] )

        The j != i sum (in-batch negatives: the other queries' positives) is present only with
        in_batch_negatives=True; then a document appearing as two queries' positive counts as a negative for each
        other (deduplicate batches if that matters). Query i sees only its own hard negatives. The loss of each
        query depends on other rows only through the in-batch term, so with in_batch_negatives=False it is an exact
        mean of per-query losses.

        Args:
            queries: (N, input_dim) float or (N, L) token ids.
            positives: the relevant document of each query, (N, input_dim) or (N, L').
            hard_negatives: None or (N, M, input_dim) / (N, M, L'') per query, hardest first.
            hard_negative_ratio: in [0, 1]; the first M' = floor(ratio * M + 0.5) hard negatives of each query are
                used (0: none, 1: all).
            margin: >= 0, subtracted from the positive cosine before dividing by tau (additive-margin softmax).
            in_batch_negatives: use the other rows' positives as negatives.
        Returns:
            scalar loss (float32 for float32 parameters), differentiable. Memory: (N, N + M') logits.
        """
        self._check_inputs("queries", queries)
        rows = queries.shape[0]
        self._check_inputs("positives", positives, rows=rows)
        if hard_negatives is not None:
            self._check_inputs("hard_negatives", hard_negatives, ndim=3, rows=rows)
        ratio = _check_number("hard_negative_ratio", hard_negative_ratio, 0.0, 1.0)
        margin = _check_number("margin", margin, 0.0)
        _check_flag("in_batch_negatives", in_batch_negatives)
        used = 0 if hard_negatives is None else math.floor(ratio * hard_negatives.shape[1] + 0.5)
        if used == 0 and not (in_batch_negatives and rows >= 2):
            raise ValueError("the loss has no negative: pass in_batch_negatives=True with at least 2 queries, or "
                             f"hard_negatives with hard_negative_ratio > 0 (got {rows} queries, in_batch_negatives="
                             f"{in_batch_negatives}, {used} hard negatives used)")

        q = self._encode(self.query_tower, queries)  # (N, d)
        p = self._encode(self.document_tower, positives)  # (N, d)
        if in_batch_negatives:
            cos = q @ p.T  # (N, N), positives on the diagonal
            target = torch.arange(rows, device=q.device)
        else:
            cos = (q * p).sum(dim=-1, keepdim=True)  # (N, 1)
            target = torch.zeros(rows, dtype=torch.long, device=q.device)
        cos = cos - margin * F.one_hot(target, cos.shape[1]).to(cos.dtype)
        if used:
            negatives = hard_negatives[:, :used].reshape(rows * used, *hard_negatives.shape[2:])
            n = self._encode(self.document_tower, negatives).view(rows, used, -1)  # (N, M', d)
            cos = torch.cat([cos, torch.einsum("nd,nmd->nm", q, n)], dim=1)
        logits = cos.float() / self.temperature
        return F.cross_entropy(logits, target)
