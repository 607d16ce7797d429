"""rag-finetune: supervised fine-tuning of a causal LM (default SmolLM2-135M-Instruct) on question/answer records
with retrieved passages in the prompt, the loss on the answer only, through HybridRAGTrainer (exact resume).

    config = FinetuneConfig(data="qa.jsonl", output_dir="runs/ft", steps=60)
    summary = rag_finetune(config)                  # rag_finetune(config, resume=True) continues a stopped run
    lm = load_finetuned("runs/ft")                  # a LanguageModel with the adapters (or the full model)

Retrieval: "static" takes each record's "documents"; "kb" searches a KnowledgeBase built over `corpus` (files or
folders that hybridrag.system.loading reads) with `encoder` and keeps the top_k passages. finetune.json records the
run's options next to the checkpoints; a resume with other options (except progress_bar, save_every, threads) is
refused, naming what changed.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint
from .config import TrainingConfig
from .data import RAGCollator, RAGDataset
from .finetune_data import DEFAULT_SYSTEM, load_qa_records, record_item
from .finetune_model import AnswerLossModel, load_base_model, save_finetuned
from ..nn.common import check_positive
from ..nn.lora import DEFAULT_TARGETS, apply_lora

__all__ = ["FinetuneConfig", "rag_finetune", "prepare_model", "retrieve_documents", "build_knowledge_base", "RUN_FILE"]

METHODS = ("lora", "full")
RETRIEVALS = ("static", "kb")
RUN_FILE = "run_config.json"
RESUME_FREE = ("progress_bar", "save_every", "threads")


@dataclass
class FinetuneConfig:
    """Options of rag-finetune (and the shared part of refrag-finetune); checked when built.

    data: JSONL of question/answer records (hybridrag.train.finetune_data). output_dir: checkpoints, log.jsonl and
    the saved model. model_path: a local transformers folder, or None for SmolLM2-135M-Instruct. method: "lora"
    (adapters; the base is frozen) or "full". int8: quantize the base's decoder linears to Int8Linear (lora only).
    steps, learning_rate, batch_size, gradient_accumulation, warmup_steps: the optimisation. rank, alpha, dropout,
    targets, lora_layers (None for all decoder layers, else the layer indices): the adapters. retrieval, corpus,
    encoder, top_k: the passages (module docstring). max_passage_chars, max_length, system: the prompt.
    attn_implementation: "sdpa" (fastest for CPU training), "hybridrag" or "eager". save_every: checkpoint every n
    steps (one is always written at the end). threads: torch intra-op threads (None: torch's default).
    """
    data: str
    output_dir: str
    model_path: str | None = None
    method: str = "lora"
    int8: bool = False
    steps: int = 60
    learning_rate: float = 1e-3
    batch_size: int = 4
    gradient_accumulation: int = 1
    warmup_steps: int = 5
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = DEFAULT_TARGETS
    lora_layers: tuple | None = None
    retrieval: str = "static"
    corpus: tuple = ()
    encoder: str = "hashing-256"
    top_k: int = 2
    max_passage_chars: int | None = 600
    max_length: int = 1024
    system: str = DEFAULT_SYSTEM
    attn_implementation: str = "sdpa"
    seed: int = 0
    save_every: int | None = None
    progress_bar: bool = True
    threads: int | None = None

    def __post_init__(self):
        for name in ("data", "output_dir"):
            value = getattr(self, name)
            if isinstance(value, Path):
                setattr(self, name, str(value))
            elif not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a path, got {value!r}")
        if self.model_path is not None:
            self.model_path = str(self.model_path)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.int8, bool):
            raise TypeError(f"int8 must be a bool, got {type(self.int8).__name__}")
        if self.int8 and self.method == "full":
            raise ValueError("int8=True needs method='lora': an int8 base has no float weights to train "
                             "(use method='full' with int8=False)")
        for name in ("steps", "batch_size", "gradient_accumulation", "rank", "top_k", "max_length"):
            check_positive(name, getattr(self, name))
        for name in ("learning_rate", "alpha"):
            check_positive(name, getattr(self, name), float)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.targets = tuple(self.targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must be non-empty module names, got {self.targets!r}")
        if self.lora_layers is not None:
            self.lora_layers = tuple(self.lora_layers)
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {self.retrieval!r}")
        self.corpus = tuple(str(p) for p in self.corpus)
        if self.retrieval == "kb" and not self.corpus:
            raise ValueError("retrieval='kb' needs corpus (files or folders of documents to retrieve from), got none")
        if self.retrieval == "static" and self.corpus:
            raise ValueError(f"retrieval='static' takes each record's documents; corpus {list(self.corpus)} would "
                             "be unused (use retrieval='kb')")
        if self.max_passage_chars is not None:
            check_positive("max_passage_chars", self.max_passage_chars)
        if self.attn_implementation not in ("sdpa", "hybridrag", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa', 'hybridrag' or 'eager', got "
                             f"{self.attn_implementation!r}")
        if self.save_every is not None:
            check_positive("save_every", self.save_every)
        if self.threads is not None:
            check_positive("threads", self.threads)

    def to_dict(self):
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @property
    def lora_options(self):
        if self.method != "lora":
            return None
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "layers": None if self.lora_layers is None else list(self.lora_layers)}


def check_run_file(config, output_dir, resume, extra=None):
    """Write run_config.json for a new run, or check it for a resume: ValueError on a changed option, on a resume
    with nothing to resume, and on a new run over an earlier run's checkpoints (nothing is overwritten)."""
    output_dir = Path(output_dir)
    path = output_dir / RUN_FILE
    mine = {**config.to_dict(), **(extra or {})}
    if not resume:
        if latest_checkpoint(output_dir) is not None or path.exists():
            raise ValueError(f"output_dir {output_dir} holds an earlier run; pass --resume to continue it, or "
                             "choose another --output-dir")
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=2) + "\n", encoding="utf-8")
        return
    if not path.is_file():
        raise ValueError(f"--resume but {output_dir} holds no {RUN_FILE}: there is no run to continue")
    saved = json.loads(path.read_text(encoding="utf-8"))
    changed = [(k, saved.get(k), v) for k, v in mine.items() if k not in RESUME_FREE and saved.get(k) != v]
    if changed:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
        raise ValueError(f"cannot resume the run in {output_dir}: options changed ({listed}); resume with the saved "
                         "options or start a new run in another output_dir")


def build_knowledge_base(corpus, encoder):
    """A KnowledgeBase over the documents of `corpus` (paths), split into 200-token passages (as the system does)."""
    from ..retrieval import KnowledgeBase
    from ..retrieval.encoder import make_encoder
    from ..system.loading import load_documents
    return KnowledgeBase.build(load_documents(list(corpus), progress=False), make_encoder(encoder), chunk_tokens=200,
                               overlap=32)


def retrieve_documents(config, records):
    """One list of passages per record: its own documents (static) or the top_k of a KnowledgeBase over corpus."""
    if config.retrieval == "static":
        return [record["documents"] for record in records]
    from .formatting import as_passages
    knowledge_base = build_knowledge_base(config.corpus, config.encoder)
    return [as_passages(knowledge_base.search(r["question"], k=config.top_k)) for r in records]


def prepare_model(config):
    """(LanguageModel with adapters or all parameters trainable, AnswerLossModel around it)."""
    lm = load_base_model(config.model_path, int8=config.int8, attn_implementation=config.attn_implementation)
    torch.manual_seed(config.seed)  # the adapters' initial A
    if config.method == "lora":
        apply_lora(lm.model, rank=config.rank, alpha=config.alpha, dropout=config.dropout, targets=config.targets,
                   layers=config.lora_layers)
    else:
        for parameter in lm.model.parameters():
            parameter.requires_grad_(True)
    return lm, AnswerLossModel(lm.model, trainable_state_only=config.method == "lora")


def training_config(config, log_every=5):
    return TrainingConfig(learning_rate=config.learning_rate, batch_size=config.batch_size, epochs=None,
                          max_steps=config.steps, gradient_accumulation_steps=config.gradient_accumulation,
                          warmup_steps=config.warmup_steps, schedule="cosine", output_dir=config.output_dir,
                          seed=config.seed, save_every=config.save_every, progress_bar=config.progress_bar,
                          log_every=log_every)


def rag_finetune(config, *, resume=False):
    """Fine-tune as `config` says (see the module docstring); returns the trainer's summary plus "examples",
    "saved" (the manifest's path) and "history" (the logged records)."""
    from .trainer import HybridRAGTrainer

    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    records = load_qa_records(config.data, need_documents=config.retrieval == "static")
    check_run_file(config, config.output_dir, resume)
    lm, model = prepare_model(config)
    documents = retrieve_documents(config, records)
    items = [record_item(r, d, lm.tokenizer, system=config.system, max_passage_chars=config.max_passage_chars,
                         max_length=config.max_length) for r, d in zip(records, documents)]
    dataset = RAGDataset(items, vocab_size=lm.model.get_input_embeddings().num_embeddings)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    trainer = HybridRAGTrainer(training_config(config), model, dataset, collate_fn=RAGCollator(pad))
    summary = trainer.train(resume_from="latest" if resume else None)
    lm.model.eval()
    saved = save_finetuned(lm, config.output_dir, method=config.method, base_model=config.model_path,
                           int8=config.int8, lora=config.lora_options)
    return {**summary, "examples": len(dataset), "saved": str(saved), "history": trainer.history}
