"""HierarchicalHybridRAG against a flat transformer of equal parameter count on key-value recall across segments.

Task: NUM_PAIRS (key, value) pairs at random positions in the first half of the sequence (at least BLOCK tokens
apart; random filler tokens elsewhere), then every key is queried at the end in a random order as
"QUERY key value". The loss and the accuracy count only the queried values (argmax of the logits at the key); a
value can only come from the pair, segments away. Chance = 1 / NUM_VALUES.

Models (equal parameter count, printed): HierarchicalHybridRAG (2 local + 1 cross-segment + 1 synthesis blocks,
segment 64, window 32, 4 landmarks per segment); hierarchical_selected, the same with selected_blocks=4 (stage 3
also reads the 4 best-scoring earlier blocks of 16 tokens whole; plain PyTorch) and stage_gates (stages 1 and 2
enter through scalar gates that start at 0; with the selection gate 262 parameters more, 0.1%); and a flat 4-block
transformer of the same blocks with full causal attention, `sdpa` (F.scaled_dot_product_attention, is_causal) or
`eager` (an explicit (B, H, T, T) softmax; the same function, so it reuses sdpa's trained weights).
1. Training: the three trained models get the same budget (steps x batch at TRAIN_LENGTH, Adam), then accuracy on
   held-out data at TRAIN_LENGTH.
2. Long cases, one subprocess per (model, T), T = 8k and 32k (quick: 1k and 2k), batch 1: training tokens/s over
   forward + backward steps (median), peak memory = the case process's peak resident set during the steps (VmHWM of
   /proc/self/status, reset just before them through /proc/self/clear_refs) and its growth over the resident set
   before them (the steps' own memory: activations, gradients, Adam-free), and accuracy at T of the models trained
   at TRAIN_LENGTH (length generalisation, not trained at T). A case that runs out of memory (killed), passes its
   time limit, or would need more memory for eager's T x T scores than the machine has (estimated, then not run)
   is reported as not run with the reason; no figure is written for it.
Writes results.json and hierarchical_recall.png into --out (default benchmarks/runs/hierarchical_recall-<mode>).
The other processes' share of the CPU is measured over the training and over each case's steps (LoadMeter);
--record copies a full run to benchmarks/results/<device>/hierarchical_recall.json and .png, from a clean checkout,
and refuses when any of those shares is above 15% (the timings would not be ours).

    python -m benchmarks.hierarchical_recall --quick      # ~1-2 min on 2 cores (1 thread)
    python -m benchmarks.hierarchical_recall              # ~30-35 min on 2 idle cores (1 thread) with the selection arm
    python -m benchmarks.hierarchical_recall --record     # the same, recorded
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hybridrag.models import HierarchicalConfig, HierarchicalHybridRAG
from hybridrag.models.blocks import TransformerBlock
from hybridrag.nn import RotaryEmbedding

from .common import RUNS_ROOT, check_output_options, environment, LoadMeter, record_run

QUERY, NUM_FILLER, NUM_KEYS, NUM_VALUES, NUM_PAIRS = 0, 16, 16, 16, 2
VOCAB = 64
BLOCK = 16  # minimum spacing of the pairs
MODELS = ("hierarchical", "hierarchical_selected", "flat_sdpa", "flat_eager")
TRAINED = ("hierarchical", "hierarchical_selected", "flat_sdpa")  # flat_eager runs flat_sdpa's weights
MODES = {
    "quick": {"train_length": 256, "batch": 8, "steps": 20, "eval": 32, "lengths": (1024, 2048), "long_steps": 2,
              "long_eval": 2, "case_timeout": 120, "expected_s": 120},
    # full: 600 training steps per model (a probe: flat_sdpa reached 0.69 accuracy after 400 steps of 16 x 256 with
    # 2 pairs, 0.33 s a step on a loaded core; with 4 pairs it took 800 steps to reach 0.30), flat_sdpa at 32k ~4 min,
    # flat_eager at 8k ~4.5 min (timed at the earlier 512-token setting)
    "full": {"train_length": 256, "batch": 16, "steps": 600, "eval": 128, "lengths": (8192, 32768), "long_steps": 2,
             "long_eval": 2, "case_timeout": 420, "expected_s": 2100},
}
LR = 3e-3
LOAD_LIMIT = 0.15
SUITE = "hierarchical_recall"


# ----------------------------------------------------------------------------------------------------------------
# the flat baseline


class CausalSelfAttention(nn.Module):
    """Full causal attention with the hybridrag layers' q/k/v/o and RoPE; sdpa or eager softmax."""

    def __init__(self, hidden_size, num_heads, attention):
        super().__init__()
        self.num_heads, self.head_dim, self.attention = num_heads, hidden_size // num_heads, attention
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden_size, hidden_size, bias=False)
                                                              for _ in range(4))
        self.rotary = RotaryEmbedding(self.head_dim)

    def forward(self, x, position_ids=None, key_mask=None):
        batch, length, _ = x.shape
        q, k, v = (p(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rotary(q, k, position_ids)
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5  # (B, H, T, T)
            later = torch.ones(length, length, dtype=torch.bool).triu(1)
            o = torch.softmax(scores.masked_fill(later, float("-inf")), dim=-1) @ v
        return self.o_proj(o.transpose(1, 2).reshape(batch, length, -1))


class FlatTransformer(nn.Module):
    """Embedding, TransformerBlocks on CausalSelfAttention, RMSNorm, tied head; forward like HierarchicalHybridRAG."""

    def __init__(self, config, attention):
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        nn.init.normal_(self.embed_tokens.weight, std=c.initializer_range)
        layers = c.num_local_layers + c.num_cross_layers + c.num_synthesis_layers
        self.blocks = nn.ModuleList(TransformerBlock(CausalSelfAttention(c.hidden_size, c.num_heads, attention),
                                                     c.hidden_size, c.intermediate_size, 0.0, c.norm_eps)
                                    for _ in range(layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)

    def forward(self, input_ids, labels=None):
        x = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1])
        for block in self.blocks:
            x = block(x, positions)
        logits = self.norm(x) @ self.embed_tokens.weight.T
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                          ignore_index=-100)
        return out


def model_config():
    return HierarchicalConfig(vocab_size=VOCAB, hidden_size=64, num_heads=4, segment_length=64, window_size=32,
                              num_landmark_tokens=4, cross_window=16, num_local_layers=2, num_cross_layers=1,
                              num_synthesis_layers=1, intermediate_size=256)


def build(name):
    torch.manual_seed(0)
    if name == "hierarchical":
        return HierarchicalHybridRAG(model_config())
    if name == "hierarchical_selected":  # stage 3 reads the 4 best earlier blocks whole; stages 1-2 gated from 0
        return HierarchicalHybridRAG(replace(model_config(), selected_blocks=4, stage_gates=True))
    return FlatTransformer(model_config(), name.removeprefix("flat_"))


def gate_parameters():
    """What hierarchical_selected has more than the others: its selection gate (a per-token, per-head sigmoid gate
    of the selected branch) and its two stage gates."""
    model = build("hierarchical_selected")
    return sum(p.numel() for name, p in model.named_parameters()
               if "selection_gate" in name or name in ("local_gate", "cross_gate"))


def num_parameters(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------------------------------------
# the task


def recall_batch(batch, length, generator):
    """(input_ids (B, T), labels (B, T): the queried values at their positions, -100 elsewhere)."""
    tail = 3 * NUM_PAIRS
    slots = (length // 2) // BLOCK
    if slots < NUM_PAIRS or length < 2 * tail:
        raise ValueError(f"length {length} is too short for {NUM_PAIRS} pairs {BLOCK} tokens apart")
    ids = torch.randint(1, 1 + NUM_FILLER, (batch, length), generator=generator)
    labels = torch.full((batch, length), -100)
    key_base, value_base = 1 + NUM_FILLER, 1 + NUM_FILLER + NUM_KEYS
    for b in range(batch):
        keys = torch.randperm(NUM_KEYS, generator=generator)[:NUM_PAIRS] + key_base
        values = torch.randint(0, NUM_VALUES, (NUM_PAIRS,), generator=generator) + value_base
        chosen = torch.randperm(slots, generator=generator)[:NUM_PAIRS]
        offsets = torch.randint(0, BLOCK - 1, (NUM_PAIRS,), generator=generator)
        for i in range(NUM_PAIRS):
            pos = int(chosen[i]) * BLOCK + int(offsets[i])
            ids[b, pos], ids[b, pos + 1] = keys[i], values[i]
        for j, i in enumerate(torch.randperm(NUM_PAIRS, generator=generator).tolist()):
            pos = length - tail + 3 * j
            ids[b, pos], ids[b, pos + 1], ids[b, pos + 2] = QUERY, keys[i], values[i]
            labels[b, pos + 2] = values[i]
    return ids, labels


@torch.no_grad()
def accuracy(model, length, count, seed, batch=8):
    """Share of the queried values predicted (argmax at the key), over `count` sequences; (correct, total)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    for start in range(0, count, batch):
        ids, labels = recall_batch(min(batch, count - start), length, generator)
        predicted = model(ids)["logits"][:, :-1].argmax(-1)
        target = labels[:, 1:]
        hit = target != -100
        correct += int((predicted[hit] == target[hit]).sum())
        total += int(hit.sum())
    model.train()
    return correct, total


def train(model, mode, log):
    settings = MODES[mode]
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    losses, start, meter = [], time.perf_counter(), LoadMeter().start()
    for step in range(settings["steps"]):
        ids, labels = recall_batch(settings["batch"], settings["train_length"], generator)
        loss = model(ids, labels=labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == settings["steps"] - 1:
            log(f"    step {step:4d}  loss {loss.item():.3f}")
    seconds = time.perf_counter() - start
    tokens = settings["steps"] * settings["batch"] * settings["train_length"]
    return {"train_seconds": seconds, "train_tokens_per_s": tokens / seconds, "losses": losses,
            "other_load": meter.stop()}


# ----------------------------------------------------------------------------------------------------------------
# one long case, in a subprocess of its own (its peak RSS is its own)


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss():
    """Set the process's peak resident set (VmHWM) back to its current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_case(name, length, weights, steps, eval_count):
    model = build("flat_sdpa" if name == "flat_eager" else name)
    model.load_state_dict(torch.load(weights, weights_only=True))
    if name == "flat_eager":
        for block in model.blocks:
            block.attention.attention = "eager"
    generator = torch.Generator().manual_seed(2)
    ids, labels = recall_batch(1, length, generator)
    resting = _status_bytes("VmRSS")
    reset_peak_rss()
    times, meter = [], LoadMeter().start()
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(ids, labels=labels)["loss"]
        loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = _status_bytes("VmHWM")
    other_load = meter.stop()
    correct, total = accuracy(model, length, eval_count, seed=3, batch=1)
    return {"tokens_per_s": length / statistics.median(times), "step_seconds": times, "peak_rss_bytes": peak,
            "step_peak_growth_bytes": peak - resting, "accuracy": correct / total, "eval_targets": total,
            "other_load": other_load}


def eager_score_bytes(length, layers=4, heads=4):
    """Eager attention's T x T memory per step, estimated as two (1, H, T, T) float32 tensors per layer (scores and
    probabilities; measured at T = 4096: 1.7 of them per layer at the step's peak)."""
    return layers * 2 * heads * length * length * 4


def available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def long_case(name, length, weights, settings, threads):
    if name == "flat_eager":
        need, have = eager_score_bytes(length), available_bytes()
        if need > 0.6 * have:
            return {"status": "not run", "reason": f"eager attention needs >= {need / 2**30:.1f} GiB of T x T scores "
                    f"(estimated), more than 60% of the {have / 2**30:.1f} GiB available"}
    command = [sys.executable, "-m", "benchmarks.hierarchical_recall", "--case", name, str(length), "--weights",
               str(weights), "--case-steps", str(settings["long_steps"]), "--case-eval", str(settings["long_eval"]),
               "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=settings["case_timeout"], env=env)
    except subprocess.TimeoutExpired:
        return {"status": "not run", "reason": f"over the case time limit of {settings['case_timeout']} s (too slow)"}
    if done.returncode != 0:
        killed = done.returncode in (-9, 137)
        reason = "killed (out of memory)" if killed else f"failed: {done.stderr.strip().splitlines()[-1:]}"
        return {"status": "not run", "reason": reason}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


# ----------------------------------------------------------------------------------------------------------------
# report


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("accuracy", "accuracy (trained at %d)" % results["settings"]["train_length"], 1),
              ("tokens_per_s", "training tokens/s (fwd+bwd, B=1)", 1),
              ("step_peak_growth_bytes", "memory of the steps: peak RSS - resting RSS (MiB)", 2**20)]
    lengths = results["settings"]["lengths"]
    for ax, (key, title, unit) in zip(axes, panels):
        width = 0.2
        for i, name in enumerate(MODELS):
            for j, length in enumerate(lengths):
                case = results["long"][name][str(length)]
                x = j + (i - (len(MODELS) - 1) / 2) * width
                if case["status"] == "ok":
                    ax.bar(x, case[key] / unit, width, color=f"C{i}", label=name if j == 0 else None)
                else:
                    ax.bar(x, 0, width, color=f"C{i}", label=name if j == 0 else None)
                    ax.text(x, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"T={t}" for t in lengths])
        ax.set_title(title)
        if key == "accuracy":
            ax.axhline(1 / NUM_VALUES, color="gray", linestyle=":", label="chance")
            ax.set_ylim(0, 1)
        else:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    loads = ", ".join(f"{load:.0%}" for load in sorted(set(round(v, 2) for v in other_loads(results).values())))
    extra = results["parameters"]["hierarchical_selected"] - results["parameters"]["hierarchical"]
    fig.suptitle(f"key-value recall, {results['parameters']['hierarchical']:,} parameters each "
                 f"(hierarchical_selected +{extra}: its gates); "
                 f"{results['environment']['device']}, other processes' CPU share {loads or '-'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log(message):
    print(message, file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that the suite works")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/runs/...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--record", action="store_true",
                        help="also write benchmarks/results/<device>/hierarchical_recall.json and .png (full size, a "
                             "clean checkout; refused when other processes took over 15%% of the CPU)")
    parser.add_argument("--case", nargs=2, metavar=("MODEL", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--case-steps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--case-eval", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.case:
        name, length = args.case[0], int(args.case[1])
        if name not in MODELS:
            parser.error(f"--case model must be one of {MODELS}, got {name!r}")
        print(json.dumps(run_case(name, length, args.weights, args.case_steps, args.case_eval)))
        return 0

    mode = "quick" if args.quick else "full"
    settings = MODES[mode]
    out = args.out or RUNS_ROOT / f"hierarchical_recall-{mode}"
    check_output_options(parser, out, record=args.record, quick=args.quick)
    out.mkdir(parents=True, exist_ok=True)
    log(f"hierarchical_recall ({mode}): expected ~{settings['expected_s'] / 60:.0f} min on 2 idle cores with "
        f"{args.threads} thread(s); longer under load. Output: {out}")
    results = {"mode": mode, "settings": {**settings, "lengths": list(settings["lengths"]), "lr": LR,
               "pairs": NUM_PAIRS, "values": NUM_VALUES,
               "memory": "VmHWM of a subprocess per case, reset before the steps (clear_refs)"},
               "environment": environment(torch.device("cpu")), "parameters": {}, "train": {}, "long": {}}
    for name in TRAINED:
        model = build(name)
        results["parameters"][name] = num_parameters(model)
        log(f"  training {name} ({results['parameters'][name]:,} parameters): {settings['steps']} steps x "
            f"{settings['batch']} x {settings['train_length']} tokens")
        record = train(model, mode, log)
        correct, total = accuracy(model, settings["train_length"], settings["eval"], seed=4)
        record["accuracy"], record["eval_targets"] = correct / total, total
        log(f"  {name}: accuracy {record['accuracy']:.3f} of {total} at T={settings['train_length']}, "
            f"{record['train_tokens_per_s']:.0f} training tokens/s")
        results["train"][name] = record
        torch.save(model.state_dict(), out / f"{name}.pt")
    results["parameters"]["flat_eager"] = results["parameters"]["flat_sdpa"]
    counts = results["parameters"]
    if not counts["hierarchical"] == counts["flat_sdpa"] == counts["hierarchical_selected"] - gate_parameters():
        raise RuntimeError(f"parameter counts differ: {counts}")

    for name in MODELS:
        weights = out / ("flat_sdpa.pt" if name == "flat_eager" else f"{name}.pt")
        results["long"][name] = {}
        for length in settings["lengths"]:
            log(f"  {name} at T={length} ...")
            start = time.perf_counter()
            case = long_case(name, length, weights, settings, args.threads)
            case["wall_seconds"] = time.perf_counter() - start
            results["long"][name][str(length)] = case
            if case["status"] == "ok":
                log(f"    {case['tokens_per_s']:.0f} tokens/s, peak RSS {case['peak_rss_bytes'] / 2**20:.0f} MiB "
                    f"(+{case['step_peak_growth_bytes'] / 2**20:.0f} MiB in the steps), accuracy "
                    f"{case['accuracy']:.2f} of {case['eval_targets']}")
            else:
                log(f"    not run: {case['reason']}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "hierarchical_recall.png")
    print(summary(results))
    log(f"wrote {out / 'results.json'} and {out / 'hierarchical_recall.png'}")
    if args.record:
        loaded = {name: load for name, load in other_loads(results).items() if load > LOAD_LIMIT}
        if loaded:
            log(f"not recorded: other processes took over {LOAD_LIMIT:.0%} of the CPU during "
                f"{', '.join(f'{k} ({v:.0%})' for k, v in loaded.items())}; run again on a quiet machine")
            return 1
        for path in record_run(SUITE, results, out / "hierarchical_recall.png"):
            log(f"wrote {path}")
    return 0


def other_loads(results):
    """{"train <model>" | "<model> T=<T>": the other processes' CPU share} over every timed part that ran."""
    loads = {f"train {name}": record["other_load"] for name, record in results["train"].items()}
    for name, cases in results["long"].items():
        loads.update({f"{name} T={length}": case["other_load"] for length, case in cases.items()
                      if case["status"] == "ok"})
    return loads


def summary(results):
    lines = [f"{'model':22s} {'T':>6s} {'accuracy':>9s} {'tokens/s':>9s} {'peak RSS MiB':>13s} {'step +MiB':>10s}"]
    train_length = results["settings"]["train_length"]
    for name, record in results["train"].items():
        lines.append(f"{name:22s} {train_length:6d} {record['accuracy']:9.3f} {record['train_tokens_per_s']:9.0f} "
                     f"{'(training run)':>13s}")
    for name, cases in results["long"].items():
        for length, case in cases.items():
            if case["status"] == "ok":
                lines.append(f"{name:22s} {int(length):6d} {case['accuracy']:9.3f} {case['tokens_per_s']:9.0f} "
                             f"{case['peak_rss_bytes'] / 2**20:13.0f} {case['step_peak_growth_bytes'] / 2**20:10.0f}")
            else:
                lines.append(f"{name:22s} {int(length):6d}  not run: {case['reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
