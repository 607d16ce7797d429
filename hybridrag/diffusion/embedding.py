"""Text-to-embedding diffusion: a DDPM in embedding space, conditioned on a condition vector (a query embedding),
trained with the epsilon (or x0) loss and classifier-free condition dropout, sampled by DDIM.

    model = EmbeddingDiffusion(DiffusionConfig(dim=384))
    history = train_embedding_diffusion(model, doc_embeddings, query_embeddings, steps=2000, batch_size=256)
    samples = model.sample(query_embeddings[:8], num_steps=50, guidance_scale=2.0)     # (8, 384)

Shapes: vectors x (B, dim), conditions (B, condition_dim), timesteps t (B,) int64 in [0, T). Memory: the MLP's
weights (about (2 * dim + condition_dim + (3 * num_layers + 2) * hidden_dim) * hidden_dim floats) and B x hidden_dim
activations a layer; sampling holds 2B rows when guidance is on (guidance_scale != 1).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.common import _check_flag, _check_positive_int
from .config import DiffusionConfig, _check_number, check_guidance
from .schedules import ddim_timesteps, make_schedule
from .training import make_optimizer, run_steps


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding (B, dim) float32 of integer timesteps t (B,) (Transformer positions / DDPM): the first
    half cos(t * f_i), the second sin(t * f_i), f_i = max_period ** (-i / half); an odd dim gets a zero column."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1))
    angles = t.to(torch.float32)[:, None] * freqs[None]  # [B, half]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(embedding, (0, dim - 2 * half))


class _ResidualBlock(nn.Module):
    """h + W2 silu(W1 LN(h) + U silu(e)): a pre-norm MLP block with the timestep+condition embedding e added in."""

    def __init__(self, hidden_dim):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.inner = nn.Linear(hidden_dim, hidden_dim)
        self.embed = nn.Linear(hidden_dim, hidden_dim)
        self.outer = nn.Linear(hidden_dim, hidden_dim)
        nn.init.zeros_(self.outer.weight)  # each block starts as the identity
        nn.init.zeros_(self.outer.bias)

    def forward(self, h, e):
        return h + self.outer(F.silu(self.inner(self.norm(h)) + self.embed(F.silu(e))))


class EmbeddingDiffusion(nn.Module):
    """A conditional denoiser of vectors: an MLP of residual blocks, fed the sinusoidal timestep embedding and a
    projection of the condition vector (or a learned null condition, for classifier-free guidance).

    Network: z -> Linear -> num_layers pre-norm residual blocks (each adds a projection of timestep embedding +
    condition embedding) -> Linear. There is no normalization before the output layer: at high noise the best
    epsilon is nearly z itself, which a layer norm there (it removes each row's scale) makes hard to express.

    Standardization: the buffers `shift` (dim,) and `scale` () map data to model units, z = (x - shift) / scale;
    `loss` takes and `sample` returns data units. They start as 0 and 1; `fit_statistics(embeddings)` sets them to
    the data's mean and overall standard deviation (train_embedding_diffusion does this on its first call), so
    embeddings of any scale (unit vectors in 384 dims have per-coordinate spread ~0.05) meet noise of unit variance.
    """

    def __init__(self, config=None):
        super().__init__()
        self.config = config = DiffusionConfig.from_any(config)
        hidden = config.hidden_dim
        self.schedule = make_schedule(config.schedule, config.timesteps, *config.betas_range)
        self.register_buffer("alpha_bars", self.schedule.alpha_bars.to(torch.float32), persistent=False)
        self.register_buffer("shift", torch.zeros(config.dim))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.input = nn.Linear(config.dim, hidden)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.condition = nn.Linear(config.condition_dim, hidden)
        self.null_condition = nn.Parameter(torch.randn(hidden) * 0.02)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden) for _ in range(config.num_layers))
        self.output = nn.Linear(hidden, config.dim)

    def extra_repr(self):
        c = self.config
        return (f"dim={c.dim}, condition_dim={c.condition_dim}, schedule={c.schedule!r}, timesteps={c.timesteps}, "
                f"prediction={c.prediction!r}")

    # ---------------------------------------------------------------- inputs

    def _check_vectors(self, name, x, width, what, rows=None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"{name} must have shape (B, {what}={width}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty (0 rows)")
        if rows is not None and x.shape[0] != rows:
            raise ValueError(f"{name} has {x.shape[0]} rows but x0 has {rows}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} holds NaN or inf values")
        return x

    def fit_statistics(self, embeddings):
        """Set shift to the mean (dim,) and scale to the overall standard deviation of embeddings (N >= 2, dim)."""
        self._check_vectors("embeddings", embeddings, self.config.dim, "dim")
        if embeddings.shape[0] < 2:
            raise ValueError(f"embeddings needs at least 2 rows to estimate a spread, got {embeddings.shape[0]}")
        x = embeddings.detach().to(self.shift.device, torch.float64)
        mean = x.mean(dim=0)
        std = (x - mean).pow(2).mean().sqrt()
        if std == 0:
            raise ValueError("embeddings are all identical: their standard deviation is 0")
        self.shift.copy_(mean)
        self.scale.copy_(std)
        self.fitted.fill_(True)
        return self

    # ---------------------------------------------------------------- network

    def forward(self, z, t, condition, drop=None):
        """The network's prediction (B, dim) (epsilon or x0, config.prediction) for z (B, dim) in model units,
        timesteps t (B,) and condition (B, condition_dim); drop: None, or a bool mask (B,) of rows that get the
        null condition instead."""
        e = self.time(timestep_embedding(t, self.config.hidden_dim).to(z.dtype))
        c = self.condition(condition.to(z.dtype))
        if drop is not None:
            c = torch.where(drop[:, None], self.null_condition.to(c.dtype)[None], c)
        e = e + c
        h = self.input(z)
        for block in self.blocks:
            h = block(h, e)
        return self.output(h)

    def q_sample(self, z0, t, noise):
        """The forward process: sqrt(abar_t) z0 + sqrt(1 - abar_t) noise, all (B, dim)."""
        abar = self.alpha_bars[t].to(z0.dtype)[:, None]
        return abar.sqrt() * z0 + (1 - abar).sqrt() * noise

    def loss(self, x0, condition, *, generator=None):
        """DDPM's simple loss: mean squared error of the predicted noise (or clean vector, prediction="x0") at a
        uniform random timestep, for x0 (B, dim) and condition (B, condition_dim) in data units. In training mode
        each condition is replaced by the null condition with probability config.condition_dropout."""
        config = self.config
        self._check_vectors("x0", x0, config.dim, "dim")
        self._check_vectors("condition", condition, config.condition_dim, "condition_dim", rows=x0.shape[0])
        batch, device = x0.shape[0], x0.device
        z0 = (x0 - self.shift.to(x0.dtype)) / self.scale.to(x0.dtype)
        t = torch.randint(0, config.timesteps, (batch,), device=device, generator=generator)
        noise = torch.randn(z0.shape, device=device, dtype=z0.dtype, generator=generator)
        drop = None
        if self.training and config.condition_dropout > 0:
            drop = torch.rand(batch, device=device, generator=generator) < config.condition_dropout
        prediction = self(self.q_sample(z0, t, noise), t, condition, drop)
        if config.prediction == "epsilon":
            target = noise
        elif config.prediction == "x0":
            target = z0
        else:  # v = sqrt(abar) eps - sqrt(1 - abar) z0 (Salimans & Ho 2022)
            abar = self.alpha_bars[t].to(z0.dtype)[:, None]
            target = abar.sqrt() * noise - (1 - abar).sqrt() * z0
        return F.mse_loss(prediction, target)

    def _predict(self, z, t, condition, guidance_scale):
        """(epsilon, x0) predictions (B, dim) at one timestep t (an int), with classifier-free guidance."""
        batch = z.shape[0]
        steps = torch.full((batch,), t, device=z.device, dtype=torch.long)
        if guidance_scale == 1.0:
            out = self(z, steps, condition)
        else:  # the conditional and the unconditional rows in one call
            drop = torch.cat([torch.zeros(batch, dtype=torch.bool, device=z.device),
                              torch.ones(batch, dtype=torch.bool, device=z.device)])
            both = self(z.repeat(2, 1), steps.repeat(2), condition.repeat(2, 1), drop)
            conditional, unconditional = both[:batch], both[batch:]
            out = unconditional + guidance_scale * (conditional - unconditional)
        abar = self.alpha_bars[t].to(z.dtype)
        prediction = self.config.prediction
        if prediction == "epsilon":
            eps = out
            x0 = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
        elif prediction == "x0":
            x0 = out
        else:
            x0 = abar.sqrt() * z - (1 - abar).sqrt() * out
            eps = (1 - abar).sqrt() * z + abar.sqrt() * out
        if self.config.clip_x0 is not None:
            x0 = x0.clamp(-self.config.clip_x0, self.config.clip_x0)
        if prediction == "x0" or self.config.clip_x0 is not None:
            eps = (z - abar.sqrt() * x0) / (1 - abar).sqrt()  # the noise consistent with the (clipped) x0
        return eps, x0

    @torch.no_grad()
    def sample(self, condition, num_steps=None, guidance_scale=None, eta=None, *, noise=None, generator=None,
               return_trajectory=False):
        """Vectors (B, dim) in data units for condition (B, condition_dim), by DDIM (Song et al. 2021) over
        num_steps of the T training steps (ddim_timesteps: T-1 first, evenly spaced).

        num_steps: default config.sampling_steps, 1 <= num_steps <= T.
        guidance_scale: classifier-free guidance weight w (default config.guidance_scale): uncond + w * (cond -
            uncond); 1 = conditional only, > 1 pushes samples toward the condition. w != 1 needs a model trained with
            condition_dropout > 0.
        eta: default config.eta. 0 = deterministic given the starting noise; 1 = the DDPM posterior's variance
            (with num_steps = T this is ancestral DDPM sampling).
        noise: None, or the starting noise (B, dim) (standard normal in model units); otherwise drawn with
            generator.
        return_trajectory: also return the list of the num_steps + 1 intermediate states (model units).
        Each step: x0_hat from the prediction, then z_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev -
        sigma^2) eps_hat + sigma * n, sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t /
        abar_prev), with abar_prev = 1 after the last step.
        """
        config = self.config
        param = self.output.weight
        self._check_vectors("condition", condition, config.condition_dim, "condition_dim")
        num_steps = config.sampling_steps if num_steps is None else num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= config.timesteps:
            raise ValueError(f"num_steps must be an int in [1, timesteps={config.timesteps}], got {num_steps!r}")
        guidance_scale = config.guidance_scale if guidance_scale is None else \
            _check_number("guidance_scale", guidance_scale, 0.0)
        check_guidance(guidance_scale, config.condition_dropout, "guidance_scale")
        eta = config.eta if eta is None else _check_number("eta", eta, 0.0, 1.0)
        batch = condition.shape[0]
        condition = condition.to(param.device, param.dtype)
        if noise is None:
            z = torch.randn((batch, config.dim), generator=generator, device=param.device, dtype=param.dtype)
        else:
            self._check_vectors("noise", noise, config.dim, "dim")
            if noise.shape[0] != batch:
                raise ValueError(f"noise has {noise.shape[0]} rows but condition has {batch}")
            z = noise.to(param.device, param.dtype)
        steps = ddim_timesteps(config.timesteps, num_steps).tolist()
        trajectory = [z]
        was_training = self.training
        self.eval()
        try:
            for i, t in enumerate(steps):
                eps, x0 = self._predict(z, t, condition, guidance_scale)
                abar = self.alpha_bars[t].to(z.dtype)
                abar_prev = self.alpha_bars[steps[i + 1]].to(z.dtype) if i + 1 < len(steps) else z.new_tensor(1.0)
                sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
                z = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
                if eta > 0:
                    z = z + sigma * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                trajectory.append(z)
        finally:
            self.train(was_training)
        samples = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        return (samples, trajectory) if return_trajectory else samples


def train_embedding_diffusion(model, embeddings, conditions, steps, batch_size=256, lr=None, progress=True, *,
                              weight_decay=None, seed=0, standardize=True, optimizer=None):
    """Train `model` (an EmbeddingDiffusion) on pairs (embeddings (N, dim), conditions (N, condition_dim)) for
    `steps` AdamW steps of `batch_size` pairs drawn at random (with replacement). Returns the loss history (list of
    `steps` floats).

    standardize: on a model whose statistics are not fitted yet, fit them to `embeddings` first (see
        EmbeddingDiffusion); later calls keep them, so training can go on in several calls.
    optimizer: None (a new AdamW(lr, default 1e-3; weight_decay, default 0)) or one to continue with (then lr and
        weight_decay must be left out: they would be unused).
    progress: a tqdm bar (tqdm comes with hybridrag's retrieval extra).
    A loss that is not finite stops training with FloatingPointError naming the step. The model is left in eval
    mode.
    """
    if not isinstance(model, EmbeddingDiffusion):
        raise TypeError(f"model must be an EmbeddingDiffusion, got {type(model).__name__}")
    model._check_vectors("embeddings", embeddings, model.config.dim, "dim")
    model._check_vectors("conditions", conditions, model.config.condition_dim, "condition_dim")
    if conditions.shape[0] != embeddings.shape[0]:
        raise ValueError(f"conditions has {conditions.shape[0]} rows but embeddings has {embeddings.shape[0]}")
    _check_positive_int("steps", steps)
    _check_positive_int("batch_size", batch_size)
    if lr is not None:
        _check_number("lr", lr, 0.0, low_open=True)
    _check_flag("progress", progress)
    _check_flag("standardize", standardize)
    if standardize and not bool(model.fitted):
        model.fit_statistics(embeddings)
    device = model.output.weight.device
    embeddings, conditions = embeddings.to(device), conditions.to(device)
    optimizer = make_optimizer(model, optimizer, lr, weight_decay)

    def loss_of_rows(rows, generator):
        return model.loss(embeddings[rows], conditions[rows], generator=generator)
    return run_steps(model, optimizer, loss_of_rows, rows=embeddings.shape[0], steps=steps, batch_size=batch_size,
                     seed=seed, description="embedding diffusion", progress=progress)
