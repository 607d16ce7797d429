"""Augmentation for a low-data retriever: does synthetic data from an embedding diffusion model raise held-out recall?

Real data: the MiniLM embeddings of the pydoc chunks and of their first sentences, exactly as
benchmarks/diffusion_quality.py makes them (its load_data, imported: the 79 `pydoc_data.topics` topics cut into
200-token windows with 40 overlap, 821 chunks; each chunk's condition is the embedding of its first sentence), and its
seeded 80/20 split by chunk. The held-out 20% are the test queries; the other 80% are the pool the training pairs come
from. Every seed draws a different labeled subset of the pool; the test split stays the same, so that arms and seeds
are compared on the same queries.

Task: retrieve a chunk from its first sentence. Query = the first-sentence embedding, positive = the chunk's
embedding; held-out recall@1 and @10 of the test queries' own chunks among all the run's chunks (400 in --quick, 821
in full). Training pairs: only `labeled` (128) of the pool's chunks; the rest of the pool are unlabeled: their first
sentences (conditions) are known, their chunk embeddings are not given to the generator or to the retriever, except
in the upper-bound arm.

The retriever: a NeuralRetriever in features mode (input_dim 384, separate towers, fixed temperature 0.05), trained by a
ContinualLearner (AdamW lr 3e-3, batches of 32 drawn from its buffer, in-batch negatives, InfoNCE), the same number of
steps in every arm. Its query tower starts at a seeded random rotation (torch.nn.init.orthogonal_) instead of the
identity, the document tower at the identity: queries in a space that is not aligned with the documents' (as when the
query side is a new encoder), so what the tower knows comes from the training pairs. Why not the identity init: MiniLM
alone already does this task (recall@1 0.67 on the 164 full-size test queries) and an identity-initialised tower trained
on 32, 128 or 656 of the 657 pool pairs stayed within 0.02 of that (0.66, 0.68, 0.69 at lr 3e-4, 600 steps; lr 1e-3 no
better; lr 1e-2 collapsed to 0.17-0.32; trial runs, seed 0), so no augmentation could show either way. From the random
rotation, held-out recall@1 grows with real data: 0.07 / 0.10 / 0.21 / 0.28 / 0.38 with 32 / 64 / 128 / 256 / 656 pairs
(trial runs, full size, seed 0, 400 steps): the regime in which more pairs, real or synthetic, should count. The
temperature is fixed because a learned one (the NeuralRetriever default) was unstable at lr 3e-3 (in a trial with a
64-wide output, recall@1 fell from 0.47 with 128 pairs to 0.34 with 656).

Arms, per seed, the same retriever initialisation, batch seed and steps in each:
  real                 the labeled pairs only;
  real + synthetic     plus the generated pairs that filter_samples accepts, given to the learner through
                       hybridrag.diffusion.hand_over (the library's route from the filter to a ContinualLearner);
  real + synthetic (copy test)
                       plus those of them that also pass filter_samples(authentic=True): the copy test of Alaa et
                       al. 2022 refuses a sample more similar to its nearest labeled chunk than that chunk is to its
                       own nearest labeled chunk (real unlabeled chunks sit at cosine ~0.65 to their nearest labeled
                       chunk, a generator's samples at ~0.87 in trials: it reproduces its training data);
  real + jitter        plus as many noisy copies of the labeled pairs (cycled in a seeded order): Gaussian noise of
                       expected norm 0.5 added to the query and to the positive, rows renormalised (cosine ~0.89 to
                       the original): the cheap augmentation baseline, at the synthetic arm's count;
  real + true (acc.)   plus the true chunk embeddings of the same accepted conditions: the same conditions and count
                       as the synthetic arm with correct positives, so the gap to it is what the generated vectors'
                       errors cost (the upper bound for this filter);
  real + true (all)    plus every unlabeled pool pair: what the whole pool would give.
References, without training: MiniLM (the identity towers: raw cosine) and the untrained rotated tower (chance).

Synthetic data: per seed an EmbeddingDiffusion trained on the labeled pairs only (conditions = their first-sentence
embeddings; diffusion_quality's model with prediction="x0", condition_dropout 0.1, 256 wide, 3 blocks; 400 (quick) or
1000 (full) steps of 128, lr 1e-3), then one DDIM sample (50 steps, eta 0, guidance 1: the scale with the highest
cosine to the held-out chunk in diffusion_quality) per unlabeled condition, filtered as in diffusion_quality
(cosine to the condition >= 0.5, to every labeled chunk <= 0.95). Diagnostics of the accepted samples: their mean
cosine to the condition, to their condition's true chunk and to the nearest labeled chunk, the share whose nearest
chunk among all chunks is their own chunk (the label is right) and the share whose nearest chunk is a labeled one
(a copy of the training data), and the same first share for the conditions themselves.

Trial runs before this suite was fixed (full size, seed 0, 128 labeled, 400 steps): real 0.207 recall@1;
real + synthetic 0.13-0.18 whatever the diffusion steps (300, 600, 1500) or guidance (1, 2); stricter filters
(max cosine to a labeled chunk 0.85 or 0.75, min cosine to the condition 0.6) kept 2-71 samples and gave 0.18-0.22;
with 256 labeled, real 0.28 and real + synthetic 0.23-0.25. The generated vectors sat nearer a labeled chunk (cosine
0.83-0.88) than their own chunk (0.62-0.65): a generator trained on 128 pairs mostly reproduces its neighbours in
the training set, so its pairs teach the tower to map a new sentence onto a training chunk. The quick run below says
the same: the nearest chunk of 95-99% of the accepted samples is a labeled chunk, their own chunk for 0-2%.

Measured, --quick --threads 1 (2-core Intel Xeon shared with other work, load average ~2.6-2.9), recall@1 mean +- std
over seeds 0-2 / paired difference to real: real 0.179 +- 0.029; real + synthetic 0.146 +- 0.019 / -0.033 +- 0.019;
real + jitter 0.158 +- 0.059 / -0.021 +- 0.031; real + true (acc.) 0.238 +- 0.022 / +0.058 +- 0.007; real + true
(all) 0.342 +- 0.026 / +0.162 +- 0.022 (MiniLM without training 0.700). Augmentation did not help: synthetic pairs
cost recall@1 in every seed, jitter was within noise, and the true chunks of the same conditions helped.

Output: a table on stdout (mean +- standard deviation over the seeds, and the paired difference to the real arm:
each seed's arm minus the same seed's real, which cancels the labeled subset's luck), results.json (results-quick.json)
and augmentation.png (-quick.png: recall@1 and @10 bars with the seeds' spread as error bars and each seed as a dot)
under --out (default benchmarks/runs/<device>/augmentation, ignored by git); --record copies a full run to
benchmarks/results/<device>/augmentation.json and .png (a clean checkout).

    python -m benchmarks.augmentation [--quick] [--threads N] [--seed S] [--out DIR] [--record]
    # --quick: 400 of the 821 chunks (320 pool, 80 test), 3 seeds, diffusion 400 steps, retriever 200 steps;
    # full: all 821 chunks (657 pool, 164 test), 5 seeds, diffusion 1000 steps, retriever 300 steps.
    # Run time: --quick --threads 1 took 115 s wall on the 2-core Intel Xeon above at load average ~2.8 (encoding 400
    # chunks 44 s, generator training 3 x 11 s, the 15 retriever trainings 22 s, model load, sampling and plot the
    # rest) and 145 s at load ~3.7 (53 s, 3 x 14 s, 29 s), the same numbers both times; not timed on an idle machine.
    # The full size was NOT timed: estimated at ~4-6 min with --threads 1 on the same machine (encoding 821 chunks
    # ~90 s; 5 seeds x (1000 generator steps ~27 s + 5 x 300 retriever steps ~15 s)).
"""
import argparse
import sys
import time

import numpy as np
import torch

from hybridrag.diffusion import (DiffusionConfig, EmbeddingDiffusion, filter_samples, hand_over,
                                 train_embedding_diffusion)
from hybridrag.retention import ContinualLearner
from hybridrag.retrieval import DenseEncoder, NeuralRetriever

from .common import (RUNS_ROOT, add_output_options, check_output_options, device_slug, environment, figure_legend,
                     format_table, log, progress, record_result, write_json)
from .diffusion_quality import (FIRST_SENTENCE_WORDS, MAX_CORPUS_SIMILARITY, MIN_SIMILARITY, PREDICTION, SAMPLING_STEPS,
                                load_data)

SUITE = "augmentation"
SIZES = {"quick": {"chunks": 400, "labeled": 128, "seeds": 3, "hidden_dim": 256, "num_layers": 3,
                   "diffusion_steps": 400, "diffusion_batch": 128, "retriever_steps": 200},
         "full": {"chunks": None, "labeled": 128, "seeds": 5, "hidden_dim": 256, "num_layers": 3,
                  "diffusion_steps": 1000, "diffusion_batch": 128, "retriever_steps": 300}}
GUIDANCE = 1.0
DIFFUSION_LR = 1e-3
BATCH = 32          # retriever batch (in-batch negatives)
LR = 3e-3           # retriever AdamW learning rate
TEMPERATURE = 0.05  # fixed (learn_temperature=False): see the docstring
JITTER = 0.5        # expected norm of the jitter noise added to each unit row
KS = (1, 10)
ARMS = ("real", "real + synthetic", "real + synthetic (copy test)", "real + jitter", "real + true (acc.)",
        "real + true (all)")


def _unit(x):
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def make_retriever(dim, seed):
    """A features-mode NeuralRetriever whose query tower starts at a seeded random rotation (the document tower at
    the identity), fixed temperature."""
    retriever = NeuralRetriever(dim, temperature=TEMPERATURE, learn_temperature=False)
    with torch.no_grad():
        torch.nn.init.orthogonal_(retriever.query_tower.weight, generator=torch.Generator().manual_seed(seed))
    return retriever


def jittered(queries, positives, n, generator, scale=JITTER):
    """n noisy copies of the (query, positive) rows, cycled in a random order: each side plus Gaussian noise of
    expected norm `scale` (per coordinate scale / sqrt(d)), renormalised. Returns (queries (n, d), positives (n, d))."""
    d = queries.shape[1]
    order = torch.randperm(queries.shape[0], generator=generator)
    rows = order[torch.arange(n) % queries.shape[0]]
    sigma = scale / d ** 0.5
    noisy = [_unit(x[rows] + sigma * torch.randn((n, d), generator=generator)) for x in (queries, positives)]
    return noisy[0], noisy[1]


@torch.no_grad()
def recalls(retriever, queries, targets, documents):
    """{"recall@k": share of queries whose target row of `documents` is among their top k} for k in KS."""
    _, top = retriever.top_k(queries, retriever.encode_documents(documents), max(KS))
    hits = top == targets[:, None]
    return {f"recall@{k}": float(hits[:, :k].any(dim=1).to(torch.float64).mean()) for k in KS}


def train_arm(dim, seed, queries, positives, steps, add=None, extra_rows=0):
    """A fresh rotated retriever trained by a ContinualLearner for `steps` steps on (queries, positives) plus what
    add(learner) buffers (at most extra_rows pairs); returns (retriever, pairs buffered, mean loss of the last 20
    steps)."""
    retriever = make_retriever(dim, seed)
    learner = ContinualLearner(retriever, lr=LR, buffer_size=max(BATCH, queries.shape[0] + extra_rows),
                               batch_size=BATCH, seed=seed)
    learner.observe(queries, positives)
    if add is not None:
        add(learner)
    losses = [learner.step()["loss"] for _ in range(steps)]
    retriever.eval()
    return retriever, len(learner), float(np.mean(losses[-20:]))


def _observing(queries, positives):
    """add(learner) for train_arm: buffer these pairs (nothing when there are none)."""
    def add(learner):
        if queries.shape[0]:
            learner.observe(queries, positives)
    return add


def diagnose(samples, conditions, result, own, x, labeled):
    """What the accepted samples are: their mean cosine to the condition, to their own chunk (row i of samples was
    made from the condition of chunk own[i]) and to the nearest labeled chunk; the shares whose nearest chunk (of all
    x) is their own (the label is right) or a labeled one (a copy); and the first share for their conditions."""
    accepted = result.accepted
    keys = ("cos_condition", "cos_own_chunk", "cos_nearest_labeled", "own_chunk_nearest", "labeled_chunk_nearest",
            "condition_own_chunk_nearest")
    if accepted.numel() == 0:
        return dict.fromkeys(keys)
    unit, chunks, mine = _unit(samples[accepted]), _unit(x), own[accepted]
    nearest = (unit @ chunks.T).argmax(dim=1)
    is_labeled = torch.zeros(x.shape[0], dtype=torch.bool)
    is_labeled[labeled] = True
    condition_nearest = (_unit(conditions[accepted]) @ chunks.T).argmax(dim=1)
    values = (result.similarity[accepted].mean(), (unit * chunks[mine]).sum(dim=1).mean(),
              result.corpus_similarity[accepted].mean(), (nearest == mine).to(torch.float64).mean(),
              is_labeled[nearest].to(torch.float64).mean(), (condition_nearest == mine).to(torch.float64).mean())
    return {key: float(value) for key, value in zip(keys, values)}


def run_seed(spec, data, seed, config):
    """One seed: draw the labeled subset, train and sample the generator, filter, and train every arm."""
    x, c, pool, test = data["x"], data["c"], data["train"], data["test"]
    dim = x.shape[1]
    order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    labeled, extra = torch.sort(order[:spec["labeled"]]).values, torch.sort(order[spec["labeled"]:]).values
    q, p = c[labeled], x[labeled]

    torch.manual_seed(seed)
    model = EmbeddingDiffusion(config)
    started = time.perf_counter()
    history = train_embedding_diffusion(model, p, q, steps=spec["diffusion_steps"], batch_size=spec["diffusion_batch"],
                                        lr=DIFFUSION_LR, progress=sys.stderr.isatty(), seed=seed)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    noise = torch.randn((len(extra), dim), generator=torch.Generator().manual_seed(seed + 1))
    samples = model.sample(c[extra], num_steps=SAMPLING_STEPS, guidance_scale=GUIDANCE, noise=noise)
    sample_s = time.perf_counter() - started
    result = filter_samples(samples, c[extra], p, min_similarity=MIN_SIMILARITY,
                            max_corpus_similarity=MAX_CORPUS_SIMILARITY)
    authentic = filter_samples(samples, c[extra], p, min_similarity=MIN_SIMILARITY,
                               max_corpus_similarity=MAX_CORPUS_SIMILARITY, authentic=True)
    accepted = result.accepted
    n, n_authentic = int(accepted.numel()), int(authentic.accepted.numel())
    handed = {}

    def giving(filtered, key):
        def give(learner):
            handed[key] = hand_over(filtered, samples=samples, conditions=c[extra], learner=learner)
        return give

    jq, jp = jittered(q, p, n, torch.Generator().manual_seed(seed + 2))
    adders = {"real": (None, 0), "real + synthetic": (giving(result, "filter"), n),
              "real + synthetic (copy test)": (giving(authentic, "copy test"), n_authentic),
              "real + jitter": (_observing(jq, jp), n),
              "real + true (acc.)": (_observing(c[extra[accepted]], x[extra[accepted]]), n),
              "real + true (all)": (_observing(c[extra], x[extra]), len(extra))}
    arms = {}
    started = time.perf_counter()
    for arm in ARMS:
        add, rows = adders[arm]
        retriever, pairs, loss = train_arm(dim, seed, q, p, spec["retriever_steps"], add, rows)
        arms[arm] = {**recalls(retriever, c[test], test, x), "pairs": pairs, "final_loss": loss}
    retriever_s = time.perf_counter() - started
    synthetic = {"seed": seed, "labeled": len(labeled), "unlabeled_conditions": len(extra), "accepted": n,
                 "observed": handed["filter"]["observed"], "dropped": handed["filter"]["dropped"],
                 "accepted_copy_test": n_authentic, "observed_copy_test": handed["copy test"]["observed"],
                 "copy_bound_mean": float(authentic.copy_bound.mean()),
                 **diagnose(samples, c[extra], result, extra, x, labeled),
                 "mean_norm": float(samples.norm(dim=1).mean()),
                 "diffusion_final_loss": float(np.mean(history[-100:])), "diffusion_seconds": train_s,
                 "sample_seconds": sample_s, "retriever_seconds": retriever_s}
    return arms, synthetic


def summarise(per_seed):
    """Rows of the table: per arm, the seeds' values, mean and sample standard deviation of each recall, and the
    paired difference to the real arm."""
    rows = []
    for arm in ARMS:
        row = {"method": arm, "pairs": [s[arm]["pairs"] for s in per_seed],
               "final_loss": [s[arm]["final_loss"] for s in per_seed]}
        for k in KS:
            key = f"recall@{k}"
            values = np.array([s[arm][key] for s in per_seed])
            delta = values - np.array([s["real"][key] for s in per_seed])
            row[key] = {"seeds": values.tolist(), "mean": float(values.mean()), "std": _std(values),
                        "delta_vs_real": {"mean": float(delta.mean()), "std": _std(delta)}}
        rows.append(row)
    return rows


def _std(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def run(size, out, threads=2, seed=0):
    torch.set_num_threads(threads)
    spec = SIZES[size]
    wall = time.perf_counter()
    encoder = DenseEncoder(device="cpu", show_progress=sys.stderr.isatty())
    data = load_data(spec, encoder, seed)
    x, c, pool, test = data["x"], data["c"], data["train"], data["test"]
    if not BATCH <= spec["labeled"] < len(pool):
        raise ValueError(f"labeled ({spec['labeled']}) must be at least the batch ({BATCH}) and smaller than the pool "
                         f"({len(pool)} chunks)")
    dim = x.shape[1]
    config = DiffusionConfig(dim=dim, condition_dim=c.shape[1], hidden_dim=spec["hidden_dim"],
                             num_layers=spec["num_layers"], prediction=PREDICTION, condition_dropout=0.1,
                             sampling_steps=SAMPLING_STEPS)
    references = [{"method": "MiniLM (no training)", **recalls(NeuralRetriever(dim), c[test], test, x)},
                  {"method": "rotated tower (untrained)", **recalls(make_retriever(dim, seed), c[test], test, x)}]
    log(f"[{SUITE}] {spec['seeds']} seeds: {spec['labeled']} labeled of {len(pool)} pool chunks, {len(test)} test "
        f"queries over {len(x)} chunks; diffusion {spec['diffusion_steps']} steps, retriever "
        f"{spec['retriever_steps']} steps x {len(ARMS)} arms per seed ...")
    per_seed, synthetic = [], []
    for s in progress(range(seed, seed + spec["seeds"]), f"{SUITE} seeds", unit="seed"):
        started = time.perf_counter()
        arms, diagnostics = run_seed(spec, data, s, config)
        per_seed.append(arms)
        synthetic.append(diagnostics)
        log(f"[{SUITE}] seed {s}: accepted {diagnostics['accepted']}/{diagnostics['unlabeled_conditions']}, recall@1 "
            + ", ".join(f"{arm} {arms[arm]['recall@1']:.3f}" for arm in ARMS)
            + f" ({time.perf_counter() - started:.0f} s)")
    result = {
        "suite": SUITE, "size": size, "seed": seed, "seeds": list(range(seed, seed + spec["seeds"])),
        "threads": threads,
        "data": {"corpus": "pydoc_data.topics", "total_chunks": data["total_chunks"], "chunks": len(x),
                 "pool": len(pool), "labeled": spec["labeled"], "test_queries": len(test), "encoder": encoder.name,
                 "dim": dim,
                 "query": f"MiniLM embedding of the chunk's first sentence (<= {FIRST_SENTENCE_WORDS} words)",
                 "positive": "MiniLM embedding of the chunk", "candidates": "all the run's chunks"},
        "retriever": {"model": "NeuralRetriever features mode, query tower from a random rotation, document tower "
                               "identity", "trainer": "ContinualLearner (AdamW, in-batch negatives)", "lr": LR,
                      "batch_size": BATCH, "temperature": TEMPERATURE, "learn_temperature": False,
                      "steps": spec["retriever_steps"]},
        "generator": {"model": config.to_dict(), "steps": spec["diffusion_steps"],
                      "batch_size": spec["diffusion_batch"], "lr": DIFFUSION_LR, "trained_on": "the labeled pairs",
                      "sampling": {"sampler": "DDIM", "num_steps": SAMPLING_STEPS, "eta": 0.0, "guidance": GUIDANCE,
                                   "per_condition": 1},
                      "filter": {"min_similarity": MIN_SIMILARITY, "max_corpus_similarity": MAX_CORPUS_SIMILARITY,
                                 "corpus": "the labeled chunk embeddings",
                                 "copy test arm": "the same plus authentic=True"},
                      "jitter_norm": JITTER},
        "references": references, "rows": summarise(per_seed), "per_seed": per_seed, "synthetic": synthetic,
        "seconds": {"encode": data["encode_seconds"],
                    "diffusion": sum(d["diffusion_seconds"] for d in synthetic),
                    "retriever": sum(d["retriever_seconds"] for d in synthetic),
                    "total": time.perf_counter() - wall},
        "environment": environment(torch.device("cpu")),
    }
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if size == "quick" else ""
    write_json(out / f"results{suffix}.json", result)
    result["png"] = str(plot(result, out / f"{SUITE}{suffix}.png"))
    return result


def _mean_std(row, key):
    return f"{row[key]['mean']:.3f} +- {row[key]['std']:.3f}"


def _delta(row, key):
    delta = row[key]["delta_vs_real"]
    return "-" if row["method"] == "real" else f"{round(delta['mean'], 3) + 0.0:+.3f} +- {delta['std']:.3f}"


COLUMNS = [("method", lambda r: r["method"]), ("pairs", lambda r: f"{np.mean(r['pairs']):.0f}"),
           ("recall@1", lambda r: _mean_std(r, "recall@1")), ("d r@1 vs real", lambda r: _delta(r, "recall@1")),
           ("recall@10", lambda r: _mean_std(r, "recall@10")), ("d r@10 vs real", lambda r: _delta(r, "recall@10"))]
REFERENCE_COLUMNS = [("reference (no training)", lambda r: r["method"]),
                     ("recall@1", lambda r: f"{r['recall@1']:.3f}"), ("recall@10", lambda r: f"{r['recall@10']:.3f}")]


def _fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


SYNTHETIC_COLUMNS = [("seed", lambda r: str(r["seed"])),
                     ("accepted", lambda r: f"{r['accepted']}/{r['unlabeled_conditions']}"),
                     ("copy test", lambda r: str(r["accepted_copy_test"])),
                     ("copy bound", lambda r: _fmt(r["copy_bound_mean"])),
                     ("cos cond", lambda r: _fmt(r["cos_condition"])), ("cos own", lambda r: _fmt(r["cos_own_chunk"])),
                     ("cos nn labeled", lambda r: _fmt(r["cos_nearest_labeled"])),
                     ("nearest = own", lambda r: _fmt(r["own_chunk_nearest"])),
                     ("nearest labeled", lambda r: _fmt(r["labeled_chunk_nearest"])),
                     ("cond: nearest = own", lambda r: _fmt(r["condition_own_chunk_nearest"])),
                     ("diffusion s", lambda r: f"{r['diffusion_seconds']:.0f}")]


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["method"] for r in rows]
    positions = np.arange(len(rows))
    colors = ["gray", "tab:blue", "tab:purple", "tab:olive", "tab:green", "darkgreen"]
    references = {r["method"]: r for r in result["references"]}
    fig, axes = plt.subplots(1, len(KS), figsize=(5.2 * len(KS), 4.3))
    for axis, k in zip(np.atleast_1d(axes), KS):
        key = f"recall@{k}"
        means = [r[key]["mean"] for r in rows]
        axis.bar(positions, means, yerr=[r[key]["std"] for r in rows], color=colors[:len(rows)], capsize=4,
                 alpha=0.85)
        for p, r in zip(positions, rows):
            seeds = r[key]["seeds"]
            axis.scatter(np.full(len(seeds), p) + np.linspace(-0.15, 0.15, len(seeds)), seeds, s=10, color="black",
                         zorder=3)
            axis.annotate(f"{r[key]['mean']:.3f}", (p, r[key]["mean"] + r[key]["std"]), ha="center", va="bottom",
                          fontsize=7, xytext=(0, 2), textcoords="offset points")
        for (name, reference), style in zip(references.items(), ("--", ":")):
            values = ", ".join(f"recall@{j} {reference[f'recall@{j}']:.3f}" for j in KS)
            axis.axhline(reference[key], color="firebrick", linestyle=style, linewidth=1, label=f"{name}: {values}")
        axis.set_xticks(positions, names, rotation=25, ha="right", fontsize=8)
        axis.set_ylim(0, 1.05)
        axis.set_title(f"held-out {key} (mean +- std over {len(result['seeds'])} seeds; dots: seeds)", fontsize=9)
        axis.grid(True, axis="y", alpha=0.3)
    data = result["data"]
    accepted = np.mean([s["accepted"] for s in result["synthetic"]])
    fig.suptitle(f"Augmenting {data['labeled']} labeled pairs: {data['test_queries']} held-out queries over "
                 f"{data['chunks']} pydoc chunks ({result['size']}, {accepted:.0f} synthetic pairs accepted on "
                 f"average)\n{result['environment']['device']}, {result['retriever']['steps']} retriever steps per "
                 "arm", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    figure_legend(fig, np.atleast_1d(axes))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.augmentation", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="400 chunks, 3 seeds, shorter training (full: 821 chunks, 5 seeds)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="split and subset seed; the seeds run are SEED, SEED+1, ... (default 0)")
    add_output_options(parser, SUITE, record_needs='full size, a clean checkout')
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    out = args.out or RUNS_ROOT / device_slug(torch.device("cpu")) / SUITE
    check_output_options(parser, out, record=args.record, quick=args.quick)
    result = run("quick" if args.quick else "full", out, threads=args.threads, seed=args.seed)
    data = result["data"]
    print(format_table(f"{SUITE} ({result['size']}): {data['labeled']} labeled pairs, {data['test_queries']} held-out "
                       f"queries over {data['chunks']} chunks, {result['retriever']['steps']} retriever steps per arm; "
                       f"mean +- std over seeds {result['seeds']}; d = paired difference to real",
                       result["rows"], COLUMNS))
    print()
    print(format_table("references", result["references"], REFERENCE_COLUMNS))
    print()
    print(format_table(f"synthetic pairs per seed: accepted = filter_samples(cos cond >= {MIN_SIMILARITY}, cos to a "
                       f"labeled chunk <= {MAX_CORPUS_SIMILARITY}); copy test = those of them that also pass "
                       "authentic=True (copy bound: its mean); cosines of the accepted samples; nearest = the "
                       "share whose nearest chunk (of all) is their own / a labeled one; cond = the same for their "
                       "conditions", result["synthetic"], SYNTHETIC_COLUMNS))
    seconds = result["seconds"]
    print(f"encode {seconds['encode']:.0f} s, diffusion {seconds['diffusion']:.0f} s, retrievers "
          f"{seconds['retriever']:.0f} s, total {seconds['total']:.0f} s ({result['threads']} thread(s), load "
          f"{result['environment']['load_avg_1m']:.1f}); wrote {out}")
    if args.record:
        record_result(SUITE, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
