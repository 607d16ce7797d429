"""The reader adapter: LoRA on the rows that read stitched passage caches (the hybrid method's recomputed tail of
the last passage, the question and the answer), switched off everywhere else.

Cached passages never attended to each other, so the keys and values a hybrid question reads are not those a
full-prompt forward would give it. TurboRAG fine-tunes the whole model on that pattern, and then every cached
passage has to be encoded by the fine-tuned model. Here only the reading side adapts: the passages stay the base
model's (one store for every method, encoded once), and a low-rank adapter, on only while the question-side rows
run, learns to answer from them as base RAG answers from the full prompt (hybridrag.train.reader_finetune distils
base RAG's answers into it: questions are all it needs, no gold answers).

    save_reader("reader.pt", model, spec, state, summary)    # what reader-finetune writes
    reader = load_reader("reader.pt")                         # a checked ReaderAdapter
    attach_reader(model, reader)                              # adapters in place, switched off
    with reading(model):                                      # on inside the block
        ...

File: a torch.save'd dict of plain data and tensors (read with weights_only=True): format, version, the model's
fingerprint (passage_store.fingerprint), the LoRA spec (rank, alpha, targets), the adapters' state and the
training summary. Memory: rank x (in + out) elements per adapted linear (SmolLM2-135M, rank 8, the seven linears of
each of its 30 layers: 2.44M parameters, 9.3 MiB in float32).
"""
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..nn.lora import apply_lora, load_lora_state_dict, lora_modules, lora_state_dict, set_lora_enabled

__all__ = ["ReaderAdapter", "save_reader", "load_reader", "attach_reader", "reading"]

FORMAT = "hybridrag-reader-adapter"
VERSION = 1


@dataclass
class ReaderAdapter:
    """A reader adapter as saved: the LoRA spec, its state, and what it was trained for.

    model: the fingerprint of the model it adapts (passage_store.fingerprint). rank, alpha, targets: apply_lora's
    arguments. state: lora_state_dict's tensors. trained_for: the system settings of its training (recompute_tokens,
    the passage pattern, top_k). summary: the training's figures (loss before and after, steps, seconds)."""

    model: str
    rank: int
    alpha: float
    targets: tuple
    state: dict
    trained_for: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def save_reader(path, model, reader_spec, summary=None):
    """Write the adapters of `model` (attached by attach_reader or apply_lora) with `reader_spec` (a ReaderAdapter
    whose state is ignored) to `path`, through a temporary file (a failed write leaves no half-written file)."""
    path = Path(path)
    if not lora_modules(model):
        raise ValueError("the model holds no LoRA adapter: train a reader first (hybridrag.train.reader_finetune)")
    payload = {"format": FORMAT, "version": VERSION, "model": reader_spec.model, "rank": reader_spec.rank,
               "alpha": reader_spec.alpha, "targets": list(reader_spec.targets), "state": lora_state_dict(model),
               "trained_for": _plain(reader_spec.trained_for), "summary": _plain(summary or reader_spec.summary)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)
    return path


def _plain(mapping):
    """`mapping` as plain JSON types (str subclasses such as torch's version become str), so weights_only loading
    reads it back."""
    return json.loads(json.dumps(dict(mapping), default=str))


def load_reader(path):
    """The ReaderAdapter in `path`; FileNotFoundError or ValueError (naming the file and what is wrong)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reader adapter at {path}: train one with `python -m hybridrag.train "
                                "reader-finetune`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise ValueError(f"{path} is not a readable reader adapter ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a reader adapter (no format {FORMAT!r} inside)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path} is a reader adapter of version {payload.get('version')!r}; this hybridrag reads "
                         f"version {VERSION}: train it again")
    missing = [key for key in ("model", "rank", "alpha", "targets", "state") if key not in payload]
    if missing:
        raise ValueError(f"{path}: the reader adapter lacks {missing}")
    return ReaderAdapter(payload["model"], payload["rank"], payload["alpha"], tuple(payload["targets"]),
                         payload["state"], payload.get("trained_for", {}), payload.get("summary", {}))


def attach_reader(model, reader, model_fingerprint=None):
    """Wrap `model`'s target linears in LoRA adapters holding `reader`'s state, switched off (the model's outputs
    are unchanged until `reading`). With model_fingerprint, a reader trained on another model is refused."""
    if model_fingerprint is not None and reader.model != model_fingerprint:
        raise ValueError(f"the reader adapter was trained on {reader.model}, not on this model "
                         f"({model_fingerprint}): train one for it")
    apply_lora(model, rank=reader.rank, alpha=reader.alpha, targets=reader.targets)
    load_lora_state_dict(model, reader.state)
    set_lora_enabled(model, False)
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def reading(model, enabled=True):
    """Inside the block the model's adapters are on (when `enabled` and it has any); off again after it."""
    active = bool(enabled) and bool(lora_modules(model))
    if active:
        set_lora_enabled(model, True)
    try:
        yield
    finally:
        if active:
            set_lora_enabled(model, False)
