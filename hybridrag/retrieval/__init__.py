"""Knowledge base, dense/BM25/hybrid search, learnable retrieval."""
