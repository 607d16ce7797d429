"""DistillationConfig: the teacher-student cascade's and the distillation losses' settings, checked when built, read
from a dict or a JSON/YAML file.

    DistillationConfig.from_any(None | DistillationConfig | dict | "distillation.json" | "distillation.yaml")

Unknown keys are refused, never ignored; every error names the field, what it must be and what it got. The loader
is hybridrag.config_file's, the one every layer's config shares.
"""
import math
from dataclasses import dataclass

from ..config_file import ConfigFile, _check_choice, _is_number
from .confidence import BOUNDED_MEASURES, MEASURES
from .losses import EMBEDDING_LOSSES

__all__ = ["DistillationConfig", "check_threshold"]


def check_threshold(threshold, measure, where="threshold"):
    """threshold as a float (or None): finite, or +inf (every answer escalates: what calibrate sets when no
    threshold reaches its target, so a calibrated threshold can be passed on); in [0, 1] for a bounded measure; >= 0
    for "margin" (margins are >= 0: 0 keeps every answer). A callable measure or "given" takes any finite number."""
    if threshold is None:
        return None
    if _is_number(threshold) and threshold == math.inf:
        return math.inf
    if not _is_number(threshold) or not math.isfinite(threshold):
        raise ValueError(f"{where} must be None (set by calibrate), a finite number or inf (escalate every answer), "
                         f"got {threshold!r}")
    if measure in BOUNDED_MEASURES and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{where} must lie in [0, 1] for measure {measure!r} (its confidence is in [0, 1]), "
                         f"got {threshold!r}")
    if measure == "margin" and threshold < 0:
        raise ValueError(f"{where} must be >= 0 for measure 'margin' (a score margin is >= 0; 0 keeps every "
                         f"answer), got {threshold!r}")
    return float(threshold)


@dataclass
class DistillationConfig(ConfigFile):
    """Settings of hybridrag.distillation.

    measure: the student's confidence, one of "margin", "entropy", "token_entropy", "max_prob", "attention",
        "given" (hybridrag.distillation.confidence).
    threshold: None (chosen by TeacherStudentCascade.calibrate on validation data) or the confidence at or above
        which the student's answer is kept: in [0, 1] for the bounded measures, >= 0 for "margin".
    target_agreement: in (0, 1]: calibrate picks the lowest threshold whose kept validation answers agree with
        the teacher (or the gold answers) at least this often.
    score_temperature: finite > 0, the softmax temperature over retrieval scores of the "entropy" measure.
    temperature: finite > 0, T of kl_distillation_loss (both distributions softened by T, the loss scaled by T^2).
    embedding_loss: "cosine" or "mse", the kind of embedding_distillation_loss.
    """

    measure: str = "margin"
    threshold: float | None = None
    target_agreement: float = 0.95
    score_temperature: float = 1.0
    temperature: float = 2.0
    embedding_loss: str = "cosine"

    def __post_init__(self):
        _check_choice("measure", self.measure, tuple(MEASURES))
        self.threshold = check_threshold(self.threshold, self.measure)
        if not _is_number(self.target_agreement) or not 0.0 < self.target_agreement <= 1.0:
            raise ValueError(f"target_agreement must be a number in (0, 1], got {self.target_agreement!r}")
        for name in ("score_temperature", "temperature"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
            setattr(self, name, float(value))
        self.target_agreement = float(self.target_agreement)
        _check_choice("embedding_loss", self.embedding_loss, EMBEDDING_LOSSES)
