"""reader-finetune: distil base RAG's answers into the hybrid method's reader adapter (hybridrag.system.reader).

For each training question the system retrieves its passages, and base RAG (the full prompt, full attention,
adapters off) answers it greedily: that answer, token for token, is the target. The student is the hybrid method
itself: the stitched passage caches of the base model, then the question-side rows (the last passage's recomputed
tail, the question, the answer) with the adapters on; the loss is the cross-entropy of the target tokens (the
eos token included when base RAG stopped). Only the adapters learn, and only through the question-side rows, so
the passage store stays valid for every method. Questions need no gold answers, so the questions of a retrieval
query set do; keep them apart from the questions the system is evaluated on.

    examples = teacher_examples(system, questions)                # [ReaderExample], base RAG's answers
    summary = train_reader(system, examples, ReaderConfig(epochs=2))   # adapters on system's model, trained
    save_reader("reader.pt", system.language_model.model, reader_spec(system, config), summary)

Memory: the model, its adapters and their AdamW state (3 x the adapters' parameters), one question's stitched
cache with the autograd graph of its question-side rows, and the passage store, which should hold every training
question's passages: an evicted passage is encoded again at every step that needs it (reader_finetune trains on a
store of its own sized for that; the summary's passage_store counts the evictions).
"""
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..nn.common import check_positive
from ..nn.lora import DEFAULT_TARGETS, apply_lora, lora_modules, set_lora_enabled
from ..retrieval.documents import jsonl_records
from ..system.generation import stream_generate
from ..system.model import is_shared
from ..system.passage_cache import cache_argument
from ..system.passage_store import PassageKVStore, fingerprint
from ..system.reader import ReaderAdapter, save_reader
from ..system.system import PromptParts

__all__ = ["ReaderConfig", "ReaderExample", "read_questions", "teacher_examples", "reader_loss", "train_reader",
           "reader_spec", "reader_finetune"]


@dataclass
class ReaderConfig:
    """epochs over the examples, learning_rate (AdamW's peak; cosine decay to 0 after warmup_steps of linear
    warm-up), rank / alpha / targets of the adapters, seed (the adapters' init and the examples' order)."""

    epochs: int = 2
    learning_rate: float = 5e-4
    warmup_steps: int = 10
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "rank"):
            check_positive(name, getattr(self, name))
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        for name in ("learning_rate", "alpha"):
            check_positive(name, getattr(self, name), float)
        self.targets = tuple(self.targets)


@dataclass
class ReaderExample:
    """One training question: its prompt's token parts (PromptParts) and base RAG's answer, (1, n) token ids."""

    question: str
    parts: PromptParts
    answer: torch.Tensor


def _check_questions(questions):
    if isinstance(questions, str) or not isinstance(questions, (list, tuple)) or not questions:
        raise ValueError(f"questions must be a non-empty list of strings, got {questions!r}")
    for position, question in enumerate(questions):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"questions[{position}] must be a non-empty str, got {question!r}")


def read_questions(path):
    """The questions of a JSONL file, one object a line with a "question" (or a "query") string."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such questions file: {path}")
    questions = []
    for where, record in jsonl_records(path):
        text = record.get("question", record.get("query")) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: expected an object with a non-empty \"question\" or \"query\" string, "
                             f"got {json.dumps(record)[:80]!r}")
        questions.append(text)
    if not questions:
        raise ValueError(f"{path} holds no question")
    return questions


def teacher_examples(system, questions, *, progress=True):
    """[ReaderExample] of `questions` (strings): base RAG's greedy answers (system.config.generation's
    max_new_tokens), the adapters off. Time: one base RAG answer per question."""
    _check_questions(questions)
    if system.knowledge_base is None:
        raise ValueError("the system has no knowledge base: create_vectorstore(documents) first")
    model = system.language_model.model
    limit = system.config.generation.max_new_tokens
    examples = []
    set_lora_enabled(model, False)
    for question in tqdm(questions, desc="base RAG answers", unit="question", disable=not progress):
        parts = system.prompt_parts(question, [hit.document for hit in system.retrieve(question)])
        ids = [token.id for token in stream_generate(model, parts.full(), max_new_tokens=limit, temperature=0.0)]
        examples.append(ReaderExample(question, parts, torch.tensor([ids], device=parts.suffix.device)))
    return examples


def reader_loss(system, example):
    """Mean cross-entropy of example.answer under the hybrid method: the stitched cache is built with the adapters
    off (no graph), the question-side rows run with them on (the model's adapters take the gradient)."""
    model = system.language_model.model
    set_lora_enabled(model, False)
    with torch.no_grad():
        input_ids, cache = system.prefill_inputs(example.parts, "hybrid")
    set_lora_enabled(model, True)
    try:
        ids = torch.cat([input_ids, example.answer[:, :-1]], dim=1)
        logits = model(input_ids=ids, use_cache=True, **{cache_argument(model): cache}).logits
    finally:
        set_lora_enabled(model, False)
    n = example.answer.shape[1]
    return torch.nn.functional.cross_entropy(logits[0, -n:].float(), example.answer[0])


def _learning_rate(config, step, total):
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def _mean_loss(system, examples):
    with torch.no_grad():
        return sum(float(reader_loss(system, example)) for example in examples) / len(examples)


def train_reader(system, examples, config=None, *, held_out=(), progress=True):
    """Attach fresh adapters (config's rank, alpha, targets) to system's model and train them on `examples`
    (batch 1, config.epochs passes in a seeded order). Returns the summary: steps, seconds, the losses a step, and
    the mean loss on `examples` and on `held_out` (ReaderExamples) before and after. The model must hold no
    adapter yet and be a copy of the system's own (load_language_model(fresh=True)): training changes it."""
    config = config or ReaderConfig()
    if not examples:
        raise ValueError("examples is empty: give teacher_examples at least one question")
    if is_shared(system.language_model):
        raise ValueError("the system's language model is the process-wide shared one, and training would change "
                         "it for every system: create the system with "
                         "language_model=load_language_model(..., fresh=True)")
    model = system.language_model.model
    if lora_modules(model):
        raise ValueError("the system's model holds adapters already: train the reader on a system without "
                         "reader_adapter")
    torch.manual_seed(config.seed)
    apply_lora(model, rank=config.rank, alpha=config.alpha, targets=config.targets)
    set_lora_enabled(model, False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    order, total = random.Random(config.seed), config.epochs * len(examples)
    summary = {"examples": len(examples), "held_out": len(held_out), "parameters": sum(p.numel() for p in parameters)}
    summary["loss_before"] = _mean_loss(system, examples)
    if held_out:
        summary["held_out_loss_before"] = _mean_loss(system, held_out)
    losses, start, step = [], time.perf_counter(), 0
    bar = tqdm(total=total, desc="reader adapter", unit="step", disable=not progress)
    for _ in range(config.epochs):
        for index in order.sample(range(len(examples)), len(examples)):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step, total)
            loss = reader_loss(system, examples[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.requires_grad_(False)
    summary.update(steps=step, seconds=time.perf_counter() - start, losses=losses,
                   loss_after=_mean_loss(system, examples), passage_store=system.passages.stats())
    if held_out:
        summary["held_out_loss_after"] = _mean_loss(system, held_out)
    return summary


def reader_spec(system, config):
    """The ReaderAdapter (without state) that save_reader writes for adapters trained on `system` with `config`."""
    c = system.config
    trained_for = {"recompute_tokens": c.recompute_tokens, "pattern": list(c.attention.pattern),
                   "top_k": c.retriever.top_k}
    return ReaderAdapter(fingerprint(system.language_model), config.rank, float(config.alpha), config.targets, {},
                         trained_for)


def reader_finetune(system, questions, output, config=None, *, held_out=(), progress=True, notes=None,
                    store_passages=4096):
    """teacher_examples, train_reader and save_reader in one: the reader adapter for `system` trained on
    `questions` (strings; `held_out` ones only measured) written to `output`. Returns train_reader's summary with
    "output", "teacher_seconds" and `notes` (a JSON-ready dict saved with it, such as the environment).

    While it trains, the system's passage store is replaced by one of `store_passages` passages and no byte bound
    (every training passage stays: 46 KiB a token for SmolLM2-135M in float32, about 10 MB a 200-token passage);
    the system's own store is put back afterwards."""
    config = config or ReaderConfig()
    if not isinstance(output, (str, Path)) or not str(output):
        raise ValueError(f"output must be a file path, got {output!r}")
    if isinstance(store_passages, bool) or not isinstance(store_passages, int) or store_passages < 1:
        raise ValueError(f"store_passages must be an int >= 1, got {store_passages!r}")
    own = system.passages
    system.passages = PassageKVStore(store_passages, storage=own.storage)
    try:
        start = time.perf_counter()
        examples = teacher_examples(system, questions, progress=progress)
        held = teacher_examples(system, list(held_out), progress=progress) if held_out else []
        teacher_seconds = time.perf_counter() - start
        summary = train_reader(system, examples, config, held_out=held, progress=progress)
    finally:
        system.passages = own
    summary.update(teacher_seconds=teacher_seconds, output=str(output), notes=dict(notes or {}))
    save_reader(output, system.language_model.model, reader_spec(system, config), summary)
    return summary
