"""The diffusion models' configurations, checked when built, read from a dict or a JSON/YAML file.

    DiffusionConfig.from_any(None | DiffusionConfig | dict | "diffusion.json" | "diffusion.yaml")
    TextDiffusionConfig.from_any(...)

Unknown keys are refused, never ignored. Every error is a ValueError or TypeError naming the field, what it must be
and what it got. `to_dict()` gives plain JSON that `from_any` reads back equal.

The file loader is hybridrag.config_file's, the one every layer's config shares.
"""
import math
from dataclasses import dataclass

from ..config_file import ConfigFile, _check_choice, _is_number
from ..config_file import _check_int as _check_int_or
from .schedules import make_schedule

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "x0", "v")
LINEAR_BETAS = (1e-4, 0.02)  # DDPM's (Ho et al. 2020) beta_1 and beta_T for T = 1000
MAX_FINAL_ALPHA_BAR = 1e-2  # the schedule must bring alpha_bar_T below this: sampling starts from pure noise
MAX_EPSILON_GAIN = 1e3  # epsilon prediction without clip_x0 needs sqrt((1 - abar_T) / abar_T) below this


def _check_int(where, value, minimum, *, allow_none=False):
    return _check_int_or(where, value, minimum, allow=(None,) if allow_none else ())


def _check_number(where, value, low, high=math.inf, *, low_open=False, high_open=False, allow_none=False):
    """float(value) if it is a finite number in the interval; ValueError naming `where` otherwise."""
    if value is None and allow_none:
        return None
    ok = _is_number(value) and math.isfinite(value) and (low < value if low_open else low <= value) and (
        value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        also = " or None" if allow_none else ""
        raise ValueError(f"{where} must be a finite number in {interval}{also}, got {value!r}")
    return float(value)


@dataclass
class DiffusionConfig(ConfigFile):
    """A denoising diffusion model in embedding space (hybridrag.diffusion.EmbeddingDiffusion).

    dim: size of the generated vectors (>= 1).
    condition_dim: size of the condition vectors (>= 1); None = dim (a query embedding of the same encoder).
    hidden_dim, num_layers: the MLP denoiser's width (>= 1) and number of residual blocks (>= 1).
    timesteps: T, the diffusion steps of training (>= 2).
    schedule: "linear" (DDPM: betas evenly spaced from beta_start to beta_end) or "cosine" (Nichol & Dhariwal 2021:
        alpha_bar(t) = cos^2(((t / T) + 0.008) / 1.008 * pi / 2), betas clipped at 0.999).
    beta_start, beta_end: the linear schedule's first and last beta, 0 < beta_start <= beta_end < 1; None = DDPM's
        (1e-4, 0.02). They apply to schedule="linear" only (setting them with "cosine" is refused). The schedule
        must bring alpha_bar_T below 0.01 (samples start from pure noise): DDPM's betas need T >= ~250.
    prediction: what the network predicts: "epsilon" (the noise; DDPM's loss), "x0" (the clean vector; it tends
        to shrink samples toward their mean) or "v" (sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022).
        With "epsilon" the clean vector is estimated as (z - sqrt(1 - abar) eps) / sqrt(abar): at the first
        sampling step the network's error is multiplied by sqrt((1 - abar_T) / abar_T), which is 152 for DDPM's
        linear schedule but 2e4 for the cosine one (its last beta is 0.999). Above 1000 "epsilon" needs clip_x0
        (refused otherwise); "v" has no such gain.
    condition_dropout: the probability (in [0, 1)) that training replaces a condition with the learned null
        condition, which classifier-free guidance needs; 0 = no null condition is trained.
    guidance_scale: the default classifier-free guidance weight w (>= 0): the prediction is
        uncond + w * (cond - uncond), so 1 = conditional only (one network call a step), 0 = unconditional, > 1 =
        guided. Any w != 1 needs condition_dropout > 0.
    sampling_steps: default DDIM steps (1 <= sampling_steps <= timesteps).
    eta: default DDIM noise, in [0, 1]: 0 = deterministic DDIM, 1 = DDPM's posterior variance.
    clip_x0: None, or a bound c > 0: each DDIM step clamps its predicted clean vector (in the model's standardized
        units, see EmbeddingDiffusion) to [-c, c].
    """

    dim: int = 384
    condition_dim: int | None = None
    hidden_dim: int = 512
    num_layers: int = 4
    timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float | None = None
    beta_end: float | None = None
    prediction: str = "epsilon"
    condition_dropout: float = 0.1
    guidance_scale: float = 1.0
    sampling_steps: int = 50
    eta: float = 0.0
    clip_x0: float | None = None

    def __post_init__(self):
        _check_int("dim", self.dim, 1)
        _check_int("condition_dim", self.condition_dim, 1, allow_none=True)
        if self.condition_dim is None:
            self.condition_dim = self.dim
        _check_int("hidden_dim", self.hidden_dim, 1)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("timesteps", self.timesteps, 2)
        _check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if value is not None and self.schedule != "linear":
                raise ValueError(f"{name} applies to schedule='linear' only; leave it unset (None) with "
                                 f"schedule={self.schedule!r}, got {value!r}")
            setattr(self, name, _check_number(name, value, 0.0, 1.0, low_open=True, high_open=True,
                                              allow_none=True))
        start, end = self.betas_range
        if start is not None and start > end:
            raise ValueError(f"beta_start must be <= beta_end, got beta_start={start} and beta_end={end}")
        _check_choice("prediction", self.prediction, PREDICTIONS)
        self.condition_dropout = _check_number("condition_dropout", self.condition_dropout, 0.0, 1.0,
                                               high_open=True)
        self.guidance_scale = _check_number("guidance_scale", self.guidance_scale, 0.0)
        check_guidance(self.guidance_scale, self.condition_dropout, "guidance_scale")
        _check_int("sampling_steps", self.sampling_steps, 1)
        if self.sampling_steps > self.timesteps:
            raise ValueError(f"sampling_steps must be <= timesteps={self.timesteps}, got {self.sampling_steps}")
        self.eta = _check_number("eta", self.eta, 0.0, 1.0)
        self.clip_x0 = _check_number("clip_x0", self.clip_x0, 0.0, low_open=True, allow_none=True)
        final = float(make_schedule(self.schedule, self.timesteps, *self.betas_range).alpha_bars[-1])
        if final > MAX_FINAL_ALPHA_BAR:
            raise ValueError(f"timesteps={self.timesteps} with the {self.schedule} schedule {self.betas_range} leaves "
                             f"alpha_bar_T = {final:.3g} > {MAX_FINAL_ALPHA_BAR}: the last step keeps "
                             f"{math.sqrt(final):.0%} of the signal, so sampling from pure noise would start off the "
                             "training distribution; raise timesteps or beta_end")
        gain = math.sqrt((1 - final) / final)
        if self.prediction == "epsilon" and self.clip_x0 is None and gain > MAX_EPSILON_GAIN:
            raise ValueError(f"prediction='epsilon' with the {self.schedule} schedule over {self.timesteps} steps "
                             f"multiplies the network's error by sqrt((1 - alpha_bar_T) / alpha_bar_T) = {gain:.3g} "
                             f"(> {MAX_EPSILON_GAIN:g}) when the first sampling step estimates the clean vector; "
                             "use prediction='v', or set clip_x0 (e.g. 3.0 for standardized data)")

    @property
    def betas_range(self):
        """(beta_start, beta_end) with DDPM's defaults filled in for "linear"; (None, None) for "cosine"."""
        if self.schedule != "linear":
            return None, None
        return (LINEAR_BETAS[0] if self.beta_start is None else self.beta_start,
                LINEAR_BETAS[1] if self.beta_end is None else self.beta_end)


def check_guidance(guidance_scale, condition_dropout, where):
    """ValueError when a guidance weight other than 1 would use a null condition that was never trained."""
    if guidance_scale != 1.0 and condition_dropout == 0.0:
        raise ValueError(f"{where}={guidance_scale} needs the unconditional prediction, but condition_dropout is 0 "
                         "so the null condition is never trained; use guidance_scale=1.0 or train with "
                         "condition_dropout > 0 (e.g. 0.1)")


@dataclass
class TextDiffusionConfig(ConfigFile):
    """A masked (absorbing-state) discrete diffusion language model (hybridrag.diffusion.MaskedDiffusionLM).

    vocab_size: token ids 0 .. vocab_size - 1 (>= 2); the [MASK] token gets the extra id vocab_size.
    max_length: the most positions one sequence has: condition tokens + 1 (a condition vector) + generated tokens.
    hidden_dim, num_layers, num_heads: the bidirectional transformer (hidden_dim divisible by num_heads).
    condition_dim: None (condition by a prefix of token ids only), or the size of condition vectors, which enter as
        one extra position (a linear map of the vector).
    dropout: in the transformer layers, in [0, 1).
    sampling_steps: default unmasking steps of generate (>= 1).
    """

    vocab_size: int = 1024
    max_length: int = 128
    hidden_dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    condition_dim: int | None = None
    dropout: float = 0.0
    sampling_steps: int = 32

    def __post_init__(self):
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("max_length", self.max_length, 1)
        _check_int("hidden_dim", self.hidden_dim, 1)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("num_heads", self.num_heads, 1)
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim must be divisible by num_heads={self.num_heads}, got {self.hidden_dim}")
        _check_int("condition_dim", self.condition_dim, 1, allow_none=True)
        self.dropout = _check_number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        _check_int("sampling_steps", self.sampling_steps, 1)

    @property
    def mask_token_id(self):
        return self.vocab_size
