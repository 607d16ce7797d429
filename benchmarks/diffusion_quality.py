"""Embedding diffusion quality: how close are generated MiniLM embeddings to real ones?

Real data: the chunks of Python's bundled documentation (the 79 topics of `pydoc_data.topics`, cut into 200-token
windows with 40 overlap by MiniLM's tokenizer, as benchmarks/retrieval_quality.py does: 821 chunks), embedded by the
bundled all-MiniLM-L6-v2 (DenseEncoder, 384-d, unit rows). They are split 80/20 by chunk (seeded): an
EmbeddingDiffusion is trained on the training chunks and evaluated against the held-out ones.

Condition of a chunk: the MiniLM embedding of its first sentence (its text up to the first ". ", "? " or "! ",
underline rows of headings dropped, at most 32 words). Chosen over the embedding of the topic's name because (1) it
is one condition per chunk, so a held-out chunk's condition was never seen in training and the benchmark measures
generation for new conditions, as generating synthetic data for a new query would need, whereas the 79 topic names
are all seen in training and the model would only have to recall each topic's cloud; (2) it is a short text embedded
by the same encoder, like the query embeddings that hybridrag.diffusion.hand_over takes as conditions; (3) topic names
are terse ids ("bltin-code-objects", "typesseq-mutable") whose embeddings say little. A window that starts in the
middle of a sentence gets that sentence's tail: still text of the chunk.

Model: DiffusionConfig's defaults (linear DDPM schedule over T = 1000, condition_dropout 0.1) except prediction="x0"
(the network predicts the clean vector). In the quick setting, trial runs (same data, 1500 steps) gave: "epsilon" (the
default) samples of mean norm ~78 against the data's 1 (precision 0, FD ~6000: the x0 estimate of the first DDIM
steps multiplies the network's error by ~152 and the trajectory never recovers), clip_x0=3 with "epsilon" norm ~2
(precision 0, FD 3.2), "v" precision 0.25 and FD 0.76, "x0" precision 0.99, recall 0.31, FD 0.43 at w=1. The full
size was not tried with the other predictions.

Generated: one sample per held-out chunk, from its condition, by DDIM (50 steps, eta 0) at guidance scales 1, 2 and 3
(classifier-free guidance; the model is trained with condition_dropout 0.1).

Measured, for each method against the held-out real embeddings: improved precision and recall (k-NN manifolds,
k=3, hybridrag.diffusion.precision_recall), the Frechet distance in embedding space (frechet_distance), the mean
cosine of a sample to its condition, to its own held-out chunk (the one whose condition it was made from), to its
nearest held-out chunk and to its nearest training chunk (near 1 = a copy of the training data), the mean norm (real
rows have norm 1), and how many samples filter_samples accepts (cosine to the condition >= 0.5 and to every
training chunk <= 0.95: relevant and not a near-copy of what the store already holds). Side by side in the same run:
  train (real)    a seeded subset of the training embeddings, as many as the held-out chunks: real vs real, the floor
                  every generator should be compared with (set sizes matter to both k-NN manifolds and FD, so every
                  method has the same number of rows);
  gaussian        draws from a Gaussian with the training embeddings' mean and covariance: a simple generative
                  baseline that matches FD's two moments by construction;
  untrained       the same model before training (its statistics fitted, so its samples are in data units), guidance 1
                  (an untrained x0 network predicts values near 0 in model units, so its samples collapse near the
                  training mean: precision reads ~1, since the mean lies inside the real manifold, and recall ~0);
  diffusion w=..  the trained model at each guidance scale.

Output: a table on stdout, results.json (results-quick.json) and diffusion_quality.png (-quick.png: bars of
precision, recall and FD per method) under --out (default benchmarks/runs/<device>/diffusion_quality, ignored by
git); --record copies a full run to benchmarks/results/<device>/diffusion_quality.json and .png (a clean checkout).

    python -m benchmarks.diffusion_quality [--quick] [--threads N] [--out DIR] [--record]
    # --quick: 400 of the 821 chunks, a 256-wide 3-block model, 1500 training steps of 128;
    # full: all 821 chunks, the default 512-wide 4-block model, 8000 steps of 256.
    # Run time: --quick --threads 1 took ~65 s wall on an idle 2-core AMD EPYC (encoding 34 s, training 22 s,
    # model load and sampling the rest). The full size was NOT timed: estimated at ~6-9 min with --threads 2 on the
    # same 2 idle cores (encoding 821 chunks ~40-70 s; training measured at 0.083 s/step on 1 loaded thread,
    # 8000 steps ~5-11 min depending on how well the second thread helps; sampling seconds).
"""
import argparse
import re
import sys
import time

import numpy as np
import torch

from hybridrag.diffusion import (DiffusionConfig, EmbeddingDiffusion, filter_samples, frechet_distance,
                                 precision_recall, train_embedding_diffusion)
from hybridrag.retrieval import DenseEncoder
from hybridrag.retrieval.documents import chunk_documents

from .common import (RUNS_ROOT, add_output_options, check_output_options, device_slug, environment, format_table, log,
                     record_result, write_json)
from .retrieval_quality import corpus

SUITE = "diffusion_quality"
SIZES = {"quick": {"chunks": 400, "hidden_dim": 256, "num_layers": 3, "steps": 1500, "batch_size": 128},
         "full": {"chunks": None, "hidden_dim": 512, "num_layers": 4, "steps": 8000, "batch_size": 256}}
GUIDANCE_SCALES = (1.0, 2.0, 3.0)
PREDICTION = "x0"  # see the docstring: "epsilon" (the default) diverged here, "v" was poor
SAMPLING_STEPS = 50
HELD_OUT = 0.2
K = 3
MIN_SIMILARITY = 0.5           # filter_samples: cosine to the condition at least this
MAX_CORPUS_SIMILARITY = 0.95   # ... and to every training chunk at most this (not a near-copy)
FIRST_SENTENCE_WORDS = 32
UNDERLINE = re.compile(r"^\s*[*=\-~^#+]{3,}\s*$")
_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)")


def first_sentence(text, max_words=FIRST_SENTENCE_WORDS):
    """The text up to its first sentence end, heading underlines dropped, whitespace collapsed, <= max_words words."""
    joined = " ".join(" ".join(line for line in text.splitlines() if not UNDERLINE.match(line)).split())
    match = _SENTENCE.match(joined)
    words = (match.group(1) if match else joined).split()
    return " ".join(words[:max_words])


def load_data(spec, encoder, seed):
    """(chunk texts, condition texts, chunk embeddings (N, 384), condition embeddings (N, 384), train and held-out
    row indices), float32 tensors; quick sizes draw a seeded subset of the chunks first."""
    chunks = chunk_documents(corpus(), chunk_tokens=200, overlap=40, tokenizer=encoder.tokenizer)
    total = len(chunks)
    rng = np.random.default_rng(seed)
    if spec["chunks"] is not None and spec["chunks"] < total:
        chunks = [chunks[i] for i in sorted(rng.choice(total, spec["chunks"], replace=False))]
    texts = [c.text for c in chunks]
    conditions = [first_sentence(t) for t in texts]
    started = time.perf_counter()
    log(f"[{SUITE}] encoding {len(texts)} chunks (of {total}) and their first sentences with {encoder.name} ...")
    x = torch.from_numpy(encoder.encode(texts))
    c = torch.from_numpy(encoder.encode(conditions))
    encode_s = time.perf_counter() - started
    log(f"[{SUITE}] encoded in {encode_s:.1f} s")
    order = rng.permutation(len(texts))
    held = int(round(HELD_OUT * len(texts)))
    test, train = np.sort(order[:held]), np.sort(order[held:])
    return {"chunks": chunks, "total_chunks": total, "conditions": conditions, "x": x, "c": c,
            "train": torch.from_numpy(train), "test": torch.from_numpy(test), "encode_seconds": encode_s}


def gaussian_like(x, n, generator):
    """n draws from N(mean(x), cov(x)) (float64 eigen-decomposition; the covariance may be singular)."""
    x = x.to(torch.float64)
    mean = x.mean(dim=0)
    values, vectors = torch.linalg.eigh(torch.cov(x.T))
    root = vectors * values.clamp(min=0).sqrt()
    z = torch.randn((n, x.shape[1]), generator=generator, dtype=torch.float64)
    return (mean + z @ root.T).to(torch.float32)


def _unit(x):
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def score(method, samples, real, conditions, targets, train, seconds=None):
    """One row of the table: samples (n, d) against the held-out real embeddings (their conditions and chunks in
    the same row order) and the training embeddings."""
    samples = samples.to(torch.float32)
    pr = precision_recall(real, samples, k=K)
    unit = _unit(samples)
    kept = filter_samples(samples, conditions, train, min_similarity=MIN_SIMILARITY,
                          max_corpus_similarity=MAX_CORPUS_SIMILARITY)
    return {"method": method, "samples": samples.shape[0], "precision": pr["precision"], "recall": pr["recall"],
            "frechet_distance": frechet_distance(real, samples),
            "cos_condition": float((unit * _unit(conditions)).sum(dim=1).mean()),
            "cos_own_chunk": float((unit * _unit(targets)).sum(dim=1).mean()),
            "cos_nearest_held_out": float((unit @ _unit(real).T).amax(dim=1).mean()),
            "cos_nearest_train": float((unit @ _unit(train).T).amax(dim=1).mean()),
            "mean_norm": float(samples.norm(dim=1).mean()),
            "accepted": int(kept.accepted.numel()), "sample_seconds": seconds}


def run(size, out, threads=2, seed=0):
    torch.set_num_threads(threads)
    spec = SIZES[size]
    wall = time.perf_counter()
    encoder = DenseEncoder(device="cpu", show_progress=sys.stderr.isatty())
    data = load_data(spec, encoder, seed)
    x, c = data["x"], data["c"]
    train, test = data["train"], data["test"]
    x_train, c_train, x_test, c_test = x[train], c[train], x[test], c[test]
    n = len(test)
    config = DiffusionConfig(dim=x.shape[1], condition_dim=c.shape[1], hidden_dim=spec["hidden_dim"],
                             num_layers=spec["num_layers"], prediction=PREDICTION, condition_dropout=0.1, sampling_steps=SAMPLING_STEPS)
    generator = torch.Generator().manual_seed(seed)
    rows = []

    subset = torch.randperm(len(train), generator=generator)[:n]
    rows.append(score("train (real)", x_train[subset], x_test, c_test, x_test, x_train))
    rows.append(score("gaussian", gaussian_like(x_train, n, generator), x_test, c_test, x_test, x_train))

    torch.manual_seed(seed)
    model = EmbeddingDiffusion(config)
    model.fit_statistics(x_train)
    noise = torch.randn((n, config.dim), generator=torch.Generator().manual_seed(seed + 1))  # shared by all samples
    started = time.perf_counter()
    untrained = model.sample(c_test, num_steps=SAMPLING_STEPS, guidance_scale=1.0, noise=noise)
    rows.append(score("untrained", untrained, x_test, c_test, x_test, x_train, time.perf_counter() - started))

    log(f"[{SUITE}] training {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters on "
        f"{len(train)} chunks: {spec['steps']} steps of {spec['batch_size']} ...")
    started = time.perf_counter()
    history = train_embedding_diffusion(model, x_train, c_train, steps=spec["steps"], batch_size=spec["batch_size"],
                                        lr=1e-3, progress=sys.stderr.isatty(), seed=seed)
    train_s = time.perf_counter() - started
    log(f"[{SUITE}] trained in {train_s:.1f} s, final loss (mean of the last 100) {np.mean(history[-100:]):.4f}")
    for scale in GUIDANCE_SCALES:
        started = time.perf_counter()
        samples = model.sample(c_test, num_steps=SAMPLING_STEPS, guidance_scale=scale, noise=noise)
        rows.append(score(f"diffusion w={scale:g}", samples, x_test, c_test, x_test, x_train,
                          time.perf_counter() - started))

    every = max(1, len(history) // 100)
    result = {
        "suite": SUITE, "size": size, "seed": seed, "threads": threads,
        "data": {"corpus": "pydoc_data.topics", "total_chunks": data["total_chunks"], "chunks": len(data["chunks"]),
                 "train": len(train), "held_out": n, "encoder": encoder.name, "dim": int(x.shape[1]),
                 "condition": f"MiniLM embedding of the chunk's first sentence (<= {FIRST_SENTENCE_WORDS} words)",
                 "condition_examples": [data["conditions"][int(i)] for i in test[:3]]},
        "model": config.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
        "training": {"steps": spec["steps"], "batch_size": spec["batch_size"], "lr": 1e-3,
                     "final_loss": float(np.mean(history[-100:])),
                     "loss_curve": [{"step": i, "loss": history[i]} for i in range(0, len(history), every)]},
        "sampling": {"sampler": "DDIM", "num_steps": SAMPLING_STEPS, "eta": 0.0, "guidance_scales": GUIDANCE_SCALES},
        "metrics": {"k": K, "against": "held-out real chunk embeddings",
                    "filter": {"min_similarity": MIN_SIMILARITY, "max_corpus_similarity": MAX_CORPUS_SIMILARITY,
                               "corpus": "training chunk embeddings"}},
        "rows": rows,
        "seconds": {"encode": data["encode_seconds"], "train": train_s, "total": time.perf_counter() - wall},
        "environment": environment(torch.device("cpu")),
    }
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if size == "quick" else ""
    write_json(out / f"results{suffix}.json", result)
    result["png"] = str(plot(result, out / f"{SUITE}{suffix}.png"))
    return result


COLUMNS = [("method", lambda r: r["method"]), ("n", lambda r: str(r["samples"])),
           ("precision", lambda r: f"{r['precision']:.3f}"), ("recall", lambda r: f"{r['recall']:.3f}"),
           ("FD", lambda r: f"{r['frechet_distance']:.4f}"), ("cos cond", lambda r: f"{r['cos_condition']:.3f}"),
           ("cos own", lambda r: f"{r['cos_own_chunk']:.3f}"),
           ("cos nn held-out", lambda r: f"{r['cos_nearest_held_out']:.3f}"),
           ("cos nn train", lambda r: f"{r['cos_nearest_train']:.3f}"), ("norm", lambda r: f"{r['mean_norm']:.3f}"),
           ("accepted", lambda r: f"{r['accepted']}/{r['samples']}")]


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["method"] for r in rows]
    positions = np.arange(len(rows))
    colors = ["gray", "tab:olive", "tab:red"] + ["tab:blue"] * (len(rows) - 3)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for axis, (key, label) in zip(axes, (("precision", f"precision (k={K})"), ("recall", f"recall (k={K})"),
                                         ("frechet_distance", "Frechet distance (lower is better)"))):
        values = [r[key] for r in rows]
        axis.bar(positions, values, color=colors)
        for p, v in zip(positions, values):
            axis.annotate(f"{v:.3f}" if key != "frechet_distance" else f"{v:.3g}", (p, v), ha="center",
                          va="bottom", fontsize=7)
        axis.set_xticks(positions, names, rotation=35, ha="right", fontsize=8)
        axis.set_title(label, fontsize=9)
        axis.grid(True, axis="y", alpha=0.3)
        if key != "frechet_distance":
            axis.set_ylim(0, 1.08)
        else:
            axis.set_ylim(0, max(values) * 1.15)
    data = result["data"]
    fig.suptitle(f"Generated MiniLM embeddings vs {data['held_out']} held-out pydoc chunks ({result['size']}, "
                 f"trained on {data['train']}, DDIM {result['sampling']['num_steps']} steps; "
                 f"{result['environment']['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diffusion_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="400 chunks, a smaller model, 1500 steps (full: 821 chunks, 6000 steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="split, subset, noise and training seed (default 0)")
    add_output_options(parser, SUITE, record_needs='full size, a clean checkout')
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    out = args.out or RUNS_ROOT / device_slug(torch.device("cpu")) / SUITE
    check_output_options(parser, out, record=args.record, quick=args.quick)
    result = run("quick" if args.quick else "full", out, threads=args.threads, seed=args.seed)
    data = result["data"]
    print(format_table(f"{SUITE} ({result['size']}): {data['held_out']} generated vs {data['held_out']} held-out "
                       f"real chunk embeddings (trained on {data['train']}); precision/recall k={K}; accepted = "
                       f"filter_samples(cos cond >= {MIN_SIMILARITY}, cos to train <= {MAX_CORPUS_SIMILARITY})",
                       result["rows"], COLUMNS))
    seconds = result["seconds"]
    print(f"encode {seconds['encode']:.0f} s, train {seconds['train']:.0f} s, total {seconds['total']:.0f} s "
          f"({result['threads']} thread(s)); wrote {out}")
    if args.record:
        record_result(SUITE, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
