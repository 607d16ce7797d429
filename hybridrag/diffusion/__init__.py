"""Diffusion models that make synthetic data for retention: text-to-embedding (a conditional DDPM in embedding
space, DDIM sampling, classifier-free guidance) and text-to-text (a masked discrete diffusion language model), their
training loops, a quality filter for generated samples, precision/recall and Frechet distance against real
embeddings, the hand-over of accepted samples to a knowledge base and a ContinualLearner, and DocumentGenerator
(synthetic passages for a knowledge base, conditioned on its encoder)."""
from .config import DiffusionConfig, TextDiffusionConfig
from .documents import DocumentGenerator
from .embedding import EmbeddingDiffusion, timestep_embedding, train_embedding_diffusion
from .quality import FilterResult, filter_samples, frechet_distance, hand_over, precision_recall, synthetic_ids
from .schedules import (Schedule, alpha_bars, cosine_alpha_bar, cosine_beta_schedule, ddim_timesteps,
                        linear_beta_schedule, make_schedule)
from .text import MaskedDiffusionLM, train_text_diffusion

__all__ = ["DiffusionConfig", "TextDiffusionConfig", "EmbeddingDiffusion", "train_embedding_diffusion",
           "timestep_embedding", "MaskedDiffusionLM", "DocumentGenerator", "train_text_diffusion", "filter_samples",
           "FilterResult",
           "precision_recall", "frechet_distance", "hand_over", "synthetic_ids", "Schedule", "make_schedule",
           "linear_beta_schedule", "cosine_beta_schedule", "cosine_alpha_bar", "alpha_bars", "ddim_timesteps"]
