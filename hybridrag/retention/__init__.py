"""Retention: a bounded memory with eviction, adaptive retrieval, attention-based feedback with per-item weights (also
in seed 004's form, with the weights in a HyperedgeGraph), and continual fine-tuning of the retriever."""
from .adaptive import AdaptiveResult, AdaptiveRetriever
from .config import RetentionConfig
from .continual import ContinualLearner
from .feedback import FeedbackExtractor, WeightUpdater
from .memory import MemoryHit, MemoryItem, MemoryManager
from .seed_weights import HyperedgeGraph

__all__ = ["MemoryManager", "MemoryItem", "MemoryHit", "AdaptiveRetriever", "AdaptiveResult", "FeedbackExtractor",
           "WeightUpdater", "HyperedgeGraph", "ContinualLearner", "RetentionConfig"]
