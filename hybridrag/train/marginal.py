"""The retriever learns through the language-model loss: the RAG-sequence / REALM marginal likelihood.

For a query x with top-k candidate passages z_1..z_k (found in a stale index, then scored with the current towers):

    loss(x, y) = -log sum_k p(z_k | x) p(y | x, z_k),   p(z_k | x) = softmax_k(s(x, z_k)),

computed as -logsumexp_k(log_softmax(s)_k + log p(y | x, z_k)). Its gradient with respect to s(x, z_k) is
p(z_k | x) - p(z_k | x, y): passages under which the answer is likely gain probability, the rest lose it, so the
retriever's towers are trained by the answer alone. An optional InfoNCE term (NeuralRetriever.loss) adds supervision
from known positive passages. PassageIndex holds the knowledge base's passages and their document-tower vectors,
re-encoded by refresh() as the towers change (REALM's asynchronous index refresh, here every n trainer steps).
"""
import torch
from torch import nn

from ..nn.common import _check_positive_int
from ..retrieval.neural import NeuralRetriever, _check_number
from .data import IGNORE_INDEX


def _check_scores(name, x, shape=None):
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"{name} must be (B, K) with no empty dim, got shape {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but retrieval_logits has {tuple(shape)}; pass one "
                         "score per (query, passage)")
    if torch.isnan(x).any() or (x == float("inf")).any():
        raise ValueError(f"{name} holds NaN or +inf")


def marginal_nll(retrieval_logits, answer_log_likelihood, *, reduction="mean"):
    """-log sum_k softmax(retrieval_logits)_k exp(answer_log_likelihood_k), stably (logsumexp).

    Args:
        retrieval_logits: (B, K) float, unnormalised retriever scores s(x, z_k) (-inf = a candidate left out).
        answer_log_likelihood: (B, K) float, log p(y | x, z_k) summed over the answer's tokens.
        reduction: "mean", "sum" or "none" ((B,) per query).
    Returns: the loss, float32 (or the inputs' wider dtype), differentiable in both inputs.
    """
    _check_scores("retrieval_logits", retrieval_logits)
    _check_scores("answer_log_likelihood", answer_log_likelihood, retrieval_logits.shape)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    dtype = torch.promote_types(torch.promote_types(retrieval_logits.dtype, answer_log_likelihood.dtype),
                                torch.float32)
    log_prior = torch.log_softmax(retrieval_logits.to(dtype), dim=-1)
    loss = -torch.logsumexp(log_prior + answer_log_likelihood.to(dtype), dim=-1)
    return loss if reduction == "none" else (loss.mean() if reduction == "mean" else loss.sum())


def retrieval_posterior(retrieval_logits, answer_log_likelihood):
    """p(z_k | x, y) = softmax_k(log p(z_k | x) + log p(y | x, z_k)), (B, K); no gradient."""
    with torch.no_grad():
        log_prior = torch.log_softmax(retrieval_logits.float(), dim=-1)
        return torch.softmax(log_prior + answer_log_likelihood.float(), dim=-1)


def _logits_of(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"the generator must return logits: a tensor, a dict with 'logits' or an object with .logits, "
                    f"got {type(output).__name__}")


def answer_log_likelihood(generator, passages, passage_mask, query_ids, query_mask, answer_ids, answer_mask):
    """log p(answer | passage_k, query) for every passage: the generator reads [passage, query, answer], packed
    without inner padding, and the answer tokens' log-probabilities are summed.

    Args:
        generator: a causal LM, generator(input_ids=(N, T), attention_mask=(N, T)) -> logits (N, T, V).
        passages (B, K, Lp) int64 with passage_mask (B, K, Lp); query_ids/query_mask (B, Lq); answer_ids/answer_mask
        (B, La). Masks are 1/True on real tokens; every row needs at least one real query and answer token.
    Returns: (B, K) float32, differentiable in the generator's parameters.
    """
    b, k, _ = passages.shape
    rows = b * k
    expand = lambda x: x[:, None].expand(b, k, x.shape[-1]).reshape(rows, -1)  # noqa: E731
    ids = torch.cat([passages.reshape(rows, -1), expand(query_ids), expand(answer_ids)], dim=1)
    real = torch.cat([passage_mask.reshape(rows, -1), expand(query_mask), expand(answer_mask)], dim=1).bool()
    part = torch.cat([torch.full_like(passages.reshape(rows, -1), 0), torch.full_like(expand(query_ids), 1),
                      torch.full_like(expand(answer_ids), 2)], dim=1)
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real tokens first, in their order
    ids, real, part = ids.gather(1, order), real.gather(1, order), part.gather(1, order)
    logits = _logits_of(generator(input_ids=ids, attention_mask=real.long()))
    targets = torch.where(real & (part == 2), ids, torch.full_like(ids, IGNORE_INDEX))[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != IGNORE_INDEX)).sum(dim=1).view(b, k)


class PassageIndex(nn.Module):
    """The knowledge base's passages as token ids with their document-tower vectors.

    PassageIndex(passages, retriever, pad_id=0): passages is a list of N token-id lists (each >= 1 token), stored
    right-padded as the buffer `passages` (N, L) with `mask` (N, L). `embeddings` (N, d) is the document tower's
    output at the last refresh() (it is encoded once here). All three are buffers: they are saved in the model's
    state dict, so a resumed run retrieves from the same, possibly stale, vectors.
    """

    def __init__(self, passages, retriever, *, pad_id=0):
        super().__init__()
        if not isinstance(retriever, NeuralRetriever) or retriever.mode != "tokens":
            raise TypeError("retriever must be a NeuralRetriever in tokens mode (vocab_size given), got "
                            f"{type(retriever).__name__}" + (f" in {retriever.mode} mode"
                                                             if isinstance(retriever, NeuralRetriever) else ""))
        if retriever.padding_idx != pad_id:
            raise ValueError(f"the retriever's padding_idx ({retriever.padding_idx}) must equal pad_id ({pad_id}): "
                             "the document tower must not read padding")
        if not isinstance(passages, (list, tuple)) or not passages:
            size = len(passages) if hasattr(passages, "__len__") else "?"
            raise ValueError(f"passages must be a non-empty list of token-id lists, got {type(passages).__name__} "
                             f"of length {size}")
        width = 0
        for i, passage in enumerate(passages):
            if not isinstance(passage, (list, tuple)) or not passage or any(
                    isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < retriever.vocab_size
                    or t == pad_id for t in passage):
                raise ValueError(f"passages[{i}] must be a non-empty list of token ids in [0, "
                                 f"{retriever.vocab_size}) other than pad_id={pad_id}, got {passage!r}"[:300])
            width = max(width, len(passage))
        ids = torch.full((len(passages), width), pad_id, dtype=torch.long)
        for i, passage in enumerate(passages):
            ids[i, :len(passage)] = torch.tensor(passage)
        device = retriever.log_temperature.device
        self.register_buffer("passages", ids.to(device))
        self.register_buffer("mask", (ids != pad_id).to(device))
        self.register_buffer("embeddings", torch.zeros(len(passages), retriever.output_dim, device=device))
        self.refresh(retriever)

    def __len__(self):
        return self.passages.shape[0]

    @torch.no_grad()
    def refresh(self, retriever, chunk=4096):
        """Re-encode every passage with the retriever's current document tower (in chunks of `chunk` rows)."""
        for start in range(0, len(self), chunk):
            self.embeddings[start:start + chunk] = retriever.encode_documents(self.passages[start:start + chunk])


class MarginalRAG(nn.Module):
    """Retriever + generator trained end to end by the marginal likelihood of the answer.

    forward(query_ids, query_mask, answer_ids, answer_mask, positive_index=None) with query (B, Lq) and answer
    (B, La) ids and masks (RAGCollator(layout="parts")):
      1. candidates: the top-k passages of each query by the stale index vectors (no gradient); in training mode
         the last `random_candidates` of the k are drawn uniformly from the other passages instead (exploration: a
         retriever that starts at chance would otherwise never see, and never learn, a passage outside its top-k);
      2. retrieval_logits (B, K): the current towers' scores of those k passages, cos(q, d) / tau (gradients to
         both towers and the temperature);
      3. answer_log_likelihood (B, K): the generator's log p(answer | passage, query);
      4. loss = marginal_nll(...) (mean over queries) + contrastive_weight * retriever.loss(queries, the positive
         passages) when positive_index (B,) int64 rows of the index is given.
    Returns a dict: loss, marginal_nll, retrieval_logits, answer_log_likelihood, top_indices (B, K), and
    contrastive_loss when used. The loss is a mean over queries: train it with loss_normalization="examples".

    Args: retriever (NeuralRetriever, tokens mode), generator (causal LM), passages (list of token-id lists),
    k (1 <= k <= number of passages), random_candidates (0 <= r < k), contrastive_weight (>= 0),
    contrastive_margin (>= 0), pad_id.
    """

    def __init__(self, retriever, generator, passages, *, k=4, random_candidates=0, contrastive_weight=0.0,
                 contrastive_margin=0.0, pad_id=0):
        super().__init__()
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be an nn.Module (a causal LM), got {type(generator).__name__}")
        self.retriever, self.generator = retriever, generator
        self.index = PassageIndex(passages, retriever, pad_id=pad_id)
        _check_positive_int("k", k)
        if k > len(self.index):
            raise ValueError(f"k must be <= the number of passages ({len(self.index)}), got {k}")
        self.k = k
        if isinstance(random_candidates, bool) or not isinstance(random_candidates, int) \
                or not 0 <= random_candidates < k:
            raise ValueError(f"random_candidates must be an int in [0, k={k}), got {random_candidates!r}")
        self.random_candidates = random_candidates
        self.contrastive_weight = _check_number("contrastive_weight", contrastive_weight, 0.0)
        self.contrastive_margin = _check_number("contrastive_margin", contrastive_margin, 0.0)

    def refresh_passages(self):
        """Re-encode the index with the current document tower (the trainer calls it every passage_refresh_every
        steps)."""
        self.index.refresh(self.retriever)

    def passage_scores(self, query_ids):
        """cos(q, d) / tau of every query against every passage from the current towers, (B, N); differentiable."""
        return self.retriever.similarity(query_ids, self.index.passages)

    def candidates(self, query_ids):
        """(B, K) int64 passage rows: the index's top k (or k - random_candidates and random others in training)."""
        explore = self.random_candidates if self.training else 0
        _, top = self.retriever.top_k(query_ids, self.index.embeddings, self.k - explore)  # stale vectors
        if explore:
            draw = torch.rand(top.shape[0], len(self.index), device=top.device)  # the torch RNG: resumable
            draw.scatter_(1, top, -1.0)  # never draw a passage already in the top
            top = torch.cat([top, draw.topk(explore, dim=1).indices], dim=1)
        return top

    def forward(self, query_ids, query_mask, answer_ids, answer_mask, positive_index=None):
        if positive_index is not None and self.contrastive_weight == 0.0:
            raise ValueError("positive_index was given but contrastive_weight is 0: the positives would be unused; "
                             "set contrastive_weight > 0 or leave positive_index out")
        if positive_index is None and self.contrastive_weight > 0.0:
            raise ValueError(f"contrastive_weight={self.contrastive_weight} needs positive_index (B,) int64, the "
                             "index row of each query's positive passage")
        top = self.candidates(query_ids)
        q = self.retriever.encode_queries(query_ids)  # (B, d)
        d = self.retriever.encode_documents(self.index.passages[top.flatten()]).view(*top.shape, -1)  # (B, K, d)
        retrieval_logits = torch.einsum("bd,bkd->bk", q, d) / self.retriever.temperature
        ll = answer_log_likelihood(self.generator, self.index.passages[top], self.index.mask[top], query_ids,
                                   query_mask, answer_ids, answer_mask)
        nll = marginal_nll(retrieval_logits, ll)
        out = {"marginal_nll": nll, "retrieval_logits": retrieval_logits, "answer_log_likelihood": ll,
               "top_indices": top, "loss": nll}
        if positive_index is not None:
            contrastive = self.retriever.loss(query_ids, self.index.passages[positive_index],
                                              margin=self.contrastive_margin)
            out["contrastive_loss"] = contrastive
            out["loss"] = nll + self.contrastive_weight * contrastive
        return out
