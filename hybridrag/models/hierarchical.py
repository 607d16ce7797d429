"""`HierarchicalHybridRAG`: a causal language model in three stages (local segments, cross-segment landmarks,
global synthesis with retrieved passages) on the hybridrag attention kernels."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import HybridAttention, RetrievalCrossAttention, SlidingWindowAttention, SparseGlobalAttention, quantize_model
from .blocks import BlockEndLandmarkAttention, BlockSelectionAttention, TransformerBlock, block_end_landmarks
from .config import HierarchicalConfig
from .inputs import IGNORE_INDEX, check_forward_inputs

# RetrievalCrossAttention reads relevance_scorer.weight directly, which an Int8Linear does not have.
INT8_SKIP = ("*relevance_scorer",)


class HierarchicalHybridRAG(nn.Module):
    """Causal LM: stage 1 reads each segment locally, stage 2 integrates the segments' landmark states, stage 3 mixes
    local, global and retrieved knowledge over the whole sequence; then an LM head.

    With S = segment_length, s = landmark_stride (= S // num_landmark_tokens) and w = window_size:
    - Stage 1 (local): the T tokens are cut into ceil(T / S) segments (the last one right-padded; padding comes after
      every real token, so causality keeps it invisible), each through num_local_layers blocks on its own, with
      SlidingWindowAttention(w) or HybridAttention(w, landmarks every s tokens of the segment, memory tokens).
    - Stage 2 (cross-segment): the landmarks are the block ends s - 1, 2s - 1, ... < T (the last token of each block
      of s, whose causal state summarises the block). Their L = T // s states go through num_cross_layers blocks of
      SparseGlobalAttention (window cross_window landmarks, a global landmark every cross_landmark_stride); the
      outputs replace the landmark states.
    - Stage 3 (synthesis): with retrieval, a RetrievalCrossAttention (gated, per-passage relevance) over the
      passages, encoded by the stage 1 blocks; then num_synthesis_layers blocks in which each token sees its window
      of w tokens and every earlier landmark (HybridAttention with block-end landmarks), so a fact read in an early
      segment reaches the end of the sequence in one hop. Final RMSNorm, LM head (tied to the embeddings by default).
    With stage_gates, stages 1 and 2 enter through learned scalar gates that start at 0 (see HierarchicalConfig).
    Causal throughout: logits at t depend on tokens 0..t only (and on the passages).

    Shapes:
        forward(input_ids (B, T) int, attention_mask (B, T) bool or 0/1 int (False = padding, hidden from every
                query; give padded labels -100), labels (B, T) int with -100 ignored, retrieved: passages (B, P, Lp)
                token ids or (B, P, Lp, hidden) states (P <= max_retrieved; needs retrieval=True),
                retrieved_mask (B, P, Lp) bool (True = real token))
        -> {"logits": (B, T, vocab) in the parameters' dtype, "loss": scalar (only with labels): mean cross-entropy
            of logits[:, t] against labels[:, t + 1] over the labels that are not -100}.

    Memory (activations per block, batch B, width d): O(B * T * d) for the residual stream and MLP, and the attention
    kernels' tiles of (B, H, 128, w + 128 + L) float32 with L = T // s landmarks: never a T x T matrix, so memory
    grows as T * (d + w + T / s) (linear in T at a fixed s; the landmark term is small for s >= 32). Work is
    O(T * (w + T / s)) per head and layer. Gradient checkpointing keeps one block's activations instead of all.
    """

    def __init__(self, config):
        super().__init__()
        if isinstance(config, dict):
            config = HierarchicalConfig.from_dict(config)
        if not isinstance(config, HierarchicalConfig):
            raise TypeError(f"config must be a HierarchicalConfig or a dict of its fields, got {type(config).__name__}")
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.local_blocks = nn.ModuleList(self._block(self._local_attention()) for _ in range(c.num_local_layers))
        self.cross_blocks = nn.ModuleList(self._block(SparseGlobalAttention(
            c.hidden_size, c.num_heads, window=c.cross_window, landmark_stride=c.cross_landmark_stride,
            **self._heads())) for _ in range(c.num_cross_layers))
        self.retrieval_attention = RetrievalCrossAttention(
            c.hidden_size, c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, causal=True,
            backend="auto" if c.backend != "reference" else "reference") if c.retrieval else None
        self.synthesis_blocks = nn.ModuleList(self._block(self._synthesis_attention())
                                              for _ in range(c.num_synthesis_layers))
        # stage_gates: x + g * (stage(x) - x), g = 0 at the start (the stage is skipped until it helps)
        self.local_gate = nn.Parameter(torch.zeros(())) if c.stage_gates else None
        self.cross_gate = nn.Parameter(torch.zeros(())) if c.stage_gates else None
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        nn.init.normal_(self.embed_tokens.weight, std=c.initializer_range)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=c.initializer_range)

    def _heads(self):
        c = self.config
        return {"num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "rope_base": c.rope_base,
                "backend": c.backend}

    def _local_attention(self):
        c = self.config
        if c.local_attention == "sliding":
            return SlidingWindowAttention(c.hidden_size, c.num_heads, c.window_size, **self._heads())
        return HybridAttention(c.hidden_size, c.num_heads, window=c.window_size, landmark_stride=c.landmark_stride,
                               num_memory_tokens=c.num_memory_tokens, **self._heads())

    def _synthesis_attention(self):
        c = self.config
        if c.selected_blocks:
            return BlockSelectionAttention(c.hidden_size, c.num_heads, stride=c.landmark_stride,
                                           top_k=c.selected_blocks, window=c.window_size, **self._heads())
        return BlockEndLandmarkAttention(c.hidden_size, c.num_heads, stride=c.landmark_stride, window=c.window_size,
                                         **self._heads())

    def _block(self, attention):
        c = self.config
        return TransformerBlock(attention, c.hidden_size, c.intermediate_size, c.dropout, c.norm_eps)

    def _run(self, block, x, position_ids, key_mask):
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, position_ids, key_mask, use_reentrant=False)
        return block(x, position_ids, key_mask)

    def _local(self, x, key_mask):
        """Stage 1 on (B, T, d) -> (B, T, d): segments of S tokens, each through the local blocks on its own."""
        batch, length, width = x.shape
        seg = self.config.segment_length
        count = -(-length // seg)
        pad = count * seg - length
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            key_mask = None if key_mask is None else F.pad(key_mask, (0, pad), value=False)
        x = x.reshape(batch * count, seg, width)
        key_mask = None if key_mask is None else key_mask.reshape(batch * count, seg)
        positions = torch.arange(seg, device=x.device)
        for block in self.local_blocks:
            x = self._run(block, x, positions, key_mask)
        return x.reshape(batch, count * seg, width)[:, :length]

    def encode_passages(self, passage_ids, passage_mask):
        """Passage token ids (B, P, Lp) -> states (B, P, Lp, d): embeddings through the stage 1 blocks, each
        passage a sequence of its own (no segmenting: passages are short)."""
        batch, count, plen = passage_ids.shape
        x = self.embed_tokens(passage_ids.reshape(batch * count, plen))
        key_mask = None if passage_mask is None else passage_mask.reshape(batch * count, plen)
        positions = torch.arange(plen, device=x.device)
        for block in self.local_blocks:
            x = self._run(block, x, positions, key_mask)
        return x.reshape(batch, count, plen, -1)

    def forward(self, input_ids, attention_mask=None, labels=None, retrieved=None, retrieved_mask=None):
        key_mask, retrieved_mask = check_forward_inputs(self, input_ids, attention_mask, labels, retrieved,
                                                        retrieved_mask)
        length = input_ids.shape[1]
        device = input_ids.device
        x = self.embed_dropout(self.embed_tokens(input_ids))
        x = _gated(x, self._local(x, key_mask), self.local_gate)

        landmarks = block_end_landmarks(length, self.config.landmark_stride, device)
        if self.cross_blocks and landmarks.numel():
            summary = start = x[:, landmarks]  # (B, L, d)
            summary_mask = None if key_mask is None else key_mask[:, landmarks]
            summary_positions = torch.arange(landmarks.numel(), device=device)
            for block in self.cross_blocks:
                summary = self._run(block, summary, summary_positions, summary_mask)
            x = x.index_copy(1, landmarks, _gated(start, summary, self.cross_gate))

        if retrieved is not None:
            states = self.encode_passages(retrieved, retrieved_mask) if not retrieved.dtype.is_floating_point \
                else retrieved
            x = self.retrieval_attention(x, states, retrieved_mask)
        positions = torch.arange(length, device=device)
        for block in self.synthesis_blocks:
            x = self._run(block, x, positions, key_mask)

        logits = self.lm_head(self.norm(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                          labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        return out

    def gradient_checkpointing_enable(self):
        """Recompute each block in the backward pass instead of keeping its activations (config.gradient_checkpointing
        = True; the transformers spelling, which HybridRAGTrainer calls)."""
        self.config.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.config.gradient_checkpointing = False

    def quantize(self, mode="w8a16", **kwargs):
        """`hybridrag.nn.quantize_model(self, mode, skip=INT8_SKIP + skip, ...)`: every nn.Linear to Int8Linear but
        the retrieval layer's relevance scorer (read as a weight matrix) and the tied LM head (reported as
        skipped). Returns the QuantizationReport."""
        skip = kwargs.pop("skip", ())
        skip = (skip,) if isinstance(skip, str) else tuple(skip)
        return quantize_model(self, mode, skip=INT8_SKIP + skip, **kwargs)

    def num_parameters(self):
        """Parameters counted once (tied weights once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def _gated(before, after, gate):
    """`after` without a gate, else before + gate * (after - before)."""
    return after if gate is None else before + gate * (after - before)
