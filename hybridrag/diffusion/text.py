"""Text-to-text diffusion: a masked (absorbing-state) discrete diffusion language model, as MDLM (Sahoo et al. 2024)
and LLaDA (Nie et al. 2025).

Forward process: at time t in (0, 1] each generated token is independently replaced by [MASK] with probability t.
The model, a small bidirectional transformer, predicts the original token at every masked position. Training
minimises the ELBO-weighted cross-entropy: the sum over masked positions of -log p(token), weighted 1 / t, divided
by the sequence length. Generation starts from all-[MASK] and unmasks over num_steps steps, each step fixing the
masked positions the model is most confident of (low-confidence remasking, LLaDA); a fixed token is never masked
again, so after the last step no [MASK] is left.

    model = MaskedDiffusionLM(TextDiffusionConfig(vocab_size=tokenizer_size, max_length=96))
    history = train_text_diffusion(model, targets, condition_ids=prompts, steps=2000, batch_size=32)
    ids = model.generate(prompt_ids, length=64, num_steps=32)        # (B, 64) int64, no [MASK]

Conditioning: a prefix of token ids condition_ids (B, Lc), never masked, that every position attends to; and/or
(config.condition_dim set) a condition vector (B, condition_dim) entering as one extra position. Sequences of a
batch share their lengths (no padding). Positions: learned, max_length of them (Lc + 1 + L <= max_length).

Memory: plain PyTorch attention (nn.TransformerEncoderLayer) materialises a (B, num_heads, S, S) score matrix per
layer for S = Lc (+ 1) + L positions, so S is meant to stay small (hundreds); activations are B x S x hidden_dim a
layer. Generation runs one forward pass per step that unmasks something.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.common import _check_flag, _check_positive_int
from .config import TextDiffusionConfig, _check_number
from .training import make_optimizer, run_steps

MIN_MASK_RATE = 1e-3  # t ~ U(MIN_MASK_RATE, 1): the 1 / t weight stays bounded (LLaDA's eps)


class MaskedDiffusionLM(nn.Module):
    """A bidirectional transformer over [condition vector] + condition tokens + generated tokens that predicts the
    tokens behind [MASK] (id config.vocab_size). See the module docstring."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config = TextDiffusionConfig.from_any(config)
        hidden = config.hidden_dim
        self.tokens = nn.Embedding(config.vocab_size + 1, hidden)  # + [MASK]
        self.positions = nn.Embedding(config.max_length, hidden)
        self.segments = nn.Embedding(2, hidden)  # 0 = condition, 1 = generated
        self.condition = None if config.condition_dim is None else nn.Linear(config.condition_dim, hidden)
        layer = nn.TransformerEncoderLayer(hidden, config.num_heads, dim_feedforward=4 * hidden,
                                           dropout=config.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, config.vocab_size)  # never predicts [MASK]

    @property
    def mask_token_id(self):
        return self.config.mask_token_id

    def extra_repr(self):
        c = self.config
        return (f"vocab_size={c.vocab_size}, max_length={c.max_length}, hidden_dim={c.hidden_dim}, "
                f"num_layers={c.num_layers}, condition_dim={c.condition_dim}")

    # ---------------------------------------------------------------- inputs

    def _check_ids(self, name, ids, *, allow_mask=False):
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{name} must be an integer tensor of token ids, got {ids.dtype}")
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise ValueError(f"{name} must have shape (B, L) with B >= 1, got {tuple(ids.shape)}")
        high = self.config.vocab_size + (1 if allow_mask else 0)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= high):
            raise ValueError(f"{name} token ids must lie in [0, {high}), got {int(ids.min())} .. {int(ids.max())}")
        return ids.long()

    def _check_condition(self, condition_ids, condition, rows, generated):
        """(condition_ids or None, condition or None), checked against the batch size and max_length."""
        config = self.config
        prefix = 0
        if condition_ids is not None:
            condition_ids = self._check_ids("condition_ids", condition_ids)
            if condition_ids.shape[0] != rows:
                raise ValueError(f"condition_ids has {condition_ids.shape[0]} rows but the batch has {rows}")
            prefix += condition_ids.shape[1]
        if condition is not None:
            if self.condition is None:
                raise ValueError("condition (a vector) needs a model built with condition_dim; this one has "
                                 "condition_dim=None: condition by condition_ids instead")
            if not isinstance(condition, torch.Tensor) or not condition.dtype.is_floating_point:
                got = condition.dtype if isinstance(condition, torch.Tensor) else type(condition).__name__
                raise TypeError(f"condition must be a floating-point tensor (B, condition_dim), got {got}")
            if condition.dim() != 2 or condition.shape[1] != config.condition_dim:
                raise ValueError(f"condition must have shape (B, condition_dim={config.condition_dim}), got "
                                 f"{tuple(condition.shape)}")
            if condition.shape[0] != rows:
                raise ValueError(f"condition has {condition.shape[0]} rows but the batch has {rows}")
            if not torch.isfinite(condition).all():
                raise ValueError("condition holds NaN or inf values")
            prefix += 1
        if prefix + generated > config.max_length:
            raise ValueError(f"the condition ({prefix} positions) and {generated} generated tokens need "
                             f"{prefix + generated} positions, more than max_length={config.max_length}")
        return condition_ids, condition

    # ---------------------------------------------------------------- network

    def forward(self, tokens, condition_ids=None, condition=None):
        """Logits (B, L, vocab_size) over the generated positions, for tokens (B, L) (ids, [MASK] allowed),
        condition_ids (B, Lc) or None and condition (B, condition_dim) or None. Inputs are not checked here:
        loss and generate check them."""
        parts, segments = [], []
        device = tokens.device
        if condition is not None:
            parts.append(self.condition(condition.to(self.head.weight.dtype))[:, None])  # [B, 1, H]
            segments.append(torch.zeros(1, dtype=torch.long, device=device))
        if condition_ids is not None:
            parts.append(self.tokens(condition_ids))
            segments.append(torch.zeros(condition_ids.shape[1], dtype=torch.long, device=device))
        parts.append(self.tokens(tokens))
        segments.append(torch.ones(tokens.shape[1], dtype=torch.long, device=device))
        h = torch.cat(parts, dim=1)  # [B, S, H]
        segments = torch.cat(segments)
        h = h + self.positions(torch.arange(h.shape[1], device=device))[None] + self.segments(segments)[None]
        h = self.encoder(h)
        return self.head(self.norm(h[:, -tokens.shape[1]:]))

    def loss(self, targets, condition_ids=None, condition=None, *, generator=None):
        """The masked-diffusion loss of targets (B, L) given the condition: t ~ U(0.001, 1) per row, each token
        masked with probability t, loss = mean over rows of sum_masked -log p(target) / (t * L). A row may draw no
        mask (it adds 0). Returns a scalar."""
        targets = self._check_ids("targets", targets)
        rows, length = targets.shape
        condition_ids, condition = self._check_condition(condition_ids, condition, rows, length)
        device = targets.device
        t = MIN_MASK_RATE + (1 - MIN_MASK_RATE) * torch.rand(rows, 1, device=device, generator=generator)
        masked = torch.rand(rows, length, device=device, generator=generator) < t  # [B, L]
        noised = torch.where(masked, torch.full_like(targets, self.mask_token_id), targets)
        logits = self(noised, condition_ids, condition)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, L]
        return ((nll * masked) / t).sum(dim=1).div(length).mean()

    @torch.no_grad()
    def generate(self, condition=None, length=None, num_steps=None, *, condition_ids=None, batch_size=None,
                 temperature=0.0, order="confidence", generator=None):
        """Generate (B, length) int64 token ids (none of them [MASK]).

        condition: an integer tensor (B, Lc) of condition token ids, or a float tensor (B, condition_dim) (a
            condition vector; needs config.condition_dim), or None; condition_ids: token ids alongside a condition
            vector. With neither, batch_size rows are generated unconditionally.
        length: tokens to generate (>= 1; default max_length minus the condition's positions).
        num_steps: unmasking steps (>= 1; default config.sampling_steps). Step s fixes the masked positions the
            model is most confident of until round(length * s / num_steps) tokens are fixed; num_steps > length
            leaves some steps with nothing to fix (they run no forward pass), num_steps = length fixes one token a
            step.
        temperature: 0 = each position's most likely token; > 0 = sampled from softmax(logits / temperature) with
            generator. The confidence is the chosen token's probability.
        order: which masked positions a step fixes: "confidence" (the ones the model is surest of, LLaDA's
            low-confidence remasking) or "random" (uniformly at random with generator, as MDLM's ancestral sampler;
            confidence ordering of an undertrained model fills the sequence with its most frequent token first).
        """
        config = self.config
        if condition is not None and isinstance(condition, torch.Tensor) and not condition.dtype.is_floating_point:
            if condition_ids is not None:
                raise ValueError("condition holds token ids and condition_ids is given too: pass the ids once")
            condition_ids, condition = condition, None
        source, name = (condition, "condition") if condition is not None else (condition_ids, "condition_ids")
        if source is None:
            if batch_size is None:
                raise ValueError("generate needs a condition, condition_ids or batch_size (for unconditional rows)")
            _check_positive_int("batch_size", batch_size)
            rows = batch_size
        else:
            if not isinstance(source, torch.Tensor):
                raise TypeError(f"{name} must be a tensor of token ids (B, Lc) or a condition vector (B, "
                                f"condition_dim), got {type(source).__name__}")
            if source.dim() != 2:
                raise ValueError(f"{name} must have shape (B, Lc) (token ids) or (B, condition_dim) (a vector), got "
                                 f"{tuple(source.shape)}")
            rows = source.shape[0]
            if batch_size is not None and batch_size != rows:
                raise ValueError(f"batch_size={batch_size} but {name} has {rows} rows")
        prefix = (0 if not isinstance(condition_ids, torch.Tensor) or condition_ids.dim() != 2
                  else condition_ids.shape[1]) + (0 if condition is None else 1)
        if length is None:
            length = config.max_length - prefix
        _check_positive_int("length", length)
        num_steps = config.sampling_steps if num_steps is None else num_steps
        _check_positive_int("num_steps", num_steps)
        temperature = _check_number("temperature", temperature, 0.0)
        if order not in ("confidence", "random"):
            raise ValueError(f"order must be 'confidence' or 'random', got {order!r}")
        condition_ids, condition = self._check_condition(condition_ids, condition, rows, length)
        device = self.head.weight.device
        condition_ids = None if condition_ids is None else condition_ids.to(device)
        condition = None if condition is None else condition.to(device)
        tokens = torch.full((rows, length), self.mask_token_id, dtype=torch.long, device=device)
        was_training = self.training
        self.eval()
        try:
            fixed = 0
            for step in range(1, num_steps + 1):
                target = round(length * step / num_steps)
                if target == fixed:
                    continue
                logits = self(tokens, condition_ids, condition).float()  # [B, L, V]
                if temperature == 0:
                    probs = logits.softmax(dim=-1)
                    confidence, choice = probs.max(dim=-1)
                else:
                    probs = (logits / temperature).softmax(dim=-1)
                    choice = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
                    choice = choice.reshape(rows, length)
                    confidence = probs.gather(-1, choice[..., None])[..., 0]
                masked = tokens == self.mask_token_id
                if order == "random":
                    confidence = torch.rand(confidence.shape, generator=generator, device=device)
                confidence = confidence.masked_fill(~masked, -math.inf)  # fixed tokens stay
                picked = confidence.topk(target - fixed, dim=1).indices  # [B, target - fixed]
                tokens.scatter_(1, picked, choice.gather(1, picked))
                fixed = target
        finally:
            self.train(was_training)
        return tokens


def train_text_diffusion(model, targets, condition_ids=None, condition=None, *, steps, batch_size=32, lr=None,
                         progress=True, weight_decay=None, seed=0, optimizer=None):
    """Train `model` (a MaskedDiffusionLM) on targets (N, L) with condition_ids (N, Lc) and/or condition vectors
    (N, condition_dim) for `steps` AdamW steps of `batch_size` rows drawn at random (with replacement). Returns the
    loss history (list of floats). optimizer: None (a new AdamW(lr, default 1e-3; weight_decay, default 0)) or one to
    continue with (then lr and weight_decay must be left out). A loss that is not finite stops training with FloatingPointError. The model is
    left in eval mode; progress: a tqdm bar (the retrieval extra)."""
    if not isinstance(model, MaskedDiffusionLM):
        raise TypeError(f"model must be a MaskedDiffusionLM, got {type(model).__name__}")
    targets = model._check_ids("targets", targets)
    condition_ids, condition = model._check_condition(condition_ids, condition, targets.shape[0], targets.shape[1])
    _check_positive_int("steps", steps)
    _check_positive_int("batch_size", batch_size)
    if lr is not None:
        _check_number("lr", lr, 0.0, low_open=True)
    _check_flag("progress", progress)
    device = model.head.weight.device
    targets = targets.to(device)
    condition_ids = None if condition_ids is None else condition_ids.to(device)
    condition = None if condition is None else condition.to(device)
    optimizer = make_optimizer(model, optimizer, lr, weight_decay)

    def loss_of_rows(rows, generator):
        return model.loss(targets[rows], None if condition_ids is None else condition_ids[rows],
                          None if condition is None else condition[rows], generator=generator)
    return run_steps(model, optimizer, loss_of_rows, rows=targets.shape[0], steps=steps, batch_size=batch_size,
                     seed=seed, description="text diffusion", progress=progress)
