"""The real SmolLM2-135M-Instruct with attn_implementation "hybridrag" against "sdpa" and "eager" on the same prompts:
prefill seconds and decode tokens/s of greedy decoding; target: hybridrag decodes at least as fast as sdpa (decode
tokens/s of hybridrag >= sdpa's at every prompt size). Quick: a 1k-token prompt; full: 1k and 4k.

Prompts: Python's bundled docs (`pydoc_data.topics`, topics in name order) tokenized and cut to the size. Each
implementation is loaded once (hybridrag.system.model.load_language_model, float32) and generates NEW_TOKENS greedy
tokens with hybridrag.system.generation.stream_generate (a fresh KV cache each time, eos ignored), so every
implementation runs the same prompt through the same loop. One warm-up generation each on a short prompt, then
REPEATS rounds (quick 1, full 3) of one generation per implementation, the order reversed every other round;
medians reported.
Prefill: the forward over the prompt. Decode tokens/s: the tokens after the first over their forwards and
sampling (GenerationStats.tokens_per_second). Matching tokens: how many of the NEW_TOKENS greedy tokens equal
sdpa's at the same position (the attention is the only difference, so all of them should).

    python -m benchmarks.model_decode            # this suite alone: benchmarks.report --suite model_decode
    python -m benchmarks.model_decode --full
"""
import statistics
import sys

import torch

from .common import CHECK_COLUMNS, LoadMeter, compared_to, target_text  # noqa: F401 (CHECK_COLUMNS: report reads it)

SUITE = "model_decode"
EXPECTED_S = {"quick": 20, "full": 420}  # on the 2-core AMD EPYC (eager's 4k prefill dominates the full run)
IMPLEMENTATIONS = ("hybridrag", "sdpa", "eager")
BASELINE = "sdpa"
PROMPT_TOKENS = {"quick": (1024,), "full": (1024, 4096)}
REPEATS = {"quick": 1, "full": 3}
NEW_TOKENS = 32
WARMUP_TOKENS = 32  # the warm-up prompt's length
CHECK_PROMPT_TOKENS, CHECK_NEW_TOKENS = 64, 4


def load(implementation, device):
    from hybridrag.system.model import load_language_model
    return load_language_model(attn_implementation=implementation, device=device)


def prompt_ids(tokenizer, tokens, device):
    """(1, tokens) ids of the docs' text, cut to `tokens`."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text[:tokens * 6], add_special_tokens=False, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"the docs give only {ids.shape[1]} tokens, fewer than the {tokens} asked for")
    return ids.to(device)


def generate(model, ids, new_tokens=NEW_TOKENS):
    """(GenerationStats, greedy token ids) of one generation from a fresh cache, eos ignored."""
    from hybridrag.system.generation import GenerationStats, stream_generate

    stats = GenerationStats()
    tokens = [token.id for token in stream_generate(model, ids, max_new_tokens=new_tokens, eos_token_ids=(),
                                                    stats=stats)]
    return stats, tokens


def run_size(models, ids, repeats):
    """The rows of one prompt size: one per implementation, timed in turn."""
    runs = {name: [] for name in models}
    meter = LoadMeter().start()
    for round_index in range(repeats):
        order = list(models) if round_index % 2 == 0 else list(models)[::-1]
        for name in order:
            runs[name].append(generate(models[name], ids))
    load = meter.stop()
    tokens = {name: runs[name][-1][1] for name in models}
    rows = []
    for name in models:
        prefill = [stats.prefill_s for stats, _ in runs[name]]
        decode = [stats.tokens_per_second for stats, _ in runs[name]]
        rows.append({"prompt_tokens": ids.shape[1], "attn_implementation": name, "new_tokens": NEW_TOKENS,
                     "prefill_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
                     "prefill_runs_s": prefill, "decode_runs_tokens_per_s": decode,
                     "matching_tokens": sum(a == b for a, b in zip(tokens[name], tokens[BASELINE])),
                     "tokens": tokens[name], "other_load": load})
    base = next(row for row in rows if row["attn_implementation"] == BASELINE)
    for row in rows:
        row["prefill_ratio"] = row["prefill_s"] / base["prefill_s"]
        row["decode_ratio"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        if row is not base:
            compared_to(row, base)
        row["target"] = _target(row)
    return rows


def _target(row):
    if row["attn_implementation"] != "hybridrag":
        return None
    return {"ratio": "hybridrag / sdpa decode tokens/s", "value": row["decode_ratio"], "limit": 1.0,
            "met": bool(row["decode_ratio"] >= 1.0)}


def bench_dtype(device):
    return torch.float32


def check(device):
    """What the timings rest on: every implementation gives sdpa's greedy tokens on a short prompt, and hybridrag's
    logits are the same whether the plain causal fast path runs or every call takes the tiled kernels' path."""
    import hybridrag.ops.hybrid as hybrid_ops

    models = {name: load(name, device).model for name in IMPLEMENTATIONS}
    ids = prompt_ids(load(BASELINE, device).tokenizer, CHECK_PROMPT_TOKENS, device)
    tokens = {name: generate(model, ids, CHECK_NEW_TOKENS)[1] for name, model in models.items()}
    rows = [{"check": f"{name} greedy tokens = sdpa's", "value": f"{sum(a == b for a, b in zip(t, tokens[BASELINE]))}"
             f" / {CHECK_NEW_TOKENS}", "passed": t == tokens[BASELINE]} for name, t in tokens.items()
            if name != BASELINE]
    with torch.no_grad():
        fast = models["hybridrag"](ids).logits
        saved, hybrid_ops.PLAIN_CAUSAL_FAST_PATH = hybrid_ops.PLAIN_CAUSAL_FAST_PATH, False
        try:
            tiled = models["hybridrag"](ids).logits
        finally:
            hybrid_ops.PLAIN_CAUSAL_FAST_PATH = saved
    error = (fast - tiled).abs().max().item()
    rows.append({"check": "hybridrag logits: fast path = tiled path", "value": f"max abs diff {error:.1e}",
                 "passed": error <= 1e-4 * max(tiled.abs().max().item(), 1.0)})
    return rows


def benchmark(device, quick=False, ceilings=None, log=print):
    mode = "quick" if quick else "full"
    models = {name: load(name, device).model for name in IMPLEMENTATIONS}
    tokenizer = load(BASELINE, device).tokenizer
    warmup = prompt_ids(tokenizer, WARMUP_TOKENS, device)
    for model in models.values():
        generate(model, warmup, 4)
    rows = []
    for tokens in PROMPT_TOKENS[mode]:
        log(f"[{SUITE}] {tokens}-token prompt, {NEW_TOKENS} new tokens, {', '.join(models)} in turn ...")
        rows += run_size(models, prompt_ids(tokenizer, tokens, device), REPEATS[mode])
    return rows


def plot(rows, ceilings, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import note_flagged, plot_bars

    sizes = sorted({r["prompt_tokens"] for r in rows})
    names = [n for n in IMPLEMENTATIONS if any(r["attn_implementation"] == n for r in rows)]
    colors = {"hybridrag": "tab:blue", "sdpa": "tab:orange", "eager": "tab:gray"}
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.8 / max(len(names), 1)
    for axis, key, label in ((axes[0], "prefill_s", "prefill, s (lower is better)"),
                             (axes[1], "decode_tokens_per_s", "decode, tokens/s (higher is better)")):
        for i, name in enumerate(names):
            picked = [next((r for r in rows if r["prompt_tokens"] == s and r["attn_implementation"] == name), None)
                      for s in sizes]
            xs = [j + (i - (len(names) - 1) / 2) * width for j, r in enumerate(picked) if r is not None]
            kept = [r for r in picked if r is not None]
            plot_bars(axis, xs, [r[key] for r in kept], [bool(r.get("flagged")) for r in kept], width=width,
                      color=colors.get(name), label=name)
        axis.set_xticks(range(len(sizes)), [f"{s:,}" for s in sizes])
        axis.set_xlabel("prompt tokens")
        axis.set_ylabel(label)
        axis.grid(True, axis="y", alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(f"SmolLM2-135M, {NEW_TOKENS} greedy tokens, float32 ({env['device']})", fontsize=10)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    note_flagged(figure, rows)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


BENCH_COLUMNS = [("prompt tokens", lambda r: f"{r['prompt_tokens']:,}"),
                 ("attention", lambda r: r["attn_implementation"]),
                 ("prefill s", lambda r: f"{r['prefill_s']:.3f}"),
                 ("prefill / sdpa", lambda r: f"{r['prefill_ratio']:.3f}"),
                 ("decode tokens/s", lambda r: f"{r['decode_tokens_per_s']:.2f}"),
                 ("decode / sdpa", lambda r: f"{r['decode_ratio']:.3f}"),
                 ("tokens = sdpa's", lambda r: f"{r['matching_tokens']}/{r['new_tokens']}"),
                 ("target", lambda r: target_text(r["target"], ">="))]


if __name__ == "__main__":
    from .report import main

    raise SystemExit(main(["--suite", SUITE, *sys.argv[1:]]))
