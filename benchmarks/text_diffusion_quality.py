"""Text diffusion quality: what do DocumentGenerator's passages look like at a size this CPU trains?

Data: the 79 topics of `pydoc_data.topics` (benchmarks/retrieval_quality.py's corpus), each cut by split_words
into consecutive 48-word windows, exactly the windows DocumentGenerator.train makes of a text (2019 windows, heading
underlines dropped; a topic's shorter last piece is dropped). join_words / split_words round-trip every one of them
(checked at run time), so the training text join_words(window) gives DocumentGenerator that window back. A seeded
90/10 split by window: 1817 training windows, 202 held out. Conditions: a seeded subset of the held-out windows
whose topic has a training window (64 in full, 16 in --quick); the condition is the window's text, which
DocumentGenerator.generate embeds with the same encoder (DenseEncoder, the bundled all-MiniLM-L6-v2) that embeds the
training windows.

Model: the MaskedDiffusionLM and vocabulary DocumentGenerator.train builds (its words: [UNK] and the 7999 most
frequent training words, here every one of them; 16 unmasking steps, random order), trained in stages by
train_text_diffusion with one AdamW kept across them (lr 1e-3, batches of 32: DocumentGenerator.train's defaults),
because DocumentGenerator.train cannot continue training a model; stage i draws its batches with seed + i, so stage 0
is DocumentGenerator.train's own run. After each stage the model is wrapped in a DocumentGenerator and measured:
  ELBO            MaskedDiffusionLM.loss (the ELBO-weighted masked cross-entropy, an upper bound on the NLL) in bits
                  per word (a word or punctuation mark: one position), 4 seeded mask-rate draws per window, on the
                  held-out windows and on as many training windows (+- the standard error over 16 chunks); next to
                  the unigram baseline's cross-entropy (training counts, add-one smoothed over the vocabulary;
                  a held-out word outside it is [UNK] on both sides): below it, the model knows more than word
                  frequencies;
  cos cond        mean MiniLM cosine of a generated passage to its condition;
  topic r@1       the share of passages whose nearest training window (MiniLM cosine) is of the condition's topic;
  perplexity      per token under SmolLM2-135M-Instruct (hybridrag.system.model.load_language_model, sdpa), each
                  passage scored after <|endoftext|>, all passages of a row pooled;
  distinct-2      unique word bigrams / bigrams of the row's passages; 4-gram copy: the share of its word 4-grams
                  found in the training windows.
One passage per condition and temperature (1.0, and 0.0: the most likely word at each position), condition i drawn
with seed + i at every step count. Baselines in the same run, one text per condition: the held-out window itself (real
text: fidelity 1 by construction; the reference for recall, fluency, diversity and copying), a training window of the
same topic (related real text; its own row excluded from the recall search, its copy share 1 by construction), a
held-out window of another topic (unrelated real text) and a unigram sample (48 words drawn from the training
frequencies). Every text is lower-cased and written by join_words(split_words(...)), as generated passages are.

Measured: the recorded full run is in benchmarks/results/<device>/text_diffusion_quality.json (recorded at cd37c1d
on a 2-core AMD EPYC: 12.2 min with --threads 2, training 555 s, evaluation 128 s of which SmolLM2 56 s), and the
README's diffusion section reads it. Note on the data: pydoc's heading underlines ("*****") would become runs of "*"
words under split_words, which a first (unrecorded) run's temperature-0 passages collapsed into; they are dropped.

Output: a table on stdout (rows: each step count at each temperature, then the baselines), example passages of the
last step count, results.json (results-quick.json) and text_diffusion_quality.png (-quick.png: each metric against
the training steps, the baselines as horizontal lines) under --out (default
benchmarks/runs/<device>/text_diffusion_quality, ignored by git); --record copies a full run to
benchmarks/results/<device>/text_diffusion_quality.json and .png (a clean checkout).

    python -m benchmarks.text_diffusion_quality [--quick] [--threads N] [--seed S] [--out DIR] [--record]
    # --quick: a seeded 480 of the 2019 windows (432 training, 48 held out, 16 conditions), DocumentGenerator's
    # default model (128 wide, 2 layers, 0.9 M parameters), 100 and 300 steps;
    # full: every window, 256 wide, 4 layers, 4 heads (5.0 M parameters), 250, 750 and 1500 steps.
    # Run time, on a 2-core AMD EPYC (KVM) shared with another user's tests and builds: --quick --threads 1 took
    # 88 s wall at load average ~2.6 (encoding 12 s, training 38 s, SmolLM2 22 s) and 81 s at ~0.8 (the same
    # numbers both times, before the underlines were dropped); the full size with --threads 2 took 12.2 min
    # (recorded run above). 1500 steps is what fits ~15 min here: 0.35-0.45 s a step was measured for this model at
    # 2 threads under load, so the 4000 steps first planned would take ~25-30 min.
"""
import argparse
import collections
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from hybridrag.diffusion import DocumentGenerator, MaskedDiffusionLM, TextDiffusionConfig, train_text_diffusion
from hybridrag.diffusion.documents import UNKNOWN, join_words, split_words
from hybridrag.retrieval import DenseEncoder
from hybridrag.system.model import load_language_model

from .common import (RUNS_ROOT, add_output_options, check_output_options, device_slug, environment, figure_legend,
                     format_table, log, progress, record_result, write_json)
from .diffusion_quality import UNDERLINE
from .retrieval_quality import corpus

SUITE = "text_diffusion_quality"
SIZES = {"quick": {"topics": None, "windows": 480, "hidden_dim": 128, "num_layers": 2, "num_heads": 4,
                   "steps": (100, 300), "conditions": 16},
         "full": {"topics": None, "windows": None, "hidden_dim": 256, "num_layers": 4, "num_heads": 4,
                  "steps": (250, 750, 1500), "conditions": 64}}
LENGTH = 48            # words per window and per generated passage
HELD_OUT = 0.1         # share of the windows held out
# DocumentGenerator.train's defaults (tests/test_text_diffusion_suite.py checks they still are)
BATCH = 32
LR = 1e-3
MAX_VOCABULARY = 8000
SAMPLING_STEPS = 16
TEMPERATURES = (1.0, 0.0)
ELBO_DRAWS = 4         # seeded mask-rate draws per window
ELBO_CHUNKS = 16       # MaskedDiffusionLM.loss calls the rows are split into (the sem is over their means)
NGRAM = 4              # copying: the share of generated NGRAM-grams found in the training windows
LM_BATCH = 16
DOCUMENT_START = "<|endoftext|>"  # SmolLM2's document separator: every token of a passage is scored after it
EXAMPLES = 3           # example passages kept per step count and temperature
BASELINES = ("held-out window (the condition)", "same-topic training window", "other-topic held-out window",
             "unigram sample")


# ---------------------------------------------------------------- data

def topic_windows(spec, seed):
    """[(topic, words)]: every pydoc topic, its heading underlines dropped, cut into consecutive LENGTH-word windows
    (split_words; a shorter last piece dropped), as DocumentGenerator.train cuts its texts; spec["topics"] /
    spec["windows"] keep a seeded subset of the topics / windows (None: all)."""
    documents = corpus()
    rng = np.random.default_rng(seed)
    if spec["topics"] is not None and spec["topics"] < len(documents):
        documents = [documents[i] for i in sorted(rng.choice(len(documents), spec["topics"], replace=False))]
    windows = []
    for document in documents:  # heading underlines dropped: split_words makes a run of "*" words of each
        words = split_words("\n".join(line for line in document.text.splitlines() if not UNDERLINE.match(line)))
        windows += [(document.id, words[s:s + LENGTH]) for s in range(0, len(words) - LENGTH + 1, LENGTH)]
    if spec["windows"] is not None and spec["windows"] < len(windows):
        windows = [windows[i] for i in sorted(rng.choice(len(windows), spec["windows"], replace=False))]
    return windows, len(documents)


def check_round_trip(windows):
    """RuntimeError unless split_words(join_words(w)) == w for every window: the training text join_words(w) must
    give DocumentGenerator exactly the window w back."""
    broken = [i for i, (_, words) in enumerate(windows) if split_words(join_words(words)) != words]
    if broken:
        raise RuntimeError(f"{len(broken)} windows do not survive join_words/split_words, e.g. "
                           f"{windows[broken[0]][1]}: the training texts would not give these windows")


def split_rows(n, seed):
    """(train, held-out) sorted row indices of n windows, a seeded HELD_OUT share held out."""
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, int(round(HELD_OUT * n)))
    return np.sort(order[held:]), np.sort(order[:held])


def build_vocabulary(windows):
    """(vocabulary, counts) as DocumentGenerator.train builds them: [UNK] then the MAX_VOCABULARY - 1 most frequent
    words of `windows` (lists of words); counts: a Counter of every word."""
    counts = collections.Counter(word for words in windows for word in words)
    return [UNKNOWN] + [word for word, _ in counts.most_common(MAX_VOCABULARY - 1)], counts


def token_ids(windows, vocabulary):
    """LongTensor (N, LENGTH) of the windows' word ids, 0 ([UNK]) for a word outside the vocabulary."""
    ids = {word: i for i, word in enumerate(vocabulary)}
    return torch.tensor([[ids.get(word, 0) for word in words] for words in windows], dtype=torch.long)


def pick_conditions(topics, train, held, n, seed):
    """n held-out rows whose topic has a training window (seeded), each with a training row of the same topic and a
    held-out row of another topic: (conditions, same, other), int arrays (n,)."""
    rng = np.random.default_rng(seed + 1)
    by_topic = collections.defaultdict(list)
    for row in train:
        by_topic[topics[row]].append(row)
    usable = [row for row in held if topics[row] in by_topic]
    conditions = np.sort(rng.choice(usable, min(n, len(usable)), replace=False))
    same = np.array([rng.choice(by_topic[topics[row]]) for row in conditions])
    other = np.array([rng.choice([r for r in held if topics[r] != topics[row]]) for row in conditions])
    return conditions, same, other


# ---------------------------------------------------------------- the unigram baseline

def unigram_bits(train_ids, ids, vocabulary_size):
    """Cross-entropy in bits per word of the words ids (N, L) under the training words' frequencies (train_ids),
    add-one smoothed over the vocabulary ([UNK] counted as a word on both sides): {"mean", "sem"}."""
    counts = torch.bincount(train_ids.reshape(-1), minlength=vocabulary_size).to(torch.float64)
    bits = -torch.log2((counts + 1) / (counts.sum() + vocabulary_size))[ids.reshape(-1)]
    return {"mean": float(bits.mean()), "sem": float(bits.std() / math.sqrt(bits.numel()))}


def unigram_samples(counts, n, seed):
    """n texts of LENGTH words drawn independently from the training frequencies `counts` (a Counter)."""
    words = list(counts)
    p = np.array([counts[w] for w in words], dtype=np.float64)
    draws = np.random.default_rng(seed + 2).choice(len(words), (n, LENGTH), p=p / p.sum())
    return [join_words(words[i] for i in row) for row in draws]


# ---------------------------------------------------------------- the model

@torch.no_grad()
def elbo_bits(model, ids, conditions, seed):
    """The masked-diffusion loss bound (MaskedDiffusionLM.loss, an upper bound on the NLL) in bits per word of the
    windows ids (N, L) given their condition vectors (N, d): ELBO_DRAWS seeded mask-rate draws per window, the rows
    shuffled into equal chunks; {"mean", "sem"} (the sem over the chunks' means)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(ids.shape[0] * ELBO_DRAWS, generator=generator) % ids.shape[0]
    chunks = np.array_split(rows.numpy(), min(ELBO_CHUNKS, len(rows)))
    losses = np.array([model.loss(ids[c], condition=conditions[c], generator=generator).item() for c in chunks])
    sizes = np.array([len(c) for c in chunks])
    bits = losses / math.log(2)
    sem = float(bits.std(ddof=1) / math.sqrt(len(bits))) if len(bits) > 1 else 0.0
    return {"mean": float((bits * sizes).sum() / sizes.sum()), "sem": sem}


def make_model(spec, vocabulary_size, condition_dim, seed):
    """The MaskedDiffusionLM DocumentGenerator.train would build (seeded the same way)."""
    config = TextDiffusionConfig(vocab_size=vocabulary_size, max_length=LENGTH + 1, hidden_dim=spec["hidden_dim"],
                                 num_layers=spec["num_layers"], num_heads=spec["num_heads"],
                                 condition_dim=condition_dim, sampling_steps=SAMPLING_STEPS)
    torch.manual_seed(seed)
    return MaskedDiffusionLM(config)


def train_stages(model, targets, conditions, steps, seed):
    """Train `model` on targets (N, L) with condition vectors (N, d) up to each step count of `steps` in turn, one
    AdamW kept across the stages; yields (step count, loss history of the stage, seconds) after each stage. Stage i
    draws its batches with seed + i (stage 0 is DocumentGenerator.train's run with this seed)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    done = 0
    for stage, total in enumerate(steps):
        started = time.perf_counter()
        history = train_text_diffusion(model, targets, condition=conditions, steps=total - done, batch_size=BATCH,
                                       seed=seed + stage, optimizer=optimizer, progress=sys.stderr.isatty())
        done = total
        yield total, history, time.perf_counter() - started


def generate(generator, conditions, temperature, seed):
    """One DocumentGenerator passage (str) per condition text, condition i drawn with seed + i."""
    return [generator.generate(text, num_samples=1, temperature=temperature, seed=seed + i)[0]
            for i, text in enumerate(conditions)]


# ---------------------------------------------------------------- metrics

@torch.no_grad()
def token_nll(language_model, texts):
    """Per text, (summed negative log-likelihood in nats, tokens scored) under the causal LM: each text tokenized
    without special tokens after DOCUMENT_START, every token of the text scored; LM_BATCH texts a forward pass."""
    tokenizer, model = language_model.tokenizer, language_model.model
    if DOCUMENT_START not in tokenizer.get_vocab():
        raise ValueError(f"the language model's tokenizer has no {DOCUMENT_START!r} token")
    start = tokenizer.convert_tokens_to_ids(DOCUMENT_START)
    ids = [[start] + tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    result = [None] * len(ids)
    for first in range(0, len(order), LM_BATCH):
        rows = order[first:first + LM_BATCH]
        width = max(len(ids[i]) for i in rows)
        batch = torch.full((len(rows), width), start, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            batch[r, :len(ids[i])], mask[r, :len(ids[i])] = torch.tensor(ids[i]), 1
        logits = model(input_ids=batch.to(language_model.device), attention_mask=mask.to(language_model.device))
        logits = logits.logits[:, :-1].float().cpu()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none") * mask[:, 1:]
        for r, i in enumerate(rows):
            result[i] = (float(nll[r].sum()), int(mask[r, 1:].sum()))
    return result


def ngrams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_2(texts):
    """Unique word bigrams / bigrams over the passages (bigrams within a passage)."""
    grams = [g for text in texts for g in ngrams(split_words(text), 2)]
    return len(set(grams)) / len(grams) if grams else None


def copy_share(texts, train_grams):
    """The share of the passages' NGRAM-grams (with repeats) found among `train_grams` (a set)."""
    grams = [g for text in texts for g in ngrams(split_words(text), NGRAM)]
    return sum(g in train_grams for g in grams) / len(grams) if grams else None


class Judge:
    """Scores a set of passages, one per condition, against the conditions: MiniLM fidelity and topic recall over
    the training windows, SmolLM2 perplexity, distinct-2 and copying.

    encoder: the DenseEncoder; language_model: a hybridrag LanguageModel; condition_vectors (n, d) and
    condition_topics (n,): the conditions'; train_vectors (M, d), train_topics (M,), train_windows: the training
    windows' (lists of words)."""

    def __init__(self, encoder, language_model, condition_vectors, condition_topics, train_vectors, train_topics,
                 train_windows):
        self.encoder, self.language_model = encoder, language_model
        self.condition_vectors, self.condition_topics = condition_vectors, np.asarray(condition_topics)
        self.train_vectors, self.train_topics = train_vectors, np.asarray(train_topics)
        self.train_grams = {g for words in train_windows for g in ngrams(words, NGRAM)}
        self.lm_seconds = 0.0

    def fidelity(self, vectors):
        """Mean cosine of each passage's vector (n, d) to its condition's."""
        return float((vectors * self.condition_vectors).sum(axis=1).mean())

    def topic_recall(self, vectors, exclude=None):
        """The share of passages whose nearest training window (cosine; `exclude` (n,): a training row each may not
        pick) is of the condition's topic."""
        scores = vectors @ self.train_vectors.T  # (n, M)
        if exclude is not None:
            scores[np.arange(len(scores)), exclude] = -np.inf
        return float((self.train_topics[scores.argmax(axis=1)] == self.condition_topics).mean())

    def perplexity(self, texts):
        """(per-token perplexity of the passages together, tokens scored) under the language model."""
        started = time.perf_counter()
        scored = token_nll(self.language_model, texts)
        self.lm_seconds += time.perf_counter() - started
        nll, tokens = (sum(column) for column in zip(*scored))
        return math.exp(nll / tokens), tokens

    def row(self, method, texts, *, vectors=None, exclude=None, fluency=True):
        """The table row of `texts` (one per condition); vectors: their MiniLM rows when already encoded."""
        vectors = self.encoder.encode(texts) if vectors is None else vectors
        perplexity, tokens = self.perplexity(texts) if fluency else (None, None)
        return {"method": method, "passages": len(texts),
                "mean_words": float(np.mean([len(split_words(t)) for t in texts])),
                "cos_condition": self.fidelity(vectors), "topic_recall@1": self.topic_recall(vectors, exclude),
                "perplexity": perplexity, "lm_tokens": tokens, "distinct_2": distinct_2(texts),
                "copy_4gram": copy_share(texts, self.train_grams)}


# ---------------------------------------------------------------- the run

def baseline_rows(judge, data, counts, seed):
    """The rows of real and unigram text: the conditions themselves, a training window of the same topic, a
    held-out window of another topic, and unigram samples."""
    texts, vectors = data["texts"], data["vectors"]
    conditions, same, other = data["conditions"], data["same"], data["other"]
    position = {row: i for i, row in enumerate(data["train"])}  # window row -> row of judge.train_vectors
    samples = unigram_samples(counts, len(conditions), seed)
    rows = [judge.row(BASELINES[0], [texts[i] for i in conditions], vectors=vectors[conditions]),
            judge.row(BASELINES[1], [texts[i] for i in same], vectors=vectors[same],
                      exclude=np.array([position[i] for i in same]), fluency=False),
            judge.row(BASELINES[2], [texts[i] for i in other], vectors=vectors[other], fluency=False),
            judge.row(BASELINES[3], samples)]
    rows[-1]["example"] = samples[0]
    return rows


def load_windows(spec, encoder, seed):
    """The windows, their texts, MiniLM vectors (N, d), topics, the split and the conditions (see pick_conditions)."""
    windows, topics_used = topic_windows(spec, seed)
    check_round_trip(windows)
    topics = [topic for topic, _ in windows]
    texts = [join_words(words) for _, words in windows]
    train, held = split_rows(len(windows), seed)
    conditions, same, other = pick_conditions(topics, train, held, spec["conditions"], seed)
    log(f"[{SUITE}] encoding {len(texts)} windows of {LENGTH} words ({topics_used} topics) with {encoder.name} ...")
    started = time.perf_counter()
    vectors = encoder.encode(texts)
    return {"windows": [words for _, words in windows], "topics": topics, "topics_used": topics_used, "texts": texts,
            "vectors": vectors, "train": train, "held": held, "conditions": conditions, "same": same,
            "other": other, "encode_seconds": time.perf_counter() - started}


def run(size, out, threads=2, seed=0):
    torch.set_num_threads(threads)
    spec = SIZES[size]
    wall = time.perf_counter()
    encoder = DenseEncoder(device="cpu", show_progress=sys.stderr.isatty())
    data = load_windows(spec, encoder, seed)
    windows, train, held, conditions = data["windows"], data["train"], data["held"], data["conditions"]
    vocabulary, counts = build_vocabulary([windows[i] for i in train])
    ids, vectors = token_ids(windows, vocabulary), torch.from_numpy(data["vectors"])
    train_sample = np.sort(np.random.default_rng(seed + 3).choice(train, min(len(train), len(held)), replace=False))
    unigram = {"held_out": unigram_bits(ids[train], ids[held], len(vocabulary)),
               "train": unigram_bits(ids[train], ids[train_sample], len(vocabulary))}
    language_model = load_language_model(attn_implementation="sdpa")
    judge = Judge(encoder, language_model, data["vectors"][conditions], [data["topics"][i] for i in conditions],
                  data["vectors"][train], [data["topics"][i] for i in train], [windows[i] for i in train])
    baselines = baseline_rows(judge, data, counts, seed)
    baselines[-1]["elbo_bits"] = unigram

    model = make_model(spec, len(vocabulary), encoder.dimension, seed)
    generator = DocumentGenerator(model, vocabulary, encoder, LENGTH)
    condition_texts = [data["texts"][i] for i in conditions]
    log(f"[{SUITE}] training {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters on {len(train)} "
        f"windows ({len(vocabulary)} words) to {list(spec['steps'])} steps; {len(held)} held-out windows, "
        f"{len(conditions)} conditions ...")
    rows, examples, losses, stages = [], [], [], []
    for steps, history, train_s in progress(train_stages(model, ids[train], vectors[train], spec["steps"], seed),
                                            f"{SUITE} stages", unit="stage"):
        losses += history
        started = time.perf_counter()
        elbo = {"held_out": elbo_bits(model, ids[held], vectors[held], seed),
                "train": elbo_bits(model, ids[train_sample], vectors[train_sample], seed)}
        for temperature in TEMPERATURES:
            passages = generate(generator, condition_texts, temperature, seed)
            rows.append({**judge.row(f"diffusion T={temperature:g}", passages), "steps": steps,
                         "temperature": temperature, "elbo_bits": elbo})
            examples += [{"steps": steps, "temperature": temperature, "condition": c, "passage": p}
                         for c, p in zip(condition_texts[:EXAMPLES], passages[:EXAMPLES])]
        stages.append({"steps": steps, "train_seconds": train_s, "eval_seconds": time.perf_counter() - started})
        log(f"[{SUITE}] {steps} steps: held-out ELBO {elbo['held_out']['mean']:.2f} bits/word (unigram "
            f"{unigram['held_out']['mean']:.2f}), cos cond T=1 {rows[-2]['cos_condition']:.3f}, recall@1 "
            f"{rows[-2]['topic_recall@1']:.3f}, perplexity {rows[-2]['perplexity']:.0f} (train {train_s:.0f} s)")

    every = max(1, len(losses) // 200)
    result = {
        "suite": SUITE, "size": size, "seed": seed, "threads": threads,
        "data": {"corpus": "pydoc_data.topics", "topics": data["topics_used"], "windows": len(windows),
                 "train_windows": len(train), "held_out_windows": len(held), "conditions": len(conditions),
                 "train_sample_windows": len(train_sample), "length": LENGTH, "vocabulary": len(vocabulary),
                 "held_out_unknown_share": float((ids[held] == 0).to(torch.float64).mean()),
                 "round_trip": "split_words(join_words(window)) == window for every window",
                 "encoder": encoder.name, "language_model": language_model.name,
                 "condition": "the held-out window's text (join_words), embedded by the encoder"},
        "model": model.config.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
        "training": {"steps": list(spec["steps"]), "batch_size": BATCH, "lr": LR,
                     "optimizer": "one AdamW (weight decay 0) kept across the stages", "stages": stages,
                     "loss_curve": [{"step": i, "loss": losses[i]} for i in range(0, len(losses), every)]},
        "sampling": {"api": "DocumentGenerator.generate", "num_steps": SAMPLING_STEPS, "order": "random",
                     "temperatures": list(TEMPERATURES), "per_condition": 1},
        "metrics": {"elbo": f"MaskedDiffusionLM.loss / ln 2, {ELBO_DRAWS} mask-rate draws per window",
                    "unigram": "add-one smoothed training frequencies", "fidelity": "MiniLM cosine to the condition",
                    "topic_recall@1": "the nearest training window (MiniLM cosine) is of the condition's topic",
                    "perplexity": f"{language_model.name}, per token, after {DOCUMENT_START}",
                    "distinct_2": "unique bigrams / bigrams of the set",
                    "copy_4gram": f"share of the set's {NGRAM}-grams found in the training windows",
                    "uniform_bits": math.log2(len(vocabulary))},
        "rows": rows + baselines, "examples": examples,
        "seconds": {"encode": data["encode_seconds"], "train": sum(s["train_seconds"] for s in stages),
                    "evaluate": sum(s["eval_seconds"] for s in stages), "language_model": judge.lm_seconds,
                    "total": time.perf_counter() - wall},
        "environment": environment(torch.device("cpu")),
    }
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if size == "quick" else ""
    write_json(out / f"results{suffix}.json", result)
    result["png"] = str(plot(result, out / f"{SUITE}{suffix}.png"))
    return result


# ---------------------------------------------------------------- output

def _fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def _elbo(row, split):
    elbo = row.get("elbo_bits")
    return "-" if elbo is None else f"{elbo[split]['mean']:.2f} +- {elbo[split]['sem']:.2f}"


COLUMNS = [("method", lambda r: r["method"]), ("steps", lambda r: str(r.get("steps", "-"))),
           ("ELBO held-out", lambda r: _elbo(r, "held_out")), ("ELBO train", lambda r: _elbo(r, "train")),
           ("cos cond", lambda r: _fmt(r["cos_condition"])), ("topic r@1", lambda r: _fmt(r["topic_recall@1"])),
           ("perplexity", lambda r: _fmt(r["perplexity"], ".1f")), ("distinct-2", lambda r: _fmt(r["distinct_2"])),
           (f"{NGRAM}-gram copy", lambda r: _fmt(r["copy_4gram"])), ("words", lambda r: f"{r['mean_words']:.1f}")]
PANELS = [("elbo_bits", "held-out ELBO, bits per word (lower is better)"),
          ("cos_condition", "MiniLM cosine to the condition"), ("topic_recall@1", "topic recall@1"),
          ("perplexity", "SmolLM2 perplexity per token (log)"), ("distinct_2", "distinct-2"),
          ("copy_4gram", f"{NGRAM}-gram copy share")]
BASELINE_STYLES = dict(zip(BASELINES, (("black", "--"), ("tab:green", "-."), ("tab:red", ":"),
                                      ("tab:orange", "--"))))


def _value(row, key, split="held_out"):
    value = row.get(key)
    return value[split]["mean"] if isinstance(value, dict) else value


def _plot_panel(axis, result, key, title):
    """One metric against the training steps: a line per temperature (the ELBO: held-out and training windows), the
    baselines as horizontal lines."""
    diffusion = [r for r in result["rows"] if "steps" in r]
    steps = sorted({r["steps"] for r in diffusion})
    if key == "elbo_bits":
        mine = [r for r in diffusion if r["temperature"] == TEMPERATURES[0]]  # the ELBO does not depend on it
        for split, color, marker in (("held_out", "navy", "o"), ("train", "tab:cyan", "s")):
            axis.errorbar(steps, [_value(r, key, split) for r in mine], [r[key][split]["sem"] for r in mine],
                          marker=marker, color=color, capsize=3, label=f"diffusion ELBO, {split.replace('_', '-')} "
                          "windows (+- sem)")
    else:
        for temperature, color in zip(TEMPERATURES, ("tab:blue", "tab:purple")):
            mine = [r for r in diffusion if r["temperature"] == temperature]
            axis.plot(steps, [_value(r, key) for r in mine], marker="o", color=color,
                      label=f"diffusion T={temperature:g}")
    for row in result["rows"]:
        if "steps" not in row and _value(row, key) is not None:
            color, style = BASELINE_STYLES[row["method"]]
            axis.axhline(_value(row, key), color=color, linestyle=style, linewidth=1, label=row["method"])
    axis.set_xscale("log")
    axis.set_xticks(steps, [str(s) for s in steps])
    axis.minorticks_off()
    if key == "perplexity":
        axis.set_yscale("log")
    axis.set_xlabel("training steps", fontsize=8)
    axis.set_title(title, fontsize=9)
    axis.grid(True, alpha=0.3)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2))
    for axis, (key, title) in zip(axes.flat, PANELS):
        _plot_panel(axis, result, key, title)
    data = result["data"]
    fig.suptitle(f"DocumentGenerator ({result['parameters'] / 1e6:.1f} M parameters) on {data['train_windows']} "
                 f"pydoc windows of {data['length']} words, {data['conditions']} held-out conditions "
                 f"({result['size']}); {result['environment']['device']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    figure_legend(fig, axes.flat, ncol=5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_examples(result, steps):
    """The example passages of the step count `steps`: each condition, then its passage at each temperature."""
    chosen = [e for e in result["examples"] if e["steps"] == steps]
    for condition in dict.fromkeys(e["condition"] for e in chosen):
        print(f"condition: {condition}")
        for e in chosen:
            if e["condition"] == condition:
                print(f"  T={e['temperature']:g}: {e['passage']}")
    print(f"unigram sample: {result['rows'][-1]['example']}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{SUITE}", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{SIZES['quick']['windows']} windows, the default 128-wide 2-layer model, "
                             f"{SIZES['quick']['steps'][-1]} steps (full: every window, 256 wide, 4 layers, "
                             f"{SIZES['full']['steps'][-1]} steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="subset, split, model, batch, mask and sampling seed (default 0)")
    add_output_options(parser, SUITE, record_needs='full size, a clean checkout')
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    out = args.out or RUNS_ROOT / device_slug(torch.device("cpu")) / SUITE
    check_output_options(parser, out, record=args.record, quick=args.quick)
    result = run("quick" if args.quick else "full", out, threads=args.threads, seed=args.seed)
    data, metrics = result["data"], result["metrics"]
    print(format_table(f"{SUITE} ({result['size']}): {data['conditions']} held-out conditions, one passage each; "
                       f"ELBO = diffusion bound on the {data['held_out_windows']} held-out / "
                       f"{data['train_sample_windows']} training windows, bits per word +- sem (unigram row: its "
                       f"cross-entropy; uniform {metrics['uniform_bits']:.2f}); cos cond = MiniLM cosine to the "
                       f"condition; topic r@1 over {data['train_windows']} training windows; perplexity under "
                       f"{data['language_model']}", result["rows"], COLUMNS))
    print()
    print_examples(result, result["training"]["steps"][-1])
    seconds = result["seconds"]
    print(f"encode {seconds['encode']:.0f} s, train {seconds['train']:.0f} s, evaluate {seconds['evaluate']:.0f} s "
          f"(language model {seconds['language_model']:.0f} s in all), total {seconds['total']:.0f} s "
          f"({result['threads']} thread(s), load {result['environment']['load_avg_1m']:.1f}); wrote {out}")
    if args.record:
        record_result(SUITE, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
