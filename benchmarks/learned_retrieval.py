"""Learned retrieval: a retriever that starts at chance learns to find the right passage from the answer's loss alone.

Task: N synthetic facts, passage i = [CODE, E_i, V_c(i)] ("the code of entity i is value c(i)"), and two questions
per entity, [WHAT, CODE, E_i] and [CODE, ASK, E_i], whose answer is V_c(i). The codes c are a random bijection that
is redrawn at every step (the knowledge base is rewritten and re-indexed), so the LM cannot memorise answers: the
only way to answer is to read the right passage. A NeuralRetriever in tokens mode (separate query and document
towers, random embeddings: recall@1 = 1/N at the start) takes the top k/2 passages from the index (re-encoded with
the current document tower every step) plus k/2 drawn at random from the rest (exploration); a TinyCausalLM (on
hybridrag.nn's SlidingWindowAttention) reads [passage, question] and predicts the value. The only loss is the
marginal likelihood -log sum_k p(passage_k | question) p(answer | question, passage_k) (hybridrag.train.MarginalRAG),
trained by HybridRAGTrainer. No retrieval label is used anywhere in training.

Reported every eval: recall@1 (the current towers' best passage over all N is the fact's passage), answer accuracy
(the LM's greedy answer from that top-1 passage is the value) and, as a reference, answer accuracy from the gold
passage; JSON and a PNG under --out.

    python -m benchmarks.learned_retrieval [--quick] [--out DIR] [--record]
    # one thread; --quick: 24 facts, 1500 steps (~1.5 min); full: 32 facts, 4000 steps (~6 min on a 2-core EPYC)
"""
import argparse
import json
import random
import sys
import tempfile
import time

import torch

from hybridrag.retrieval import NeuralRetriever
from torch.utils.data import Dataset

from hybridrag.train import HybridRAGTrainer, MarginalRAG, RAGCollator, TinyCausalLM, TrainingConfig

from .common import RUNS_ROOT, add_output_options, check_output_options, device_slug, environment, record_run

SUITE = "learned_retrieval"

PAD, WHAT, CODE, IS, ASK = 0, 1, 2, 3, 4
SIZES = {"quick": {"facts": 24, "steps": 1500, "eval_every": 100, "k": 8},
         "full": {"facts": 32, "steps": 4000, "eval_every": 200, "k": 8}}


class Facts:
    """N facts "code E_i is V_c(i)" whose codes c are redrawn (a new random bijection) at every redraw(): a knowledge
    base that changes faster than the LM could memorise it, so the answer is only ever in the retrieved passage."""

    def __init__(self, facts, seed):
        self.facts, self.rng = facts, random.Random(seed)
        self.vocab = 5 + 2 * facts
        self.redraw()

    def redraw(self):
        self.codes = list(range(self.facts))
        self.rng.shuffle(self.codes)

    def entity(self, i):
        return 5 + i

    def value(self, i):
        return 5 + self.facts + self.codes[i]

    def passages(self):
        return [[CODE, self.entity(i), self.value(i)] for i in range(self.facts)]


class Questions(Dataset):
    """Two questions per entity, [WHAT, CODE, E_i] and [CODE, ASK, E_i]; the answer is the fact's current value."""

    def __init__(self, facts):
        self.facts = facts
        self.gold = [i for i in range(facts.facts) for _ in range(2)]

    def __len__(self):
        return len(self.gold)

    def __getitem__(self, index):
        i = self.gold[index]
        query = [WHAT, CODE, self.facts.entity(i)] if index % 2 == 0 else [CODE, ASK, self.facts.entity(i)]
        return {"query_ids": query, "context_ids": [], "answer_ids": [self.facts.value(i)], "retrieved_docs": [],
                "task_type": "qa"}


class ChangingKnowledgeRAG(MarginalRAG):
    """MarginalRAG whose knowledge base is rewritten with the facts' new values at every passage refresh."""

    def __init__(self, retriever, generator, facts, **kwargs):
        super().__init__(retriever, generator, facts.passages(), **kwargs)
        self.facts = facts

    def refresh_passages(self):
        self.facts.redraw()
        self.index.passages.copy_(torch.tensor(self.facts.passages()))
        super().refresh_passages()


def compute_metrics(model, dataset):
        gold = torch.tensor(dataset.gold)
        queries = torch.tensor([item["query_ids"] for item in dataset])
        answers = torch.tensor([item["answer_ids"][0] for item in dataset])
        top1 = model.passage_scores(queries).argmax(dim=1)
        ids = torch.cat([model.index.passages[top1], queries], dim=1)  # passages and questions have no padding
        predicted = model.generator(input_ids=ids)["logits"][:, -1].argmax(dim=-1)
        oracle = model.generator(input_ids=torch.cat([model.index.passages[gold], queries], dim=1))["logits"]
        return {"recall@1": float((top1 == gold).float().mean()),
                "answer_accuracy": float((predicted == answers).float().mean()),
                "oracle_answer_accuracy": float((oracle[:, -1].argmax(-1) == answers).float().mean())}


def run(size, out, seed=0):
    torch.set_num_threads(1)
    spec = SIZES[size]
    facts = Facts(spec["facts"], seed)
    torch.manual_seed(seed)
    retriever = NeuralRetriever(vocab_size=facts.vocab, embedding_dim=32, padding_idx=PAD, temperature=1.0)
    generator = TinyCausalLM(facts.vocab, dim=64, layers=2, heads=4, max_len=8)
    model = ChangingKnowledgeRAG(retriever, generator, facts, k=spec["k"], random_candidates=spec["k"] // 2, pad_id=PAD)
    dataset = Questions(facts)
    with tempfile.TemporaryDirectory() as work:
        config = TrainingConfig(learning_rate=3e-3, batch_size=32, epochs=None, max_steps=spec["steps"],
                                warmup_steps=20, schedule="constant", max_grad_norm=1.0, weight_decay=0.0,
                                loss_normalization="examples", eval_every=spec["eval_every"],
                                log_every=spec["eval_every"], output_dir=work, seed=seed, progress_bar=True,
                                passage_refresh_every=1)
        trainer = HybridRAGTrainer(config, model, dataset, eval_dataset=dataset, collate_fn=RAGCollator(
            PAD, layout="parts"), compute_metrics=compute_metrics)
        start_metrics = {"step": 0, **trainer.evaluate()}
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    evals = [start_metrics] + [h for h in trainer.history if "recall@1" in h]
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.history if "loss" in h]
    final = evals[-1]
    result = {
        "suite": SUITE, "size": size, "facts": spec["facts"], "questions": len(dataset), "k": spec["k"],
        "chance_recall@1": 1 / spec["facts"], "steps": spec["steps"], "train_seconds": seconds,
        "evals": evals, "losses": losses,
        "final": {key: final[key] for key in ("recall@1", "answer_accuracy", "oracle_answer_accuracy")},
        "target": {"recall@1": 0.9, "met": final["recall@1"] >= 0.9},
        "environment": environment(torch.device("cpu")),
    }
    out.mkdir(parents=True, exist_ok=True)
    name = SUITE + ("-quick" if size == "quick" else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{name}.png")
    return result


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in result["evals"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [e["recall@1"] for e in result["evals"]], "o-", label="recall@1 (retriever)")
    ax.plot(steps, [e["answer_accuracy"] for e in result["evals"]], "s-", label="answer accuracy (top-1 passage)")
    ax.plot(steps, [e["oracle_answer_accuracy"] for e in result["evals"]], ":", label="answer accuracy (gold passage)")
    ax.axhline(result["chance_recall@1"], color="gray", linestyle="--", label=f"chance (1/{result['facts']})")
    ax.axhline(0.9, color="red", linestyle=":", linewidth=0.8, label="target 0.9")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Retrieval learned from the LM loss only ({result['facts']} facts, k={result['k']})")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learned_retrieval", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 facts, 1500 steps (full: 32 facts, 4000 steps)")
    add_output_options(parser, SUITE, default_text='benchmarks/runs/<device>/', record_needs='full size, a clean checkout')
    args = parser.parse_args(argv)
    out = args.out or RUNS_ROOT / device_slug(torch.device("cpu"))
    check_output_options(parser, out, record=args.record, quick=args.quick)
    result = run("quick" if args.quick else "full", out)
    for e in result["evals"]:
        print(f"step {e['step']:5d}  recall@1 {e['recall@1']:.3f}  answer accuracy {e['answer_accuracy']:.3f}  "
              f"(gold-passage accuracy {e['oracle_answer_accuracy']:.3f}, eval loss {e['eval_loss']:.3f})")
    final = result["final"]
    print(f"{result['facts']} facts, chance recall@1 {result['chance_recall@1']:.3f}; after {result['steps']} steps "
          f"({result['train_seconds']:.0f} s): recall@1 {final['recall@1']:.3f}, answer accuracy "
          f"{final['answer_accuracy']:.3f}; target recall@1 >= 0.9 {'met' if result['target']['met'] else 'NOT met'}")
    print(f"wrote {out}")
    if args.record:
        for path in record_run(SUITE, result, out / f"{SUITE}.png"):
            print(f"wrote {path}")
    return 0 if result["target"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
