"""Training: TrainingConfig and HybridRAGTrainer (AdamW, schedules, accumulation, autocast, evaluation, early
stopping, exact-resume checkpoints, DDP under torchrun), RAGDataset and its collate, and the marginal likelihood
through which a retriever learns from the language-model loss (RAG-sequence / REALM).

    from hybridrag.train import HybridRAGTrainer, TrainingConfig, RAGDataset
    trainer = HybridRAGTrainer(TrainingConfig(max_steps=1000), model, RAGDataset.from_jsonl("train.jsonl"))
    trainer.train()                         # trainer.train(resume_from="latest") continues a stopped run
"""
from .config import TrainingConfig
from .data import RAGCollator, RAGDataset, collate_rag
from .marginal import MarginalRAG, PassageIndex, answer_log_likelihood, marginal_nll, retrieval_posterior
from .tiny_lm import TinyCausalLM
from .trainer import HybridRAGTrainer

__all__ = ["TrainingConfig", "HybridRAGTrainer", "RAGDataset", "RAGCollator", "collate_rag", "marginal_nll",
           "retrieval_posterior", "answer_log_likelihood", "PassageIndex", "MarginalRAG", "TinyCausalLM"]
