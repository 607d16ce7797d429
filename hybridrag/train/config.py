"""TrainingConfig: every knob of HybridRAGTrainer, checked when built, read from a dict or a JSON/YAML file.

    TrainingConfig.from_any(None | TrainingConfig | dict | "train.json" | "train.yaml")

The nested "attention" and "retriever" sections are hybridrag.system.config's AttentionConfig and RetrieverConfig
(an instance or a dict of their fields). Unknown keys are refused, never ignored. Every error is a ValueError or
TypeError naming the field, what it must be and what it got. `to_dict()` gives plain JSON that `from_any` reads back
equal.
"""
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config_file import ConfigFile, _build, _check_bool, _check_choice, _check_int, _is_int, _is_number
from ..system.config import _DEVICE, AttentionConfig, RetrieverConfig

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")
NORMALIZATIONS = ("tokens", "examples")

# Fields a resumed run may change: they decide what is logged, saved or shown, never the numbers trained.
RESUME_FREE = ("output_dir", "log_every", "eval_every", "save_every", "progress_bar")


def _check_number(where, value, low, high=math.inf, *, low_open=False, allow_none=False):
    if value is None and allow_none:
        return None
    ok = _is_number(value) and math.isfinite(value) and (low < value if low_open else low <= value) \
        and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        also = " or None" if allow_none else ""
        raise ValueError(f"{where} must be a finite number in {bracket}{low}, {high}]{also}, got {value!r}")
    return float(value)


@dataclass
class TrainingConfig(ConfigFile):
    """How HybridRAGTrainer trains.

    attention, retriever: the model's AttentionConfig and RetrieverConfig (recorded with every checkpoint).
    learning_rate (> 0), weight_decay (>= 0), adam_betas (two numbers in [0, 1)), adam_eps (> 0): AdamW.
    batch_size: examples per micro-batch on each process (>= 1). The examples of one optimizer step are
        batch_size * gradient_accumulation_steps * world_size.
    epochs: passes over the training data (>= 1), or None for no epoch bound; max_steps: optimizer steps (>= 1) or
        None. Training stops at whichever bound comes first; at least one must be set.
    gradient_accumulation_steps: micro-batches per optimizer step (>= 1). The last step of an epoch may have fewer.
    warmup_steps: steps of linear warmup from 0 to learning_rate (>= 0); schedule after it: "linear" (to 0 at the
        last step), "cosine" (to 0 at the last step) or "constant".
    max_grad_norm: clip the gradients' global L2 norm to this (> 0), or None for no clipping.
    loss_normalization: "tokens" (the step's loss is the mean over all its label tokens, whatever the micro-batch
        and process they fall in: model losses must be means over label tokens) or "examples" (over its rows).
    mixed_precision: "no", "bf16" (autocast; CPU or a CUDA device with bfloat16) or "fp16" (autocast with a
        gradient scaler; CUDA only).
    gradient_checkpointing: call the model's gradient_checkpointing_enable() (the model must have it).
    eval_every, save_every, log_every: every n optimizer steps (>= 1), or None for never (eval_every/save_every;
        a checkpoint is still written when training ends or stops early).
    early_stopping_patience: stop after this many evaluations (>= 1) without an improvement of the metric by more
        than early_stopping_min_delta (>= 0); None = never stop early (then it needs eval_every).
    early_stopping_metric: a key of evaluate()'s result ("eval_loss" or one from compute_metrics);
        early_stopping_mode: "min" or "max".
    output_dir: where checkpoints and log.jsonl go.
    seed: seeds torch, numpy and python's random at the start (an int).
    shuffle: a new order of the training data every epoch (seeded by seed and the epoch).
    progress_bar: a tqdm bar on rank 0.
    device: "cpu", "cuda" or "cuda:<n>" (under torchrun with CUDA each process takes cuda:<LOCAL_RANK>).
    passage_refresh_every: re-encode the model's passage index with the current document tower every n steps
        (>= 1; the model must have refresh_passages()), or None.
    """

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 8
    epochs: int | None = 1
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    loss_normalization: str = "tokens"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 10
    early_stopping_patience: int | None = None
    early_stopping_metric: str = "eval_loss"
    early_stopping_mode: str = "min"
    early_stopping_min_delta: float = 0.0
    output_dir: str = "runs/train"
    seed: int = 0
    shuffle: bool = True
    progress_bar: bool = True
    device: str = "cpu"
    passage_refresh_every: int | None = None

    def __post_init__(self):
        for name, kind in (("attention", AttentionConfig), ("retriever", RetrieverConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(kind, value, name))
            elif not isinstance(value, kind):
                raise TypeError(f"{name} must be a dict or a {kind.__name__}, got {type(value).__name__}")
        self.learning_rate = _check_number("learning_rate", self.learning_rate, 0.0, low_open=True)
        self.weight_decay = _check_number("weight_decay", self.weight_decay, 0.0)
        betas = self.adam_betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 \
                or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        self.adam_betas = tuple(float(b) for b in betas)
        self.adam_eps = _check_number("adam_eps", self.adam_eps, 0.0, low_open=True)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("epochs", self.epochs, 1, allow=(None,))
        _check_int("max_steps", self.max_steps, 1, allow=(None,))
        if self.epochs is None and self.max_steps is None:
            raise ValueError("epochs and max_steps are both None: set at least one (training stops at whichever "
                             "bound comes first)")
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_choice("schedule", self.schedule, SCHEDULES)
        self.max_grad_norm = _check_number("max_grad_norm", self.max_grad_norm, 0.0, low_open=True, allow_none=True)
        _check_choice("loss_normalization", self.loss_normalization, NORMALIZATIONS)
        _check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        _check_bool("gradient_checkpointing", self.gradient_checkpointing)
        _check_int("eval_every", self.eval_every, 1, allow=(None,))
        _check_int("save_every", self.save_every, 1, allow=(None,))
        _check_int("log_every", self.log_every, 1)
        _check_int("early_stopping_patience", self.early_stopping_patience, 1, allow=(None,))
        if not isinstance(self.early_stopping_metric, str) or not self.early_stopping_metric:
            raise ValueError(f"early_stopping_metric must be a non-empty str, got {self.early_stopping_metric!r}")
        _check_choice("early_stopping_mode", self.early_stopping_mode, ("min", "max"))
        self.early_stopping_min_delta = _check_number("early_stopping_min_delta", self.early_stopping_min_delta, 0.0)
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError(f"early_stopping_patience={self.early_stopping_patience} needs eval_every (early "
                             "stopping counts evaluations), got eval_every=None")
        if isinstance(self.output_dir, Path):
            self.output_dir = str(self.output_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a path (non-empty str), got {self.output_dir!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        _check_bool("shuffle", self.shuffle)
        _check_bool("progress_bar", self.progress_bar)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<n>', got {self.device!r}")
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ValueError("mixed_precision='fp16' needs a CUDA device (float16 autocast with a gradient scaler); "
                             "on device='cpu' use 'bf16' or 'no'")
        _check_int("passage_refresh_every", self.passage_refresh_every, 1, allow=(None,))

    def to_dict(self):
        """Plain JSON-serialisable dict; from_any(config.to_dict()) == config."""
        values = dataclasses.asdict(self)
        values["adam_betas"] = list(self.adam_betas)
        return values

    def changes_from(self, other):
        """[(field, other's value, self's value)] for the fields that differ and change training (not RESUME_FREE)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [(name, theirs[name], mine[name]) for name in mine
                if name not in RESUME_FREE and mine[name] != theirs[name]]

