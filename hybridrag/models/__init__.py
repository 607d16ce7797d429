"""Models built on the hybridrag layers: the hierarchical hybrid LM and its retrieval module."""
from .config import HierarchicalConfig
from .hierarchical import HierarchicalHybridRAG
from .retrieval_segments import Retrieval, RetrievalAugmentedSegments

__all__ = ["HierarchicalConfig", "HierarchicalHybridRAG", "RetrievalAugmentedSegments", "Retrieval"]
