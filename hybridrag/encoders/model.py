"""HybridEncoder: a hybrid convolutional-transformer text encoder whose attention runs on the project's kernels.

    encoder = HybridEncoder(HybridEncoderConfig(...))       # or a dict / JSON / YAML path, see HybridEncoderConfig
    vectors = encoder.encode(["a text", "another"])         # float32 numpy (N, output_dim), rows L2-normalised
    out = encoder(input_ids, attention_mask)                # {"hidden": (B, T, d), "pooled": (B, d), "mask": (B, T)}
    encoder.quantize(QuantizationConfig(mode="w8a8"), calibration_texts=texts)
    encoder.save("encoder.pt"); encoder = HybridEncoder.load("encoder.pt")

Flow (the seeds' architecture):
    token embedding -> MultiScaleConv (parallel Conv1d, kernels 3/5/7: local features)
    -> transformer blocks (pre-norm; bidirectional window or hybrid attention on the kernels: global features)
    -> fusion(local, global) -> LayerNorm -> output projection -> pooling over the padding mask.
The transformer blocks run on the convolutional block's output, and the fusion mixes that output back in.

Positions: rotary embeddings (RoPE, applied to q and k inside the attention layers), not a learned table. The
attention is local (a band plus a few landmarks), and RoPE makes a score depend on the distance between two tokens,
not on where in the text the band sits; it adds no parameters and has no table that would cap the length below
max_length; and it keeps padding invariance (positions are 0..T-1 from each row's first token). The convolutions
need no positions: they see relative offsets by construction.

Padding: inputs are right-padded (real tokens first, as the tokenizer pads); forward refuses masks with a gap. Padding
keys are hidden from every query with the layers' `key_mask` (DESIGN.md's key padding), the convolutional block
zeroes padding positions before each convolution (its "same" zero padding then matches a text of that length
alone), and pooling averages real tokens only. So a text's outputs do not depend on what it is batched with.

Memory: no T x T matrix anywhere (the attention kernels work in blocks; the "reference" backend, for tests, alone
builds one). For a batch of B texts padded to T tokens, hidden size H, feed-forward width I, K conv kernels, h heads
of D, a window of w each side and L landmarks, a forward under no_grad holds O(B * T * max(K * H, I, 2 * H)) floats
of activations at a time (the conv block's concatenated features, the feed-forward hidden layer, the fused pair), the
attention's (B, h, T) float32 softmax statistics and its (B, h, L, D) gathered landmarks; attention work is
O(B * h * D * T * (2w + 1 + 2L)). encode(N texts) adds the tokenized ids of all N texts and its result: N * d float32
(pooled) or N * T_max * d float32 plus an (N, T_max) mask (return_pooled=False). The weights take size_bytes().

Training (distillation from all-MiniLM-L6-v2) is not here. The seam: forward is differentiable end to end and
returns "pooled" (compare with the teacher's sentence embedding: output_dim defaults to its 384, and the tokenizer to
its tokenizer, so both see the same input_ids) and "hidden" with "mask" (a token-level loss over real tokens).
"""
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._optional import import_optional
from ..checked_file import read_checked, state_mismatches, write_checked
from ..nn import HybridAttention, SlidingWindowAttention, quantize_model
from ..nn.common import check_positive
from ..nn.quantize import _tensor_bytes
from ..ops import QuantizedWeight
from ..ops.backend import BACKENDS
from ..retrieval.encoder import PROGRESS_THRESHOLD, bundled_model_path
from .config import HybridEncoderConfig, QuantizationConfig

EMBEDDING_INIT_STD = 0.02
FORMAT = 1


class MultiScaleConv(nn.Module):
    """Parallel 1-D convolutions over the sequence, one per kernel size, for multi-scale local features.

    y = x + dropout(proj(cat_k(GELU(conv_k(LayerNorm(x) * mask))))) * mask, each conv_k a Conv1d(H, H, k) with
    "same" padding (k // 2 zeros each side; k odd), proj a Linear(K * H, H).

    Padding does not leak: padding positions are zeroed before the convolutions, so a real token near the end of a
    row sees the same zeros the convolution's own padding gives a text of that length alone; and the output is zero
    at padding positions.

    forward(x (B, T, H), mask (B, T) bool, True = a real token) -> (B, T, H).
    Memory: the (B, T, K * H) concatenated features.
    """

    def __init__(self, hidden_size, kernel_sizes=(3, 5, 7), dropout=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.convs = nn.ModuleList(nn.Conv1d(hidden_size, hidden_size, k, padding=k // 2) for k in kernel_sizes)
        self.proj = nn.Linear(len(kernel_sizes) * hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        keep = mask.unsqueeze(-1).to(x.dtype)                                    # (B, T, 1)
        h = (self.norm(x) * keep).transpose(1, 2)                                # (B, H, T)
        features = torch.cat([F.gelu(conv(h)) for conv in self.convs], dim=1)   # (B, K*H, T)
        return (x + self.dropout(self.proj(features.transpose(1, 2)))) * keep


class _EncoderHybridAttention(HybridAttention):
    """HybridAttention with the encoder's landmarks: the first `num_prefix` tokens and every `stride`-th token of
    the call's T tokens (their union, sorted). Unlike HybridAttention's num_landmarks (spread over T), these positions
    do not move when a row is padded to a longer T, which keeps right-padded rows invariant."""

    def __init__(self, hidden_size, num_heads, *, num_prefix, stride, **options):
        super().__init__(hidden_size, num_heads, **options)
        self.num_prefix, self.stride = num_prefix, stride

    def landmarks_for(self, length, device=None):
        parts = [torch.arange(min(self.num_prefix, length), device=device)]
        if self.stride is not None:
            parts.append(torch.arange(0, length, self.stride, device=device))
        return torch.unique(torch.cat(parts))  # sorted, each position once

    def extra_repr(self):
        return (super().extra_repr().replace("num_landmarks=None", f"landmark_prefix={self.num_prefix}, "
                                                                    f"landmark_stride={self.stride}"))


class FeedForward(nn.Module):
    """Linear(H, I) -> GELU -> dropout -> Linear(I, H)."""

    def __init__(self, hidden_size, intermediate_size, dropout=0.0):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.down(self.dropout(F.gelu(self.up(x))))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + ffn(LN(x)), dropout on both branches.

    The attention is bidirectional (causal=False) with the band (w, w) (or (-1, -1) for window_size=-1) and RoPE:
    hybridrag.nn.SlidingWindowAttention for "window", HybridAttention with the encoder's landmarks and
    global_queries=True (a landmark token sees every token) for "hybrid". key_mask (B, T) bool hides padding keys.
    """

    def __init__(self, config, backend="auto"):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_heads
        w = config.window_size
        window = (w, w)  # -1 stays -1: unbounded on both sides
        self.norm1 = nn.LayerNorm(hidden)
        if config.attention == "window":
            self.attn = SlidingWindowAttention(hidden, heads, window, causal=False, bias=True, rope=True,
                                               backend=backend)
        else:
            self.attn = _EncoderHybridAttention(hidden, heads, window=window, num_prefix=config.num_landmark_tokens,
                                                stride=config.landmark_stride, causal=False, global_queries=True,
                                                rope=True, bias=True, backend=backend)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = FeedForward(hidden, config.intermediate_size, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, key_mask):
        x = x + self.dropout(self.attn(self.norm1(x), key_mask=key_mask))
        return x + self.dropout(self.ffn(self.norm2(x)))


class Fusion(nn.Module):
    """Combines the convolutional features `local` and the transformer features `global_` (both (B, T, H)):

    - "concat": Linear(2H, H) of their concatenation.
    - "weighted": g * global_ + (1 - g) * local with g = sigmoid(a learned per-channel logit), 0.5 at first.
    - "attention": per token, a softmax over the two sources of the scores v . tanh(W x + b), and their weighted sum
      (attention over 2 items per token: no T x T matrix).
    """

    def __init__(self, method, hidden_size):
        super().__init__()
        self.method = method
        if method == "concat":
            self.proj = nn.Linear(2 * hidden_size, hidden_size)
        elif method == "weighted":
            self.logit = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.score = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(),
                                       nn.Linear(hidden_size, 1, bias=False))

    def extra_repr(self):
        return f"method={self.method!r}"

    def forward(self, local, global_):
        if self.method == "concat":
            return self.proj(torch.cat((local, global_), dim=-1))
        if self.method == "weighted":
            gate = torch.sigmoid(self.logit)
            return gate * global_ + (1 - gate) * local
        sources = torch.stack((local, global_), dim=2)               # (B, T, 2, H)
        weights = torch.softmax(self.score(sources), dim=2)          # (B, T, 2, 1)
        return (weights * sources).sum(dim=2)


class HybridEncoder(nn.Module):
    """A hybrid convolutional-transformer text encoder (see the module docstring for the flow, positions, padding
    and memory).

    Args:
        config: a HybridEncoderConfig, a dict of its fields, a path to a JSON/YAML file of them, or None (defaults).
        backend: the attention and int8 ops' backend, "auto" | "triton" | "cpu" | "reference" (DESIGN.md).

    forward(input_ids (B, T) integer, attention_mask (B, T) bool/0-1 or None = all real) ->
        {"hidden": (B, T, output_dim) token states, zero at padding; "pooled": (B, output_dim) (mean over real tokens
        or the first token, config.pooling), not normalised; "mask": (B, T) bool}.
        T <= config.max_length; rows right-padded with at least one real token; ids in [0, vocab_size).
    """

    def __init__(self, config=None, *, backend="auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        config = HybridEncoderConfig.from_any(config)
        self.config = config
        self.backend = backend
        self.quantization = None  # the QuantizationConfig applied by quantize(), None while float
        self._tokenizer = None
        hidden = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, hidden)
        nn.init.normal_(self.embed.weight, std=EMBEDDING_INIT_STD)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.conv = MultiScaleConv(hidden, config.conv_kernel_sizes, config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config, backend) for _ in range(config.num_layers))
        self.fusion = Fusion(config.fusion, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, config.output_dim)

    @property
    def dimension(self):
        """The embedding dimension (config.output_dim)."""
        return self.config.output_dim

    # ---------------------------------------------------------------- forward

    def _check_inputs(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (B, T) with B, T >= 1, got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"input_ids has {length} tokens per row, more than max_length={self.config.max_length}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in "
                             f"[{low}, {high}]")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask.dtype != torch.bool:
            if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex or \
                    bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must be bool or hold only 0 and 1")
            attention_mask = attention_mask.bool()
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
        empty = (~attention_mask.any(dim=1)).nonzero()
        if len(empty):
            raise ValueError(f"attention_mask row {int(empty[0, 0])} has no real token; every row needs at least one")
        gaps = (attention_mask[:, 1:] & ~attention_mask[:, :-1]).any(dim=1).nonzero()
        if len(gaps):
            raise ValueError(f"attention_mask row {int(gaps[0, 0])} is not right-padded (a real token after a padding "
                             f"one); the encoder takes real tokens first, then padding")
        return attention_mask

    def forward(self, input_ids, attention_mask=None):
        mask = self._check_inputs(input_ids, attention_mask)
        x = self.embed_dropout(self.embed(input_ids))                     # (B, T, H)
        local = self.conv(x, mask)                                        # (B, T, H) local features
        h = local
        for block in self.blocks:
            h = block(h, mask)                                            # (B, T, H) global features
        fused = self.norm(self.fusion(local, h))
        keep = mask.unsqueeze(-1).to(fused.dtype)
        hidden = self.output(fused) * keep                                # (B, T, d), zero at padding
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = hidden.sum(dim=1) / keep.sum(dim=1)
        return {"hidden": hidden, "pooled": pooled, "mask": mask}

    # ---------------------------------------------------------------- text

    @property
    def tokenizer(self):
        """The tokenizer (loaded on first use): config.tokenizer's folder, or the bundled all-MiniLM-L6-v2's."""
        if self._tokenizer is None:
            transformers = import_optional("transformers", "transformers>=5.4", "transformers")
            if self.config.tokenizer is None:
                path = bundled_model_path()
            else:
                path = Path(self.config.tokenizer)
                if not path.is_dir():
                    raise ValueError(f"tokenizer {self.config.tokenizer!r} is not a local tokenizer folder "
                                     f"(tokenizers are never downloaded)")
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            if len(tokenizer) > self.config.vocab_size:
                raise ValueError(f"the tokenizer at {path} has {len(tokenizer)} tokens, more than vocab_size="
                                 f"{self.config.vocab_size}")
            if tokenizer.pad_token_id is None:
                raise ValueError(f"the tokenizer at {path} has no pad token")
            if tokenizer.num_special_tokens_to_add(pair=False) >= self.config.max_length:
                raise ValueError(f"max_length={self.config.max_length} leaves no room for text next to the "
                                 f"tokenizer's {tokenizer.num_special_tokens_to_add(pair=False)} special tokens")
            self._tokenizer = tokenizer
        return self._tokenizer

    def tokenize(self, texts, truncate=True):
        """Token ids of each text, special tokens included, cut to max_length: (list of lists of int, number cut,
        the longest length before cutting). Longer texts keep their first tokens (the tokenizer's own truncation,
        special tokens kept); truncate=False refuses them with a ValueError."""
        tokenizer, limit = self.tokenizer, self.config.max_length
        # verbose=False: no "longer than the model's maximum" message; the caller warns once for the whole input.
        ids = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        too_long = [i for i, row in enumerate(ids) if len(row) > limit]
        if not too_long:
            return ids, 0, max(map(len, ids))
        if not truncate:
            shown = ", ".join(map(str, too_long[:5])) + (", ..." if len(too_long) > 5 else "")
            raise ValueError(f"{len(too_long)} of {len(texts)} texts are longer than max_length={limit} tokens "
                             f"(texts {shown}); pass truncate=True to cut them")
        longest = max(map(len, ids))
        cut = tokenizer([texts[i] for i in too_long], add_special_tokens=True, truncation=True, max_length=limit,
                        verbose=False)["input_ids"]  # only the long texts are tokenized twice
        for i, row in zip(too_long, cut):
            ids[i] = row
        return ids, len(too_long), longest

    def _batch_tensors(self, rows, device):
        """Right-padded (input_ids, attention_mask) tensors for a list of id lists."""
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = True
        return input_ids.to(device), mask.to(device)

    def encode(self, texts, return_pooled=True, batch_size=32, normalize=True, progress=None, truncate=True):
        """Embed texts with the tokenizer (see `tokenizer`), in eval mode and without gradients.

        Args:
            texts: a str or a list (any sequence) of str. An empty list is a ValueError; a non-str item a TypeError
                naming its index.
            return_pooled: True for one vector per text; False for token states.
            batch_size: texts per forward pass (>= 1). Texts are batched by length (less padding); the result is in
                the input order and, since padding does not change a text's outputs, equal to encoding one by one.
            normalize: L2-normalise each vector (each pooled vector, or each token state).
            progress: a tqdm bar over the texts: True, False, or None for one on inputs of 1000 texts or more.
            truncate: texts over config.max_length tokens (special tokens included) keep their first tokens, with
                one UserWarning per call saying how many were cut; truncate=False raises a ValueError instead.

        Returns:
            return_pooled=True: float32 numpy (N, output_dim), or (output_dim,) for a lone str.
            return_pooled=False: (states, mask): states float32 (N, T, output_dim) with T the longest tokenized
                (and truncated) text, zero at padding; mask bool (N, T), True at real tokens. For a lone str,
                (T, output_dim) and (T,).
        The module's training/eval mode is restored afterwards.
        """
        single = isinstance(texts, str)
        texts = _check_texts([texts] if single else texts)
        check_positive("batch_size", batch_size)
        for name, value in (("return_pooled", return_pooled), ("normalize", normalize), ("truncate", truncate)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress must be True, False or None, got {progress!r}")
        ids, cut, longest = self.tokenize(texts, truncate=truncate)
        if cut:
            limit = self.config.max_length
            warnings.warn(f"{cut} of {len(texts)} texts were longer than max_length={limit} tokens (the longest had "
                          f"{longest}) and were truncated to their first {limit} tokens", UserWarning, stacklevel=2)
        if progress is None:
            progress = len(texts) >= PROGRESS_THRESHOLD
        tqdm = import_optional("tqdm", "tqdm", "retrieval").tqdm
        device = self.output.weight.device
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        dimension = self.config.output_dim
        if return_pooled:
            result = np.zeros((len(ids), dimension), dtype=np.float32)
        else:
            width = max(len(row) for row in ids)
            result = np.zeros((len(ids), width, dimension), dtype=np.float32)
            result_mask = np.zeros((len(ids), width), dtype=bool)
        training = self.training
        self.eval()
        try:
            with torch.inference_mode(), tqdm(total=len(ids), desc="encoding", unit="text",
                                              disable=not progress) as bar:
                for start in range(0, len(order), batch_size):
                    chosen = order[start:start + batch_size]
                    input_ids, mask = self._batch_tensors([ids[i] for i in chosen], device)
                    out = self(input_ids, mask)
                    if return_pooled:
                        vectors = out["pooled"].float()
                        if normalize:
                            vectors = F.normalize(vectors, dim=-1)
                        result[chosen] = vectors.cpu().numpy()
                    else:
                        states = out["hidden"].float()
                        if normalize:
                            states = F.normalize(states, dim=-1)  # zero at padding stays zero
                        length = states.shape[1]
                        result[chosen, :length] = states.cpu().numpy()
                        result_mask[chosen, :length] = mask.cpu().numpy()
                    bar.update(len(chosen))
        finally:
            self.train(training)
        if return_pooled:
            return result[0] if single else result
        return (result[0], result_mask[0]) if single else (result, result_mask)

    # ---------------------------------------------------------------- int8

    def quantize(self, quantization=None, calibration_texts=None):
        """Make the transformer blocks' attention (q/k/v/o) and feed-forward weights int8, in place, through
        hybridrag.nn.quantize_model (Int8Linear). Embeddings, convolutions, fusion, norms and the output projection
        stay float.

        Args:
            quantization: a QuantizationConfig (or dict / JSON / YAML path; None = W8A16 per channel). mode None
                leaves the encoder float.
            calibration_texts: None, or a list of str. W8A8 here quantizes activations dynamically, per token and per
                call (hr.int8_matmul takes no static activation scales), so there are no activation scales to
                calibrate and none are made up. These texts (at most quantization.calibration_batches batches of 32)
                are encoded before and after, and the agreement of the pooled, normalised outputs is reported.

        Returns:
            {"report": hybridrag.nn.QuantizationReport (None for mode None), "agreement": None or
            {"texts": n, "mean_cosine": float, "min_cosine": float}}.

        Raises ValueError for an encoder already quantized, a group_size that does not divide hidden_size and
        intermediate_size, or W8A8 with an intermediate_size beyond the int32 accumulation's exact range; nothing is
        changed then.
        """
        quantization = QuantizationConfig.from_any(quantization)
        if self.quantization is not None:
            raise ValueError(f"this encoder is already quantized ({self.quantization}); quantize a float encoder")
        group = quantization.group_size
        if group is not None:
            for name in ("hidden_size", "intermediate_size"):
                if getattr(self.config, name) % group != 0:
                    raise ValueError(f"group_size ({group}) must divide {name} ({getattr(self.config, name)})")
        if quantization.mode == "w8a8":
            from hybridrag.kernels.int8 import MAX_INT8_REDUCTION

            if self.config.intermediate_size > MAX_INT8_REDUCTION:
                raise ValueError(f"mode='w8a8' accumulates in int32, exact for in_features <= {MAX_INT8_REDUCTION}; "
                                 f"intermediate_size is {self.config.intermediate_size}")
        if calibration_texts is not None:
            calibration_texts = _check_texts(calibration_texts, "calibration_texts")
            calibration_texts = calibration_texts[:quantization.calibration_batches * 32]
        if quantization.mode is None:
            return {"report": None, "agreement": None}
        before = self.encode(calibration_texts, batch_size=32) if calibration_texts else None
        report = self._apply_quantization(quantization)
        agreement = None
        if calibration_texts:
            cosine = (before * self.encode(calibration_texts, batch_size=32)).sum(axis=1)
            agreement = {"texts": len(calibration_texts), "mean_cosine": float(cosine.mean()),
                         "min_cosine": float(cosine.min())}
        return {"report": report, "agreement": agreement}

    def _apply_quantization(self, quantization):
        report = quantize_model(self, mode=quantization.mode, group_size=quantization.group_size,
                                skip=lambda name, module: not name.startswith("blocks."), backend=self.backend)
        self.quantization = quantization
        return report

    def num_parameters(self):
        """Weights: float parameter elements plus int8 weight elements (the same count before and after quantize;
        the int8 weights' scales are not counted)."""
        count = sum(p.numel() for p in self.parameters())
        return count + sum(m.data.numel() for m in self.modules() if isinstance(m, QuantizedWeight))

    def size_bytes(self):
        """Bytes of the parameters and buffers (int8 weights and their float32 scales included), each tensor once."""
        return _tensor_bytes(self)

    # ---------------------------------------------------------------- files

    def save(self, path):
        """One file: the config, the quantization (if any) and the state dict, as a torch.save payload of plain
        data and tensors (read back with weights_only=True) behind a header with its SHA-256. Written through a
        temporary file and os.replace, so a reader sees the old file or the whole new one. Returns the path."""
        state = {"format": FORMAT, "config": self.config.to_dict(),
                 "quantization": None if self.quantization is None else self.quantization.to_dict(),
                 "state_dict": {name: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                                for name, value in self.state_dict().items()}}
        return write_checked(path, "HybridEncoder", FORMAT, state)

    @classmethod
    def load(cls, path, config=None, *, backend="auto", map_location="cpu"):
        """The encoder saved at `path` (by save), quantized as it was saved.

        config: None, or the config the caller expects (instance, dict or JSON/YAML path): a checkpoint saved with
        another config is a ValueError naming every differing field. A missing file is FileNotFoundError; a file
        that is not such a checkpoint, truncated or corrupt, a ValueError naming it; nothing is half-loaded."""
        path = Path(path)
        state = _read_checkpoint(path, map_location)
        try:
            saved = HybridEncoderConfig.from_any(state["config"])
            quantization = None if state["quantization"] is None else QuantizationConfig.from_any(
                state["quantization"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: the checkpoint's config is not valid here: {error}") from None
        if config is not None:
            wanted = HybridEncoderConfig.from_any(config)
            differ = saved.differences(wanted)
            if differ:
                listing = "; ".join(f"{name}: {mine!r} in the checkpoint, {theirs!r} in the given config"
                                    for name, mine, theirs in differ)
                raise ValueError(f"{path} holds an encoder of another config ({len(differ)} field(s) differ: "
                                 f"{listing})")
        encoder = cls(saved, backend=backend)
        if quantization is not None and quantization.mode is not None:
            encoder._apply_quantization(quantization)
        _check_state(path, state["state_dict"], encoder)
        encoder.load_state_dict(state["state_dict"])
        return encoder.to(map_location)


def _check_texts(texts, name="texts"):
    """A non-empty list of str: TypeError for a non-sequence or a non-str item (naming its index), ValueError when
    empty."""
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__") or isinstance(texts, dict):
        raise TypeError(f"{name} must be a str or a list of str, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: give at least one text")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] must be a str, got {type(text).__name__}")
    return texts


def _read_checkpoint(path, map_location):
    state = read_checked(path, "HybridEncoder", FORMAT, ("format", "config", "quantization", "state_dict"),
                         map_location)
    if not isinstance(state["state_dict"], dict):
        raise ValueError(f"{path} is not a HybridEncoder checkpoint: its state_dict is not a dict")
    return state


def _check_state(path, saved, encoder):
    """ValueError unless `saved` has exactly the encoder's state names, each tensor of the same shape and dtype."""
    parts = state_mismatches(saved, encoder.state_dict())
    if parts:
        raise ValueError(f"{path}: the checkpoint's weights do not match its config: {'; '.join(parts)}")
