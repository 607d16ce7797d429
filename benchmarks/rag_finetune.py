"""Does rag-finetune raise held-out accuracy with retrieval? SmolLM2-135M-Instruct with LoRA on the pydoc questions
(benchmarks/data/pydoc_qa.jsonl), split into train and test by topic (no topic in both).

Corpus: every topic of Python's bundled `pydoc_data.topics`, in a KnowledgeBase of 200-token passages (the minilm
or hashing encoder, as benchmarks.system_accuracy). Training examples: the question, its top_k retrieved passages
with the gold topic's best passage put in when retrieval missed it, and the first gold as the answer (loss on it
only). Test: the plain top_k retrieval, greedy answers of the base model and of the fine-tuned one, scored by
contains_gold and token F1 (hybridrag.system.evaluation), with the retrieval hit rate (a passage of the gold topic).

    python -m benchmarks.rag_finetune --quick          # ~2-3 min on 2 cores: a few questions, hashing encoder
    python -m benchmarks.rag_finetune                  # ~15-20 min on 2 cores: every question
Writes results.json and rag_finetune.png to --out (default benchmarks/runs/<device>/rag_finetune, git-ignored);
--record (full size, a clean checkout) also copies them to benchmarks/results/<device>/rag_finetune.json/.png.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from hybridrag.system.evaluation import score_answer, summarize
from hybridrag.train.finetune import FinetuneConfig, build_knowledge_base, rag_finetune
from hybridrag.train.finetune_data import DEFAULT_SYSTEM, rag_prompt_ids
from hybridrag.train.finetune_model import load_base_model, load_finetuned
from hybridrag.train.formatting import as_passages
from hybridrag.train.rag_generate import generate_ids

from .common import (RESULTS_ROOT, RUNS_ROOT, check_output_options, device_slug, environment, format_seconds, log,
                     record_run, write_json)

SUITE = "rag_finetune"
QUESTIONS = Path(__file__).resolve().parent / "data" / "pydoc_qa.jsonl"
SIZES = {"quick": {"train": 16, "test": 10, "steps": 20, "batch": 2, "lr": 3e-3, "encoder": "hashing-256"},
         "full": {"train": None, "test": None, "steps": 72, "batch": 4, "lr": 2e-3, "encoder": "minilm"}}
# Seconds on a busy 2-core machine with one thread (measured in a quick run): one training example (~300 tokens,
# adapters on the last 8 layers), one greedy answer, and the loads and knowledge base.
COST_TRAIN_S, COST_ANSWER_S, COST_SETUP_S = 1.8, 2.2, 90.0


def split_by_topic(questions, test_share=0.3, seed=0):
    """(train, test): whole topics, shuffled with `seed`, go to test until it holds test_share of the questions."""
    topics = sorted({q["topic"] for q in questions})
    random.Random(seed).shuffle(topics)
    test_topics, count = set(), 0
    for topic in topics:
        if count >= test_share * len(questions):
            break
        test_topics.add(topic)
        count += sum(q["topic"] == topic for q in questions)
    return ([q for q in questions if q["topic"] not in test_topics], [q for q in questions if q["topic"] in test_topics])


def _topic(hit):
    return hit.document.metadata.get("source_id", hit.document.id)


def passages_for(knowledge_base, question, top_k, gold_topic=None):
    """(passages, hit): the top_k for the question; with gold_topic, the best passage of that topic replaces the
    last one when none of the top_k is from it."""
    hits = knowledge_base.search(question["question"], k=top_k)
    hit = any(_topic(h) == question["topic"] for h in hits)
    if gold_topic is not None and not hit:
        gold = [h for h in knowledge_base.search(question["question"], k=len(knowledge_base), mode="bm25")
                if _topic(h) == gold_topic]
        if gold:
            hits = hits[:top_k - 1] + gold[:1]
    return as_passages(hits), hit


def answer_all(lm, items, max_new_tokens, max_chars):
    rows = []
    for question, passages in items:
        ids = rag_prompt_ids(question["question"], passages, lm.tokenizer, system=DEFAULT_SYSTEM,
                             max_passage_chars=max_chars)
        _, text = generate_ids(lm.model, lm.tokenizer, ids, max_new_tokens=max_new_tokens)
        rows.append({"id": question["id"], "answer": text, **score_answer(text, question["answers"])})
    return rows


def plot(path, before, after, losses, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (bars, curve) = plt.subplots(1, 2, figsize=(10, 4))
    metrics = ["contains_gold", "token_f1"]
    for offset, (name, summary) in enumerate((("base", before), ("fine-tuned", after))):
        bars.bar([i + 0.4 * offset for i in range(len(metrics))], [summary[m] for m in metrics], width=0.4,
                 label=name)
    bars.set_xticks([i + 0.2 for i in range(len(metrics))], metrics)
    bars.set_ylim(0, 1)
    bars.set_title("held-out accuracy with retrieval")
    bars.legend()
    curve.plot([row["step"] for row in losses], [row["loss"] for row in losses], marker="o")
    curve.set_xlabel("step")
    curve.set_ylabel("training loss (answer tokens)")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rag_finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few questions and steps, hashing encoder")
    parser.add_argument("--top-k", type=int, default=2, help="passages per question (default %(default)s)")
    parser.add_argument("--max-passage-chars", type=int, default=400, help="(default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="(default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RUNS_ROOT / device_slug(torch.device("cpu")) / SUITE,
                        help="folder for results.json, the plot and the run (default %(default)s)")
    parser.add_argument("--record", action="store_true",
                        help=f"also write {RESULTS_ROOT.name}/<device>/{SUITE}.json and .png (full size, a clean "
                             "checkout)")
    args = parser.parse_args(argv)
    check_output_options(parser, args.out, record=args.record, quick=args.quick)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    questions = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, test = split_by_topic(questions)
    train, test = train[:size["train"]], test[:size["test"]]
    examples = size["steps"] * size["batch"]
    expected = COST_SETUP_S + examples * COST_TRAIN_S + 2 * len(test) * COST_ANSWER_S
    log(f"{SUITE}: {len(train)} train / {len(test)} test questions ({len({q['topic'] for q in train})} / "
        f"{len({q['topic'] for q in test})} topics), {size['steps']} steps x batch {size['batch']}; expected "
        f"~{format_seconds(expected)} on 2 idle-ish cores")
    start = time.perf_counter()
    import pydoc_data.topics

    from hybridrag.retrieval import Document
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(Document(t, text, t).to_json()) + "\n"
                              for t, text in sorted(pydoc_data.topics.topics.items())), encoding="utf-8")
    knowledge_base = build_knowledge_base([corpus], size["encoder"])
    data = args.out / "train.jsonl"
    with data.open("w", encoding="utf-8") as out:
        for q in train:
            passages, _ = passages_for(knowledge_base, q, args.top_k, gold_topic=q["topic"])
            out.write(json.dumps({"id": q["id"], "question": q["question"], "answers": q["answers"],
                                  "documents": passages, "topic": q["topic"]}) + "\n")
    test_items = [passages_for(knowledge_base, q, args.top_k) for q in test]
    hit_rate = sum(hit for _, hit in test_items) / len(test)
    items = [(q, passages) for q, (passages, _) in zip(test, test_items)]
    base = load_base_model(None)
    layers = base.model.config.num_hidden_layers
    log("answering the test questions with the base model")
    before = answer_all(base, items, args.max_new_tokens, args.max_passage_chars)
    del base
    run_dir = args.out / "run"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    config = FinetuneConfig(str(data), str(run_dir), steps=size["steps"], batch_size=size["batch"],
                            learning_rate=size["lr"], warmup_steps=2, rank=8, alpha=16.0,
                            lora_layers=tuple(range(layers - 8, layers)), max_passage_chars=args.max_passage_chars,
                            threads=args.threads)
    train_start = time.perf_counter()
    summary = rag_finetune(config)
    train_s = time.perf_counter() - train_start
    tuned = load_finetuned(run_dir, attn_implementation="sdpa")
    log("answering the test questions with the fine-tuned model")
    after = answer_all(tuned, items, args.max_new_tokens, args.max_passage_chars)
    wall_s = time.perf_counter() - start
    sb, sa = summarize(before), summarize(after)
    losses = [row for row in summary["history"] if "loss" in row]
    env = environment(torch.device("cpu"))
    payload = {"suite": SUITE, "size": "quick" if args.quick else "full", "env": env, "duration_s": wall_s,
               "train_s": train_s, "split": {"train": len(train), "test": len(test),
                                             "train_topics": sorted({q["topic"] for q in train}),
                                             "test_topics": sorted({q["topic"] for q in test})},
               "config": config.to_dict(), "encoder": size["encoder"], "test_retrieval_hit_rate": hit_rate,
               "before": sb, "after": sa, "losses": losses,
               "answers": [{"id": b["id"], "before": b["answer"], "after": a["answer"]} for b, a in zip(before, after)]}
    json_path = write_json(args.out / "results.json", payload)
    png_path = args.out / f"{SUITE}.png"
    title = (f"{SUITE} ({payload['size']}): {len(train)} train / {len(test)} test questions, disjoint topics, "
             f"{size['encoder']}, top_k {args.top_k}, {format_seconds(wall_s)}, commit {env['git_commit']}")
    plot(png_path, sb, sa, losses, title)
    print(title)
    print(f"test retrieval hit rate {hit_rate:.3f}; training {format_seconds(train_s)}, loss "
          f"{losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}")
    print(f"{'':12}{'contains_gold':>15}{'token_f1':>10}{'exact':>8}")
    for name, s in (("base", sb), ("fine-tuned", sa)):
        print(f"{name:12}{s['contains_gold']:>15.3f}{s['token_f1']:>10.3f}{s['exact_match']:>8.3f}")
    print(f"wrote {json_path}\nwrote {png_path}")
    if args.record:
        for path in record_run(SUITE, payload, png_path):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
