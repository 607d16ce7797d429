"""Retention: bounded memory with eviction, adaptive retrieval, attention-based feedback, continual learning."""
