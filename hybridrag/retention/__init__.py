"""Retention: a bounded memory with eviction, adaptive retrieval, attention-based feedback with per-item weights, and
continual fine-tuning of the retriever."""
from .adaptive import AdaptiveResult, AdaptiveRetriever
from .continual import ContinualLearner
from .feedback import FeedbackExtractor, WeightUpdater
from .memory import MemoryHit, MemoryItem, MemoryManager

__all__ = ["MemoryManager", "MemoryItem", "MemoryHit", "AdaptiveRetriever", "AdaptiveResult", "FeedbackExtractor",
           "WeightUpdater", "ContinualLearner"]
