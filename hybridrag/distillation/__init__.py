"""Distillation: a teacher-student cascade (the student answers first and escalates to the teacher when its
confidence is below a threshold chosen on validation data), confidence measures, distillation losses (KL on
temperature-softened logits, embedding cosine/MSE) and ready-made retrieval and system models for the cascade.

    from hybridrag.distillation import TeacherStudentCascade, retrieval_cascade
    cascade = retrieval_cascade(documents, HashingEncoder(256))      # student hashing, teacher all-MiniLM-L6-v2
    cascade.calibrate(validation_queries, target_agreement=0.9)
    out = cascade("a query")                                          # out["answered_by"]: "student" | "teacher"
    cascade.stats()                                                   # kept share, escalations, time saved

The model protocol and the threshold rule: hybridrag.distillation.cascade.
"""
from .adapters import KnowledgeBaseAnswerer, SystemAnswerer, retrieval_cascade
from .cascade import TeacherStudentCascade, default_agreement, text_agreement, top1_agreement
from .confidence import MEASURES, confidence, max_probability, score_entropy, score_margin, token_entropy
from .config import DistillationConfig
from .losses import embedding_distillation_loss, kl_distillation_loss

__all__ = ["TeacherStudentCascade", "DistillationConfig", "kl_distillation_loss", "embedding_distillation_loss",
           "confidence", "score_margin", "score_entropy", "token_entropy", "max_probability", "MEASURES",
           "default_agreement", "text_agreement", "top1_agreement", "KnowledgeBaseAnswerer", "SystemAnswerer",
           "retrieval_cascade"]
