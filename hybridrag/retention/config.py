"""RetentionConfig: the settings of the retention layer's parts in one dataclass, checked when built, read from a dict
or a JSON/YAML file, with builders that pass them to the classes.

    config = RetentionConfig.from_any(None | RetentionConfig | dict | "retention.json" | "retention.yaml")
    memory = config.memory_manager(dimension=384)          # MemoryManager
    retriever = config.adaptive_retriever(index)           # AdaptiveRetriever
    extractor, updater = config.feedback_extractor(), config.weight_updater()
    learner = config.continual_learner(neural_retriever)   # ContinualLearner

Unknown keys are refused, never ignored; every error names the field, what it must be and what it got. The classes
keep their own checks and defaults; the defaults here are theirs. The loader is hybridrag.config_file's.
"""
import dataclasses
import math
from dataclasses import dataclass

from ..config_file import ConfigFile, _check_choice, _check_int, _is_number
from .feedback import METHODS
from .memory import POLICIES

__all__ = ["RetentionConfig"]


def _number(where, value, *, low=-math.inf, high=math.inf, low_open=False, high_open=False, allow_none=False):
    if value is None and allow_none:
        return None
    ok = _is_number(value) and math.isfinite(value) and (low < value if low_open else low <= value) \
        and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{where} must be a finite number in {interval}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return float(value)


@dataclass
class RetentionConfig(ConfigFile):
    """Settings of hybridrag.retention (each group goes to one class; see that class for the meaning).

    MemoryManager: memory_capacity (>= 1 keys), memory_policy ("lru", "lfu", "importance"), memory_decay (in
        (0, 1]), memory_boost (finite >= 0).
    AdaptiveRetriever: coarse_k (>= 1), fine_k (1 <= fine_k <= coarse_k), threshold ("adaptive" or a finite
        number: JSON has no -inf, so "keep the fine_k best" is a very low number here), z (finite).
    FeedbackExtractor: feedback_threshold (None = 1 / items, or a share in (0, 1)).
    WeightUpdater: weight_method ("ema", "additive", "multiplicative"), weight_rate (in (0, 1] for ema, > 0
        otherwise), weight_bounds ((low, high) with 0 < low <= 1 <= high: the initial weight 1 lies inside).
    ContinualLearner: learning_rate (> 0), buffer_size (>= 1), batch_size (1 <= batch_size <= buffer_size),
        accumulation_steps (>= 1), checkpoint_every (None or >= 1 steps; needs a checkpoint_dir when building).
    """

    memory_capacity: int = 1024
    memory_policy: str = "lru"
    memory_decay: float = 0.99
    memory_boost: float = 1.0
    coarse_k: int = 50
    fine_k: int = 5
    threshold: str | float = "adaptive"
    z: float = 1.0
    feedback_threshold: float | None = None
    weight_method: str = "ema"
    weight_rate: float = 0.1
    weight_bounds: tuple = (0.1, 10.0)
    learning_rate: float = 1e-3
    buffer_size: int = 1024
    batch_size: int = 32
    accumulation_steps: int = 1
    checkpoint_every: int | None = None

    def __post_init__(self):
        _check_int("memory_capacity", self.memory_capacity, 1)
        _check_choice("memory_policy", self.memory_policy, POLICIES)
        self.memory_decay = _number("memory_decay", self.memory_decay, low=0.0, high=1.0, low_open=True)
        self.memory_boost = _number("memory_boost", self.memory_boost, low=0.0)
        _check_int("coarse_k", self.coarse_k, 1)
        _check_int("fine_k", self.fine_k, 1)
        if self.fine_k > self.coarse_k:
            raise ValueError(f"fine_k must be <= coarse_k ({self.coarse_k}), got {self.fine_k}")
        if isinstance(self.threshold, str):
            if self.threshold != "adaptive":
                raise ValueError(f"threshold must be 'adaptive' or a finite number, got {self.threshold!r}")
        else:
            self.threshold = _number("threshold", self.threshold)
        self.z = _number("z", self.z)
        self.feedback_threshold = _number("feedback_threshold", self.feedback_threshold, low=0.0, high=1.0,
                                          low_open=True, high_open=True, allow_none=True)
        _check_choice("weight_method", self.weight_method, METHODS)
        if self.weight_method == "ema":
            self.weight_rate = _number("weight_rate", self.weight_rate, low=0.0, high=1.0, low_open=True)
        else:
            self.weight_rate = _number("weight_rate", self.weight_rate, low=0.0, low_open=True)
        bounds = self.weight_bounds
        if isinstance(bounds, (str, bytes)) or not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise ValueError(f"weight_bounds must be a (low, high) pair, got {bounds!r}")
        low = _number("weight_bounds[0]", bounds[0], low=0.0, high=1.0, low_open=True)
        high = _number("weight_bounds[1]", bounds[1], low=1.0)
        self.weight_bounds = (low, high)
        self.learning_rate = _number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_int("buffer_size", self.buffer_size, 1)
        _check_int("batch_size", self.batch_size, 1)
        if self.batch_size > self.buffer_size:
            raise ValueError(f"batch_size must be <= buffer_size ({self.buffer_size}), got {self.batch_size}")
        _check_int("accumulation_steps", self.accumulation_steps, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 1, allow=(None,))

    def to_dict(self):
        """Plain JSON-serialisable dict; from_any(config.to_dict()) == config."""
        values = dataclasses.asdict(self)
        values["weight_bounds"] = list(self.weight_bounds)
        return values

    # ---------------------------------------------------------------- builders

    def memory_manager(self, dimension, *, normalize=True):
        """A MemoryManager of memory_capacity keys of `dimension` floats."""
        from .memory import MemoryManager

        return MemoryManager(self.memory_capacity, dimension, policy=self.memory_policy, decay=self.memory_decay,
                             boost=self.memory_boost, normalize=normalize)

    def adaptive_retriever(self, index, *, scorer=None):
        """An AdaptiveRetriever over `index` (search(queries, k) and reconstruct(ids), e.g. a VectorIndex)."""
        from .adaptive import AdaptiveRetriever

        return AdaptiveRetriever(index, coarse_k=self.coarse_k, fine_k=self.fine_k, scorer=scorer,
                                 threshold=self.threshold, z=self.z)

    def feedback_extractor(self):
        """A FeedbackExtractor (keyword form) with feedback_threshold."""
        from .feedback import FeedbackExtractor

        return FeedbackExtractor(threshold=self.feedback_threshold)

    def weight_updater(self):
        """A WeightUpdater (keyword form) with weight_method, weight_rate and weight_bounds."""
        from .feedback import WeightUpdater

        return WeightUpdater(method=self.weight_method, rate=self.weight_rate, bounds=self.weight_bounds)

    def continual_learner(self, retriever, *, checkpoint_dir=None, optimizer=None, seed=0):
        """A ContinualLearner of `retriever` (a NeuralRetriever) with the buffer, batch and accumulation settings."""
        from .continual import ContinualLearner

        return ContinualLearner(retriever, optimizer=optimizer, lr=self.learning_rate, buffer_size=self.buffer_size,
                                batch_size=self.batch_size, accumulation_steps=self.accumulation_steps,
                                checkpoint_dir=checkpoint_dir, checkpoint_every=self.checkpoint_every, seed=seed)
