"""Training: TrainingConfig and HybridRAGTrainer (AdamW, schedules, accumulation, autocast, evaluation, early
stopping, exact-resume checkpoints, DDP under torchrun), RAGDataset and its collate, and the marginal likelihood
through which a retriever learns from the language-model loss (RAG-sequence / REALM); RAG tasks (retrieval messages
in conversations, multi-hop retrieval), their prompt formatting and rewards; fine-tuning the LLM with retrieval
(`python -m hybridrag.train rag-finetune | refrag-finetune`, LoRA over a float or int8 base).

    from hybridrag.train import HybridRAGTrainer, TrainingConfig, RAGDataset
    trainer = HybridRAGTrainer(TrainingConfig(max_steps=1000), model, RAGDataset.from_jsonl("train.jsonl"))
    trainer.train()                         # trainer.train(resume_from="latest") continues a stopped run
"""
from .config import TrainingConfig
from .data import RAGCollator, RAGDataset, collate_rag
from .finetune import FinetuneConfig, rag_finetune
from .finetune_model import load_finetuned
from .formatting import (create_rag_training_example, format_documents_for_prompt, format_multihop_documents,
                         render_rag_conversation_for_tokenizer)
from ..nn.lora import LoRALinear, apply_lora, merge_lora
from .marginal import MarginalRAG, PassageIndex, answer_log_likelihood, marginal_nll, retrieval_posterior
from .refrag import RefragConfig, refrag_finetune
from .rewards import check_hallucination, compute_rag_reward
from .tasks import MultiHopRAGTask, RAGTask, StaticRAGTask, create_rag_task
from .tiny_lm import TinyCausalLM
from .trainer import HybridRAGTrainer

__all__ = ["TrainingConfig", "HybridRAGTrainer", "RAGDataset", "RAGCollator", "collate_rag", "marginal_nll",
           "retrieval_posterior", "answer_log_likelihood", "PassageIndex", "MarginalRAG", "TinyCausalLM",
           "RAGTask", "StaticRAGTask", "MultiHopRAGTask", "create_rag_task", "format_documents_for_prompt",
           "format_multihop_documents", "render_rag_conversation_for_tokenizer", "create_rag_training_example",
           "compute_rag_reward", "check_hallucination", "FinetuneConfig", "rag_finetune", "load_finetuned",
           "RefragConfig", "refrag_finetune", "LoRALinear", "apply_lora", "merge_lora"]
