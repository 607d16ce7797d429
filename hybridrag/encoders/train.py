"""Training a HybridEncoder: distillation from the bundled all-MiniLM-L6-v2, in-batch contrastive learning, or both,
on text available offline (by default, passages cut from Python's bundled documentation, `pydoc_data.topics`).

    from hybridrag.encoders import HybridEncoder
    from hybridrag.encoders.train import STUDENT_CONFIG, EncoderTrainingConfig, pydoc_passages, train_encoder
    encoder = HybridEncoder(STUDENT_CONFIG)
    summary = train_encoder(encoder, pydoc_passages(encoder.tokenizer), EncoderTrainingConfig(output="encoder.pt"))

    python -m hybridrag.encoders train --output encoder.pt [--config train.yaml] [--steps N] ...

Losses (EncoderTrainingConfig.loss):
- "distill": the student's pooled output s of a passage against the teacher's sentence embedding t of the same
  passage (t L2-normalised): 1 - cos(s, t) ("cosine", the default), ||s - t||^2 ("mse": s is pulled onto the unit
  sphere too) or their sum ("cosine+mse"), averaged over the batch. The student reads the passage with its own
  tokenizer (all-MiniLM-L6-v2's by default: the tokens the teacher reads), cut to max_length tokens.
- "contrastive": two views of each passage of the batch, each a random contiguous span of its tokens (its length
  drawn in [CROP_MIN_FRACTION, CROP_MAX_FRACTION] of the passage, at least CROP_MIN_TOKENS, cut at token boundaries
  and re-tokenized, independent cropping as in Contriever), each encoded in training mode (so with independent
  dropout masks too); the symmetric in-batch InfoNCE of the normalised pooled outputs at `temperature`: view a of
  passage i must pick view b of passage i among the batch's b views, and the other way round.
- "both": distill_weight * distill + (1 - distill_weight) * contrastive.

The teacher (the bundled all-MiniLM-L6-v2 DenseEncoder unless another is given: anything with `.dimension` and
`.encode(texts)`, such as a HashingEncoder or another HybridEncoder) encodes every training text once, before the
first step; `teacher_cache` keeps those embeddings in an .npz file, keyed by the teacher's name and the texts.
`init_embeddings` copies the teacher's token embedding table into the student before training (DistilBERT's
initialisation from the teacher; it needs the same tokenizer and hidden_size as the teacher's).

Optimisation: AdamW (no weight decay on biases and norms), linear warmup over `warmup` steps then a cosine decay to
zero at `steps`, gradients clipped to `max_grad_norm`. Batches hold passages of similar length (shuffled, sorted by
length within pools of 50 batches, the batches shuffled again), so little of a batch is padding. A non-finite loss
stops training with a FloatingPointError naming the step.

Evaluation: `eval_size` texts are held out of training (drawn with `seed`); at step 0, every `eval_every` steps and
at the end, the held-out distillation loss and teacher cosine (when distilling) and the held-out InfoNCE loss and
top-1 view accuracy over fixed crops (when contrastive) are measured in eval mode.

Fairness of the pydoc retrieval evaluation (benchmarks/encoder_quality.py, `python -m hybridrag.encoders
evaluate`): training reads passages of the documents only (what a retriever indexes anyway), never the questions of
benchmarks/data/pydoc_queries.jsonl, their labels or the retrieval metrics.

Files: `encoder.save(output)` (the HybridEncoder checkpoint format: HybridEncoder.load reads it back), and next to
it `summary_path(output)` (`encoder.pt` -> `encoder.training.json`): the summary train_encoder returns.
"""
import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._optional import import_optional
from ..atomic_file import write_atomically
from ..config_file import ConfigFile, _check_bool, _check_choice, _check_int, _check_optional_path, _is_number
from .model import HybridEncoder, _check_texts

LOSSES = ("distill", "contrastive", "both")
DISTILL_METRICS = ("cosine", "mse", "cosine+mse")
CROP_MIN_FRACTION, CROP_MAX_FRACTION, CROP_MIN_TOKENS = 0.3, 0.8, 8
PASSAGE_TOKENS = (32, 96, 200)  # pydoc_passages' window lengths (tokens, special tokens not counted)
SORT_POOL = 50                  # batches per pool sorted by length
TEACHER_BATCH = 256
SUMMARY_FORMAT = 1

# The student the command line and benchmarks/encoder_quality.py train: hidden 384 = all-MiniLM-L6-v2's (so its token
# embeddings can initialise the student's), two hybrid-attention blocks behind convolutions 3/5, 384-dim output.
STUDENT_CONFIG = {"hidden_size": 384, "num_heads": 6, "num_layers": 2, "intermediate_size": 1536,
                  "conv_kernel_sizes": [3, 5], "attention": "hybrid", "window_size": 32, "output_dim": 384,
                  "max_length": 256, "pooling": "mean", "dropout": 0.1}


def _check_number(where, value, *, low, high=math.inf, low_open=False, high_open=False):
    """`value` as a float if it is a finite number in the interval; ValueError naming `where` otherwise."""
    inside = _is_number(value) and math.isfinite(value) and (low < value if low_open else low <= value) and \
        (value < high if high_open else value <= high)
    if not inside:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{where} must be a finite number in {interval}, got {value!r}")
    return float(value)


@dataclass
class EncoderTrainingConfig(ConfigFile):
    """How train_encoder trains (see the module docstring for the losses, schedule and evaluation).

    steps: optimizer steps (>= 1). batch_size: passages per step (>= 1; >= 2 with a contrastive loss: in-batch
        negatives). learning_rate: AdamW's peak (> 0). weight_decay: AdamW's (>= 0; not on biases and norms).
    warmup: linear warmup steps (0 <= warmup <= steps), then cosine decay to 0 at `steps`.
    max_grad_norm: gradient clipping (> 0), or None for none.
    loss: "distill" | "contrastive" | "both". distill_weight: in [0, 1], the distillation share of "both" (the
        other two losses have one term, and a distill_weight other than the default 0.5 is refused for them).
    distill_metric: "cosine" | "mse" | "cosine+mse". temperature: InfoNCE's (> 0).
    max_length: tokens per training text, special tokens included (>= 3, <= the encoder's max_length), or None for
        the encoder's max_length; longer texts are cut to it, with a warning.
    init_embeddings: copy the teacher's token embeddings into the student first (see the module docstring).
    eval_size: texts held out for evaluation (>= 0, fewer than the texts). eval_every: evaluate every N steps (>= 1).
    seed: the held-out draw, batches, crops and dropout (int >= 0).
    teacher_cache: None, or an .npz file for the teacher's embeddings of the training texts (read when its key
        matches, written otherwise).
    output: None, or the checkpoint path train_encoder writes (with its summary JSON next to it).
    """

    steps: int = 700
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 100
    max_grad_norm: float | None = 1.0
    loss: str = "distill"
    distill_weight: float = 0.5
    distill_metric: str = "cosine"
    temperature: float = 0.05
    max_length: int | None = None
    init_embeddings: bool = True
    eval_size: int = 64
    eval_every: int = 100
    seed: int = 0
    teacher_cache: str | None = None
    output: str | None = None

    def __post_init__(self):
        _check_int("steps", self.steps, 1)
        _check_choice("loss", self.loss, LOSSES)
        _check_int("batch_size", self.batch_size, 2 if self.loss != "distill" else 1)
        self.learning_rate = _check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        self.weight_decay = _check_number("weight_decay", self.weight_decay, low=0)
        _check_int("warmup", self.warmup, 0)
        if self.warmup > self.steps:
            raise ValueError(f"warmup must be <= steps ({self.steps}), got {self.warmup}")
        if self.max_grad_norm is not None:
            self.max_grad_norm = _check_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        self.distill_weight = _check_number("distill_weight", self.distill_weight, low=0, high=1)
        if self.loss != "both" and self.distill_weight != 0.5:
            raise ValueError(f"distill_weight weighs the two terms of loss='both'; loss={self.loss!r} has one term, "
                             f"so distill_weight must stay 0.5 (the default), got {self.distill_weight}")
        _check_choice("distill_metric", self.distill_metric, DISTILL_METRICS)
        self.temperature = _check_number("temperature", self.temperature, low=0, low_open=True)
        _check_int("max_length", self.max_length, 3, allow=(None,))
        _check_bool("init_embeddings", self.init_embeddings)
        _check_int("eval_size", self.eval_size, 0)
        _check_int("eval_every", self.eval_every, 1)
        _check_int("seed", self.seed, 0)
        self.teacher_cache = _check_optional_path("teacher_cache", self.teacher_cache)
        if self.teacher_cache is not None and not self.teacher_cache.endswith(".npz"):
            raise ValueError(f"teacher_cache must be an .npz path, got {self.teacher_cache!r}")
        self.output = _check_optional_path("output", self.output)

    @property
    def distills(self):
        return self.loss in ("distill", "both")

    @property
    def contrasts(self):
        return self.loss in ("contrastive", "both")

    def to_dict(self):
        return dataclasses.asdict(self)


def summary_path(checkpoint):
    """Where train_encoder writes the summary of the checkpoint at `checkpoint`: encoder.pt -> encoder.training.json."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".training.json")


# ---------------------------------------------------------------- training text

def pydoc_passages(tokenizer, lengths=PASSAGE_TOKENS):
    """Passages of Python's bundled documentation (the topics of `pydoc_data.topics`, in sorted order): for each
    length L, consecutive windows of L tokens (`tokenizer`'s, special tokens not counted) over each topic, each
    starting at a word (a token with whitespace before it), cut from the topic's text at token boundaries; windows
    of fewer than CROP_MIN_TOKENS tokens (a topic's tail) are dropped, and every passage appears once.

    These are the documents a pydoc retriever indexes; the questions about them are not used (see the module
    docstring). Returns a list of str."""
    import pydoc_data.topics

    if isinstance(lengths, int) or not lengths or any(not isinstance(n, int) or isinstance(n, bool) or
                                                      n < CROP_MIN_TOKENS for n in lengths):
        raise ValueError(f"lengths must be a non-empty sequence of ints >= {CROP_MIN_TOKENS}, got {lengths!r}")
    passages = []
    for _, text in sorted(pydoc_data.topics.topics.items()):
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                          verbose=False)["offset_mapping"]
        starts_word = [i == 0 or spans[i - 1][1] < spans[i][0] for i in range(len(spans))]
        for length in lengths:
            position = 0
            while position < len(spans):
                while position < len(spans) and not starts_word[position]:
                    position += 1
                end = min(position + length, len(spans))
                if end - position >= CROP_MIN_TOKENS:
                    passages.append(text[spans[position][0]:spans[end - 1][1]])
                position = end
    return list(dict.fromkeys(p for p in passages if p.strip()))


# ---------------------------------------------------------------- teacher

def teacher_name(teacher):
    return str(getattr(teacher, "name", type(teacher).__name__))


def _cache_key(teacher, texts):
    digest = hashlib.sha256(f"{teacher_name(teacher)}\0{teacher.dimension}\0{len(texts)}\0".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def teacher_embeddings(teacher, texts, cache=None, progress=False):
    """float32 (N, teacher.dimension), L2-normalised rows: `teacher.encode` of `texts` in batches of TEACHER_BATCH,
    or the embeddings in the .npz file `cache` when its key (the teacher's .name and dimension and the texts) matches;
    otherwise they are computed and the file is (re)written (a cache needs a teacher with a str .name). A shape other than (N, dimension), a non-finite value or
    a zero vector (a text the teacher cannot embed) is a ValueError naming the text."""
    texts = _check_texts(texts)
    key = _cache_key(teacher, texts)
    if cache is not None:
        if not isinstance(getattr(teacher, "name", None), str):
            raise ValueError(f"teacher_cache keys the embeddings by the teacher's .name, and a "
                             f"{type(teacher).__name__} has none (so two such teachers would share them); use no "
                             f"cache, or a teacher with a name that says which model it is")
        cache = Path(cache)
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as stored:
                if "key" in stored and str(stored["key"]) == key:
                    return stored["embeddings"].astype(np.float32)
    tqdm = import_optional("tqdm", "tqdm", "retrieval").tqdm
    parts = []
    with tqdm(total=len(texts), desc="teacher embeddings", unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), TEACHER_BATCH):
            batch = texts[start:start + TEACHER_BATCH]
            vectors = np.asarray(teacher.encode(batch), dtype=np.float32)
            if vectors.shape != (len(batch), teacher.dimension):
                raise ValueError(f"the teacher's encode returned shape {vectors.shape} for {len(batch)} texts; "
                                 f"expected ({len(batch)}, {teacher.dimension}) (its .dimension)")
            parts.append(vectors)
            bar.update(len(batch))
    embeddings = np.concatenate(parts)
    norms = np.linalg.norm(embeddings, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms < 1e-6))
    if len(bad):
        raise ValueError(f"the teacher's embedding of texts[{bad[0]}] ({texts[bad[0]][:60]!r}) is "
                         f"{'not finite' if not np.isfinite(norms[bad[0]]) else 'zero'} ({len(bad)} such texts): "
                         f"nothing to distil from")
    embeddings = embeddings / norms[:, None]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, lambda out: np.savez(out, key=np.array(key), embeddings=embeddings))
    return embeddings


def _teacher_token_embeddings(teacher):
    """The teacher's token embedding table (vocab, hidden) and its tokenizer, or a ValueError saying why not."""
    from ..retrieval.encoder import DenseEncoder

    if isinstance(teacher, HybridEncoder):
        return teacher.embed.weight, teacher.tokenizer
    if isinstance(teacher, DenseEncoder):
        return teacher.model[0].auto_model.get_input_embeddings().weight, teacher.tokenizer
    raise ValueError(f"init_embeddings=True copies the teacher's token embeddings, and a {type(teacher).__name__} "
                     f"has none (a DenseEncoder or HybridEncoder teacher has); set init_embeddings=False")


def _init_embeddings(encoder, teacher):
    weight, tokenizer = _teacher_token_embeddings(teacher)
    if tuple(weight.shape) != tuple(encoder.embed.weight.shape):
        raise ValueError(f"init_embeddings=True: the teacher's token embeddings are {tuple(weight.shape)}, the "
                         f"student's (vocab_size, hidden_size) {tuple(encoder.embed.weight.shape)}; they must match "
                         f"(or set init_embeddings=False)")
    if tokenizer.get_vocab() != encoder.tokenizer.get_vocab():
        raise ValueError("init_embeddings=True: the teacher's tokenizer is not the student's (another vocabulary), so "
                         "its embedding rows would belong to other tokens; set init_embeddings=False")
    with torch.no_grad():
        encoder.embed.weight.copy_(weight.detach().to(encoder.embed.weight))


# ---------------------------------------------------------------- losses

def distillation_loss(student, teacher, metric="cosine"):
    """Mean over the batch of 1 - cos(student, teacher), ||student - teacher||^2, or both summed (see the module
    docstring); `teacher` rows L2-normalised."""
    _check_choice("metric", metric, DISTILL_METRICS)
    loss = student.new_zeros(())
    if metric in ("cosine", "cosine+mse"):
        loss = loss + (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if metric in ("mse", "cosine+mse"):
        loss = loss + (student - teacher).pow(2).sum(dim=-1).mean()
    return loss


def info_nce(a, b, temperature):
    """Symmetric in-batch InfoNCE: row i of `a` and row i of `b` are a pair; every other row of the batch is a
    negative. Both normalised first."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _crop(text, spans, rng):
    """A random contiguous span of the text's tokens (their character offsets `spans`), as text."""
    count = len(spans)
    low = min(count, max(CROP_MIN_TOKENS, math.ceil(CROP_MIN_FRACTION * count)))
    high = min(count, max(low, math.ceil(CROP_MAX_FRACTION * count)))
    length = rng.randint(low, high)
    start = rng.randint(0, count - length)
    return text[spans[start][0]:spans[start + length - 1][1]]


# ---------------------------------------------------------------- training

class _Texts:
    """The training texts tokenized once: ids with special tokens cut to max_length, and the token offsets of the
    part the student sees (where crops are cut)."""

    def __init__(self, encoder, texts, max_length):
        tokenizer = encoder.tokenizer
        full = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        self.too_long = sum(len(row) > max_length for row in full)
        self.longest = max(map(len, full))
        self.ids = [row if len(row) <= max_length else
                    tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length,
                              verbose=False)["input_ids"] for row, text in zip(full, texts)]
        room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
        spans = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                          verbose=False)["offset_mapping"]
        self.spans = [[tuple(s) for s in row[:room]] for row in spans]
        self.texts = texts
        self.tokenizer, self.max_length = tokenizer, max_length

    def crops(self, rows, rng):
        """Two independent crops of each text in `rows` (a text with no token keeps itself), tokenized."""
        views = []
        for _ in range(2):
            views.append([_crop(self.texts[i], self.spans[i], rng) if self.spans[i] else self.texts[i]
                          for i in rows])
        return [self.tokenizer(view, add_special_tokens=True, truncation=True, max_length=self.max_length,
                               verbose=False)["input_ids"] for view in views]


def _batches(rows, lengths, batch_size, generator):
    """Endless batches of `rows` (only full ones), each of texts of similar length: every epoch shuffles the rows,
    sorts pools of SORT_POOL batches by length, and shuffles the batches."""
    rows = np.asarray(rows)
    while True:
        order = rows[generator.permutation(len(rows))]
        batches = []
        for start in range(0, len(order), batch_size * SORT_POOL):
            pool = sorted(order[start:start + batch_size * SORT_POOL], key=lambda i: lengths[i])
            batches += [pool[i:i + batch_size] for i in range(0, len(pool) - batch_size + 1, batch_size)]
        for index in generator.permutation(len(batches)):
            yield [int(i) for i in batches[index]]


def _schedule(config):
    """LR factor for the optimizer step with index i (0-based): linear warmup to 1, then cosine to 0 at `steps`."""
    warmup, steps = config.warmup, config.steps

    def factor(i):
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))
    return factor


def _parameter_groups(encoder, weight_decay):
    decay, no_decay = [], []
    for name, parameter in encoder.named_parameters():
        (decay if parameter.dim() >= 2 and "norm" not in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _evaluate(encoder, data, rows, targets, config, eval_crops, device):
    """Held-out losses in eval mode (no dropout), in batches of batch_size."""
    training = encoder.training
    encoder.eval()
    result = {}
    try:
        with torch.no_grad():
            if config.distills:
                losses, cosines = [], []
                for start in range(0, len(rows), 64):
                    chosen = rows[start:start + 64]
                    pooled = encoder(*encoder._batch_tensors([data.ids[i] for i in chosen], device))["pooled"]
                    target = targets[chosen].to(device)
                    losses.append(distillation_loss(pooled, target, config.distill_metric) * len(chosen))
                    cosines.append(F.cosine_similarity(pooled, target, dim=-1).sum())
                result["distill"] = float(sum(losses)) / len(rows)
                result["teacher_cosine"] = float(sum(cosines)) / len(rows)
            if config.contrasts and len(rows) >= 2:
                losses, hits, counted = [], 0, 0
                first, second = eval_crops
                for start in range(0, len(rows), config.batch_size):
                    stop = min(start + config.batch_size, len(rows))
                    if stop - start < 2:
                        break
                    a = encoder(*encoder._batch_tensors(first[start:stop], device))["pooled"]
                    b = encoder(*encoder._batch_tensors(second[start:stop], device))["pooled"]
                    losses.append(info_nce(a, b, config.temperature) * (stop - start))
                    similarity = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
                    hits += int((similarity.argmax(dim=1) == torch.arange(stop - start, device=device)).sum())
                    counted += stop - start
                result["contrastive"] = float(sum(losses)) / counted
                result["view_top1"] = hits / counted
    finally:
        encoder.train(training)
    return result


def train_encoder(encoder, texts, config=None, teacher=None, progress=True):
    """Train `encoder` (a float HybridEncoder, in place) on `texts` and return the training summary (a dict).

    Args:
        encoder: the student, a HybridEncoder that is not quantized.
        texts: a non-empty list of str (documents or passages; see pydoc_passages).
        config: an EncoderTrainingConfig, a dict of its fields, a JSON/YAML path, or None (defaults).
        teacher: the encoder to distil from (`.dimension` == the student's output_dim, `.encode(texts)` -> (N, d)),
            or None for the bundled all-MiniLM-L6-v2 (loaded here) when the loss distils or init_embeddings is set.
            A teacher with neither use (loss "contrastive", init_embeddings False) is refused.
        progress: a tqdm bar over the steps (and the teacher's embeddings).

    Returns:
        {"format", "config", "encoder_config", "teacher", "texts": {"train", "eval", "longer_than_max_length"},
         "history": [{"step", "loss", "distill"?, "contrastive"?, "lr", "grad_norm"} per step],
         "evals": [{"step", held-out losses...}], "seconds", "steps_per_second", "texts_per_second",
         "torch_threads", "checkpoint", "summary"}; with config.output, the checkpoint and the summary JSON are
        written (see the module docstring). The encoder is left in eval mode.
    """
    config = EncoderTrainingConfig.from_any(config)
    if not isinstance(encoder, HybridEncoder):
        raise TypeError(f"encoder must be a HybridEncoder, got {type(encoder).__name__}")
    if encoder.quantization is not None:
        raise ValueError(f"the encoder is quantized ({encoder.quantization}); int8 weights do not train: train a "
                         f"float encoder, then quantize it")
    texts = _check_texts(texts)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if config.max_length is not None and config.max_length > encoder.config.max_length:
        raise ValueError(f"config.max_length ({config.max_length}) must be <= the encoder's max_length "
                         f"({encoder.config.max_length})")
    max_length = config.max_length or encoder.config.max_length
    if config.eval_size >= len(texts):
        raise ValueError(f"eval_size ({config.eval_size}) must be less than the number of texts ({len(texts)}): "
                         f"some must remain to train on")
    train_count = len(texts) - config.eval_size
    if config.batch_size > train_count:
        raise ValueError(f"batch_size ({config.batch_size}) is more than the {train_count} training texts "
                         f"({len(texts)} texts, eval_size {config.eval_size})")
    needs_teacher = config.distills or config.init_embeddings
    if teacher is None and needs_teacher:
        from ..retrieval.encoder import DenseEncoder

        teacher = DenseEncoder(device=str(encoder.output.weight.device), show_progress=False)
    elif teacher is not None and not needs_teacher:
        raise ValueError(f"a teacher was given but loss={config.loss!r} with init_embeddings=False uses none; pass "
                         f"teacher=None, or a loss that distils")
    if teacher is not None:
        for attribute in ("dimension", "encode"):
            if not hasattr(teacher, attribute):
                raise TypeError(f"teacher must have .dimension and .encode(texts); {type(teacher).__name__} has no "
                                f".{attribute}")
        if config.distills and teacher.dimension != encoder.config.output_dim:
            raise ValueError(f"the teacher's dimension ({teacher.dimension}) must equal the student's output_dim "
                             f"({encoder.config.output_dim}) to distil from it")
    device = encoder.output.weight.device
    started = time.perf_counter()
    data = _Texts(encoder, texts, max_length)
    if data.too_long:
        warnings.warn(f"{data.too_long} of {len(texts)} training texts are longer than max_length={max_length} "
                      f"tokens (the longest has {data.longest}); the student trains on their first {max_length} "
                      f"tokens", UserWarning, stacklevel=2)
    if config.init_embeddings:
        _init_embeddings(encoder, teacher)
    targets = None
    if config.distills:
        targets = torch.from_numpy(teacher_embeddings(teacher, texts, config.teacher_cache, progress))
    generator = np.random.default_rng(config.seed)
    order = generator.permutation(len(texts))
    eval_rows, train_rows = [int(i) for i in order[:config.eval_size]], [int(i) for i in order[config.eval_size:]]
    eval_crops = data.crops(eval_rows, random.Random(config.seed + 1)) if config.contrasts and eval_rows else None
    crop_rng = random.Random(config.seed)
    torch.manual_seed(config.seed)  # dropout
    optimizer = torch.optim.AdamW(_parameter_groups(encoder, config.weight_decay), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    batches = _batches(train_rows, [len(row) for row in data.ids], config.batch_size, generator)
    history, evals = [], []

    def evaluate(step):
        if eval_rows:
            evals.append({"step": step, **_evaluate(encoder, data, eval_rows, targets, config, eval_crops, device)})

    evaluate(0)
    tqdm = import_optional("tqdm", "tqdm", "retrieval").tqdm
    encoder.train()
    train_started = time.perf_counter()
    with tqdm(total=config.steps, desc="training the encoder", unit="step", disable=not progress) as bar:
        for step in range(1, config.steps + 1):
            rows = next(batches)
            parts = {}
            if config.distills:
                pooled = encoder(*encoder._batch_tensors([data.ids[i] for i in rows], device))["pooled"]
                parts["distill"] = distillation_loss(pooled, targets[rows].to(device), config.distill_metric)
            if config.contrasts:
                first, second = data.crops(rows, crop_rng)
                a = encoder(*encoder._batch_tensors(first, device))["pooled"]
                b = encoder(*encoder._batch_tensors(second, device))["pooled"]
                parts["contrastive"] = info_nce(a, b, config.temperature)
            if config.loss == "both":
                loss = config.distill_weight * parts["distill"] + (1 - config.distill_weight) * parts["contrastive"]
            else:
                loss = parts[config.loss]
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the training loss is {value} at step {step} (learning rate "
                                         f"{scheduler.get_last_lr()[0]:.3g}); lower learning_rate or max_grad_norm")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(encoder.parameters(), config.max_grad_norm or math.inf)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            history.append({"step": step, "loss": value, **{k: float(v.detach()) for k, v in parts.items()},
                            "lr": lr, "grad_norm": float(norm)})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if step % config.eval_every == 0 and step != config.steps:
                evaluate(step)
                encoder.train()
    train_seconds = time.perf_counter() - train_started
    evaluate(config.steps)
    encoder.eval()
    per_step = config.batch_size * (2 if config.loss == "contrastive" else 3 if config.loss == "both" else 1)
    summary = {
        "format": SUMMARY_FORMAT, "config": config.to_dict(), "encoder_config": encoder.config.to_dict(),
        "teacher": None if teacher is None else {"name": teacher_name(teacher), "dimension": teacher.dimension},
        "texts": {"train": len(train_rows), "eval": len(eval_rows), "longer_than_max_length": data.too_long},
        "history": history, "evals": evals, "seconds": time.perf_counter() - started, "train_seconds": train_seconds,
        "steps_per_second": config.steps / train_seconds,
        "texts_per_second": config.steps * per_step / train_seconds,  # sequences through forward + backward
        "torch_threads": torch.get_num_threads(), "checkpoint": None, "summary": None,
    }
    if config.output is not None:
        checkpoint = encoder.save(config.output)
        summary["checkpoint"], summary["summary"] = str(checkpoint), str(summary_path(checkpoint))
        summary_path(checkpoint).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
