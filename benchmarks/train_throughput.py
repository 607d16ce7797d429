"""Training throughput of the real SmolLM2-135M-Instruct with attn_implementation "hybridrag" (the project's kernels
through the transformers integration) against "sdpa" and "eager" in the same model: tokens/s of one training step
(forward with labels and backward) on one sequence of T tokens, float32. Default T = 512 and 2048; --quick: 256.

Model: hybridrag.system.model.load_language_model(attn_implementation=..., fresh=True), one copy per
implementation, in train mode (this Llama's dropout is 0, so the losses are comparable). --tiny: a random 2-layer
Llama (vocabulary 97, hidden 64, 4 heads, 2 kv heads) with the same weights for every implementation, for the test.
Inputs: Python's bundled docs (`pydoc_data.topics`, topics in name order) tokenized and cut to T (batch 1; --tiny:
the characters' code points mod 97); labels = the input ids (the model shifts them).
One step: grads zeroed (set_to_none), forward with labels (use_cache=False), backward; no optimizer step, so every
step sees the same weights. One warm-up step each, then ROUNDS rounds of one step per implementation, the order
reversed every other round; median seconds per step; tokens/s = T / median. Speedup vs sdpa / eager = their median
step time over this one's. Loss and grad_rel_diff_vs_sdpa (max |g - g_sdpa| / max |g_sdpa| over GRAD_PARAMS, from
each implementation's last step) check that the attention is the only difference: the run fails (exit 1) when a
loss differs from sdpa's by more than LOSS_RTOL relative. CPU: other processes' share of the CPU over each T's
rounds (benchmarks.common.LoadMeter); rows above LOAD_LIMIT are flagged ("flagged" in results.json, "*" in the
table, hatched bars). CUDA: peak allocated memory of a step as well.
On CPU a float32 forward without a gradient takes hybridrag's plain causal fast path (torch's sdpa); a training step
needs the gradient, so hybridrag's own CPU kernels run forward and backward here.

Run time on the 2-core AMD EPYC, 2 threads: the full run 7.2 min on the idle machine (T = 2048's steps dominate:
19-51 s each); --quick 2.4 min with other processes using ~50% of the CPU.

    python -m benchmarks.train_throughput --quick          # T = 256
    python -m benchmarks.train_throughput                  # T = 512 and 2048
    python -m benchmarks.train_throughput --lengths 1024 --threads 2
Writes results.json and train_throughput.png to --out (default benchmarks/runs/<device>/train_throughput,
git-ignored); --record (the real model at a full size, a clean checkout) also copies them to
benchmarks/results/<device>/train_throughput.json/.png, unless a row was timed under load (exit 3).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from .common import (RESULTS_ROOT, RUNS_ROOT, check_output_options, default_device, device_slug, environment,
                     flag_under_load, fmt_number, format_seconds, format_table, load_column, LoadMeter, log, progress,
                     record_run, write_json)

SUITE = "train_throughput"
IMPLEMENTATIONS = ("hybridrag", "sdpa", "eager")
BASELINE, SLOWEST = "sdpa", "eager"
LENGTHS = {"quick": (256,), "full": (512, 2048)}
ROUNDS = 3
LOAD_LIMIT = 0.15   # flag rows timed while other processes used more than this share of the CPU
LOSS_RTOL = 1e-3    # |loss - sdpa's| / |sdpa's| above this fails the run
GRAD_PARAMS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.-1.self_attn.o_proj.weight")
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------

def load_real(device):
    """({implementation: SmolLM2-135M in train mode, float32}, tokenizer): one fresh copy each."""
    from hybridrag.system.model import load_language_model

    models, tokenizer = {}, None
    for name in IMPLEMENTATIONS:
        lm = load_language_model(attn_implementation=name, dtype=torch.float32, device=device, fresh=True)
        models[name], tokenizer = lm.model.train(), lm.tokenizer
    return models, tokenizer


def load_tiny(device, max_positions):
    """{implementation: a random 2-layer Llama in train mode}, every copy with the same weights (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridrag.integrations.transformers import register

    register()
    torch.manual_seed(0)
    config = dict(TINY, max_position_embeddings=max(512, max_positions))
    base = LlamaForCausalLM(LlamaConfig(**config, attn_implementation=BASELINE))
    models = {}
    for name in IMPLEMENTATIONS:
        model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation=name))
        model.load_state_dict(base.state_dict())
        models[name] = model.to(device).train()
    return models


def docs_text():
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def input_ids(tokenizer, tokens, device):
    """(1, tokens) ids of the docs' text: the tokenizer's (as benchmarks.model_decode), or with tokenizer None (the
    tiny model) the characters' code points mod its vocabulary."""
    if tokenizer is not None:
        from .model_decode import prompt_ids
        return prompt_ids(tokenizer, tokens, device)
    text = docs_text()[:tokens]
    return torch.tensor([[ord(c) % TINY["vocab_size"] for c in text]], device=device)


def parameter(model, dotted):
    """The parameter named `dotted`, where a negative index counts from the end ("model.layers.-1.mlp...")."""
    module = model
    for part in dotted.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, ids):
    """One step on ids (1, T): grads set to None, forward with labels = ids, backward. Returns the loss (float)."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item()


def timed_step(model, ids, device):
    """(seconds, loss, peak MiB or None) of one train_step; the peak is CUDA's allocated memory during the step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    loss = train_step(model, ids)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, loss, peak


def grad_rel_diff(model, base):
    """max over GRAD_PARAMS of max |g - g_base| / max |g_base| (the grads left by each model's last step)."""
    diffs = []
    for name in GRAD_PARAMS:
        ours, theirs = parameter(model, name).grad, parameter(base, name).grad
        diffs.append(((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item())
    return max(diffs)


def run_length(models, ids, rounds, device):
    """The rows of one length T = ids.shape[1]: one warm-up step each, then `rounds` rounds of one step per
    implementation in turn, the order reversed every other round."""
    for model in models.values():
        train_step(model, ids)
    runs = {name: [] for name in models}
    meter = LoadMeter().start()
    for round_index in progress(range(rounds), f"T={ids.shape[1]}", unit="round"):
        order = list(models) if round_index % 2 == 0 else list(models)[::-1]
        for name in order:
            runs[name].append(timed_step(models[name], ids, device))
    load = meter.stop() if device.type == "cpu" else None
    tokens = ids.shape[1]
    rows = []
    for name in models:
        seconds = [s for s, _, _ in runs[name]]
        peaks = [p for _, _, p in runs[name] if p is not None]
        step_s = statistics.median(seconds)
        rows.append({"tokens": tokens, "attn_implementation": name, "step_s": step_s, "steps_s": seconds,
                     "tokens_per_s": tokens / step_s, "loss": runs[name][-1][1],
                     "grad_rel_diff_vs_sdpa": grad_rel_diff(models[name], models[BASELINE]),
                     "peak_memory_mib": max(peaks) if peaks else None, "other_load": load})
    by_name = {row["attn_implementation"]: row for row in rows}
    for row in rows:
        row["speedup_vs_sdpa"] = by_name[BASELINE]["step_s"] / row["step_s"]
        row["speedup_vs_eager"] = by_name[SLOWEST]["step_s"] / row["step_s"]
        base_loss = by_name[BASELINE]["loss"]
        row["loss_rel_diff_vs_sdpa"] = abs(row["loss"] - base_loss) / max(abs(base_loss), 1e-30)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------

COLUMNS = [("T", lambda r: f"{r['tokens']:,}"),
           ("attention", lambda r: r["attn_implementation"]),
           ("tokens/s", lambda r: f"{r['tokens_per_s']:.1f}"),
           ("step s", lambda r: f"{r['step_s']:.3f}"),
           ("vs sdpa", lambda r: f"{r['speedup_vs_sdpa']:.3f}x"),
           ("vs eager", lambda r: f"{r['speedup_vs_eager']:.3f}x"),
           ("loss", lambda r: f"{r['loss']:.5f}"),
           ("loss rel diff", lambda r: f"{r['loss_rel_diff_vs_sdpa']:.1e}"),
           ("grad rel diff", lambda r: f"{r['grad_rel_diff_vs_sdpa']:.1e}"),
           ("peak MiB", lambda r: fmt_number(r["peak_memory_mib"], ".0f")),
           ("other load", load_column)]


def short_commit(env):
    """The commit's first 12 digits, "-dirty" kept."""
    commit = env["git_commit"]
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def plot(rows, title, path):
    """Bars of tokens/s per implementation at each T; the hybridrag bars carry their speedup over eager."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import note_flagged, plot_bars

    lengths = sorted({r["tokens"] for r in rows})
    colors = {"hybridrag": "tab:blue", "sdpa": "tab:orange", "eager": "tab:gray"}
    width = 0.8 / len(IMPLEMENTATIONS)
    figure, axis = plt.subplots(figsize=(max(4.5, 2.2 * len(lengths) + 2), 3.8))
    for i, name in enumerate(IMPLEMENTATIONS):
        picked = [next(r for r in rows if r["tokens"] == t and r["attn_implementation"] == name) for t in lengths]
        xs = [j + (i - (len(IMPLEMENTATIONS) - 1) / 2) * width for j in range(len(lengths))]
        bars = plot_bars(axis, xs, [r["tokens_per_s"] for r in picked], [bool(r.get("flagged")) for r in picked],
                         width=width, color=colors[name], label=name)
        if name == "hybridrag":
            for bar, row in zip(bars, picked):
                axis.annotate(f"{row['speedup_vs_eager']:.2f}x\neager", (bar.get_x() + bar.get_width() / 2,
                              bar.get_height()), xytext=(0, 2), textcoords="offset points", ha="center",
                              va="bottom", fontsize=7)
    axis.set_xticks(range(len(lengths)), [f"{t:,}" for t in lengths])
    axis.set_xlabel("tokens per step (batch 1)")
    axis.set_ylabel("training tokens/s (higher is better)")
    axis.set_ylim(0, axis.get_ylim()[1] * 1.15)  # room for the labels
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=8)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    note_flagged(figure, rows)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def _lengths(text):
    """--lengths: comma- or space-separated ints >= 2 ("512,2048")."""
    values = []
    for part in text.replace(",", " ").split():
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers such as 512,2048, got {part!r}") from None
        if value < 2:
            raise argparse.ArgumentTypeError(f"a step needs at least 2 tokens (one label after the shift), got {value}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one length")
    return tuple(values)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv, device):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"T = {LENGTHS['quick'][0]} only")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama instead of SmolLM2 (tests)")
    parser.add_argument("--lengths", type=_lengths, metavar="T[,T...]",
                        help=f"tokens per step (default {','.join(map(str, LENGTHS['full']))}; --quick "
                             f"{LENGTHS['quick'][0]})")
    parser.add_argument("--rounds", type=_positive, default=ROUNDS,
                        help="timed rounds of one step per implementation (default %(default)s)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help=f"torch CPU threads (default torch's: {torch.get_num_threads()})")
    parser.add_argument("--out", type=Path, default=RUNS_ROOT / device_slug(device) / SUITE,
                        help="folder for results.json and the plot (default %(default)s)")
    parser.add_argument("--record", action="store_true",
                        help=f"also write {RESULTS_ROOT.name}/<device>/{SUITE}.json and .png (the real model, not "
                             "--quick, a clean checkout)")
    args = parser.parse_args(argv)
    if args.record and (args.quick or args.tiny):
        parser.error(f"--record records the real model at a full size: drop {'--quick' if args.quick else '--tiny'}")
    check_output_options(parser, args.out, record=args.record)
    return args


def main(argv=None):
    device = default_device()
    args = parse_args(argv, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    lengths = args.lengths or LENGTHS[size]
    model_name = "tiny 2-layer Llama" if args.tiny else "SmolLM2-135M-Instruct"
    log(f"{SUITE}: {model_name}, float32, {device.type}, {torch.get_num_threads()} threads, T = "
        f"{', '.join(map(str, lengths))}, {args.rounds} rounds of {', '.join(IMPLEMENTATIONS)}")
    start = time.perf_counter()
    if args.tiny:
        models, tokenizer = load_tiny(device, max(lengths)), None
    else:
        models, tokenizer = load_real(device)
    rows = []
    for tokens in lengths:
        log(f"[{SUITE}] T = {tokens}: warm-up and {args.rounds} rounds ...")
        rows += run_length(models, input_ids(tokenizer, tokens, device), args.rounds, device)
    flagged = flag_under_load(rows, LOAD_LIMIT)
    failed = [r for r in rows if r["loss_rel_diff_vs_sdpa"] > LOSS_RTOL]
    wall_s = time.perf_counter() - start
    env = environment(device)
    payload = {"suite": SUITE, "model": model_name, "size": "tiny" if args.tiny else size, "lengths": list(lengths),
               "rounds": args.rounds, "dtype": "float32", "batch": 1, "grad_params": list(GRAD_PARAMS),
               "load_limit": LOAD_LIMIT, "loss_rtol": LOSS_RTOL, "flagged": bool(flagged),
               "losses_agree": not failed, "duration_s": wall_s, "env": env, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(args.out / "results.json", payload)
    title = (f"{SUITE}: {model_name}, float32, batch 1, forward+backward, {env['device']}, {env['cpu_threads']} "
             f"threads, commit {env['git_commit']}")
    png_path = plot(rows, f"{model_name}, float32, batch 1, forward+backward\n{env['device']}, "
                          f"{env['cpu_threads']} threads, commit {short_commit(env)}", args.out / f"{SUITE}.png")
    print(format_table(title, rows, COLUMNS))
    print(f"speedup = the other implementation's median step time / this one's; grad rel diff = max |g - g_sdpa| / "
          f"max |g_sdpa| over {', '.join(GRAD_PARAMS)}; {format_seconds(wall_s)} in all")
    if flagged:
        print(f"FLAGGED: {len(flagged)} of {len(rows)} rows timed while other processes used more than "
              f"{LOAD_LIMIT:.0%} of the CPU (*): their timings are not comparable")
    print(f"wrote {json_path}\nwrote {png_path}")
    if failed:
        for row in failed:
            print(f"FAILED: {row['attn_implementation']} loss {row['loss']:.6f} at T = {row['tokens']} differs from "
                  f"sdpa's by {row['loss_rel_diff_vs_sdpa']:.1e} relative (limit {LOSS_RTOL:.0e})", file=sys.stderr)
        return 1
    if args.record and flagged:
        print(f"not recorded: {len(flagged)} rows were timed under load; rerun on an idle machine", file=sys.stderr)
        return 3
    if args.record:
        for path in record_run(SUITE, payload, png_path, slug=device_slug(device)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
