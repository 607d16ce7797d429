"""refrag-finetune: reward-driven LoRA fine-tuning with multi-hop retrieval (GRPO-style policy gradient).

Each step takes `questions_per_step` questions (in a seeded order that is a function of the step alone), retrieves
for each with MultiHopRAGTask over a KnowledgeBase of the corpus, samples `group_size` answers from the policy (the
LM with its adapters, temperature sampling with seeds derived from the run's seed, the step and the sample), and
scores each with compute_rag_reward against the golds and the retrieved passages. The advantage of a sample is its
reward minus its group's mean, over the group's standard deviation (zero when the group agrees). The loss is

    mean over samples of  mean over its tokens of  [-A * log pi(token) + kl_coef * KL_t]

with KL_t = exp(ref - logp) - (ref - logp) - 1 (the non-negative k3 estimator) against the frozen base, which is
the same model with its adapters switched off (no second copy). Only LoRA adapters train here.

Resume: a checkpoint (hybridrag.train.checkpoint's format) holds the step, the adapters, the optimizer and the RNG
states; run_config.json must match (as in rag-finetune). Training N steps then resuming for M gives the adapters of
N + M steps in one go.
"""
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .finetune import FinetuneConfig, build_knowledge_base, check_run_file
from .finetune_data import load_qa_records
from .finetune_model import AnswerLossModel, load_base_model, save_finetuned
from .formatting import render_rag_conversation_for_tokenizer
from ..nn.lora import apply_lora, set_lora_enabled
from .rag_generate import generate_ids
from .rewards import compute_rag_reward

__all__ = ["RefragConfig", "refrag_finetune", "group_advantages", "kl_k3"]


@dataclass
class RefragConfig(FinetuneConfig):
    """FinetuneConfig's options (method must be "lora"; retrieval must be "kb": the corpus is searched hop by hop),
    plus max_hops, questions_per_step, group_size (samples per question, >= 2), max_new_tokens, temperature and
    kl_coef (>= 0)."""
    retrieval: str = "kb"
    learning_rate: float = 2e-4
    steps: int = 20
    warmup_steps: int = 0
    max_hops: int = 2
    questions_per_step: int = 2
    group_size: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    kl_coef: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        if self.method != "lora":
            raise ValueError(f"refrag-finetune trains LoRA adapters (the frozen reference is the base with them "
                             f"off); method must be 'lora', got {self.method!r}")
        if self.retrieval != "kb":
            raise ValueError(f"refrag-finetune retrieves hop by hop from a corpus: retrieval must be 'kb', got "
                             f"{self.retrieval!r}")
        for name in ("max_hops", "questions_per_step", "max_new_tokens"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be an int >= 2 (advantages compare samples of one question), got "
                             f"{self.group_size!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be a number > 0 (the policy is sampled), got {self.temperature!r}")
        if not isinstance(self.kl_coef, (int, float)) or not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be a number >= 0, got {self.kl_coef!r}")


def group_advantages(rewards):
    """(r - mean) / std over one group (population std); all zeros when the rewards are all equal."""
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards)
    return [0.0 if std < 1e-8 else (r - mean) / std for r in rewards]


def kl_k3(logp, ref):
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1 (>= 0, zero where they agree)."""
    delta = ref - logp
    return torch.exp(delta) - delta - 1


def _token_logprobs(model, prompt, sample):
    """log pi(sample[t] | prompt, sample[:t]) for every t, shape (len(sample),)."""
    ids = torch.tensor([prompt + sample])
    hidden = model.base_model(input_ids=ids).last_hidden_state[0, len(prompt) - 1:-1]
    logits = model.get_output_embeddings()(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(sample)[:, None])[:, 0]


def _prompts(config, records, tokenizer):
    """(prompt ids, passages) per record, retrieved hop by hop with MultiHopRAGTask."""
    from .tasks import MultiHopRAGTask

    knowledge_base = build_knowledge_base(config.corpus, config.encoder)
    conversations = [{"messages": [{"role": "system", "content": config.system},
                                   {"role": "user", "content": r["question"]},
                                   {"role": "assistant", "content": "x"}]} for r in records]
    task = MultiHopRAGTask(conversations, knowledge_base, max_hops=config.max_hops, top_k=config.top_k,
                           max_chars=config.max_passage_chars)
    out = []
    for item in task:
        ids, mask = render_rag_conversation_for_tokenizer(item, tokenizer)
        retrieval = next(m for m in item["messages"] if m["role"] == "retrieval")
        out.append((ids[:mask.index(1)], retrieval["documents"]))
    return out


def _order(seed, count, epoch):
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def _step_questions(config, count, step):
    """Record indices of optimizer step `step` (0-based): consecutive slices of per-epoch seeded permutations."""
    start = step * config.questions_per_step
    return [_order(config.seed, count, (start + i) // count)[(start + i) % count]
            for i in range(config.questions_per_step)]


def _policy_step(config, lm, prompts, records, indices, step):
    """Sample, score and return (loss, stats) of one step."""
    loss_terms, rewards_all, kls = [], [], []
    for q, index in enumerate(indices):
        prompt, passages = prompts[index]
        samples = []
        for g in range(config.group_size):
            seed = ((config.seed * 1_000_003 + step) * 1_009 + q) * 101 + g
            tokens, text = generate_ids(lm.model, lm.tokenizer, prompt, max_new_tokens=config.max_new_tokens,
                                        temperature=config.temperature, seed=seed)
            samples.append((tokens, text))
        rewards = [compute_rag_reward(text, records[index]["golds"], passages)["total"] for _, text in samples]
        rewards_all += rewards
        for (tokens, _), advantage in zip(samples, group_advantages(rewards)):
            if not tokens:
                continue
            logp = _token_logprobs(lm.model, prompt, tokens)
            with torch.no_grad():
                set_lora_enabled(lm.model, False)
                try:
                    ref = _token_logprobs(lm.model, prompt, tokens)
                finally:
                    set_lora_enabled(lm.model, True)
            kl = kl_k3(logp, ref)
            kls.append(float(kl.detach().mean()))
            loss_terms.append((-advantage * logp + config.kl_coef * kl).mean())
    loss = torch.stack(loss_terms).mean()
    return loss, {"reward": statistics.fmean(rewards_all), "reward_max": max(rewards_all),
                  "kl": statistics.fmean(kls) if kls else 0.0}


def _save(config, step, model, optimizer):
    state = {"format": "refrag-1", "step": step, "adapters": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": rng_state()}
    return save_checkpoint(state, checkpoint_path(config.output_dir, step))


def _load(config, model, optimizer):
    path = latest_checkpoint(config.output_dir)
    if path is None:
        raise ValueError(f"--resume but {config.output_dir} holds no checkpoint-*.pt")
    state = load_checkpoint(path)
    if state.get("format") != "refrag-1":
        raise ValueError(f"checkpoint {path} was not written by refrag-finetune")
    model.load_state_dict(state["adapters"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state["step"]


def refrag_finetune(config, *, resume=False):
    """Run as `config` says (module docstring). Returns {"step", "checkpoint", "saved", "history"}."""
    if not isinstance(config, RefragConfig):
        raise TypeError(f"config must be a RefragConfig, got {type(config).__name__}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    records = load_qa_records(config.data)
    check_run_file(config, config.output_dir, resume)
    lm = load_base_model(config.model_path, int8=config.int8, attn_implementation=config.attn_implementation)
    torch.manual_seed(config.seed)
    apply_lora(lm.model, rank=config.rank, alpha=config.alpha, dropout=config.dropout, targets=config.targets,
               layers=config.lora_layers)
    model = AnswerLossModel(lm.model, trainable_state_only=True)
    prompts = _prompts(config, records, lm.tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    step = _load(config, model, optimizer) if resume else 0
    out_dir = Path(config.output_dir)
    history, checkpoint = [], None
    bar = tqdm(total=config.steps, initial=step, desc="refrag", dynamic_ncols=True, disable=not config.progress_bar)
    try:
        while step < config.steps:
            for group in optimizer.param_groups:  # linear warmup, then constant
                group["lr"] = config.learning_rate * min(1.0, (step + 1) / (config.warmup_steps + 1))
            loss, stats = _policy_step(config, lm, prompts, records, _step_questions(config, len(records), step), step)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"the loss is {loss.item()} at step {step + 1}; stopping (the last "
                                         "checkpoint is intact)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            record = {"step": step, "loss": loss.item(), **stats}
            history.append(record)
            with (out_dir / "log.jsonl").open("a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.4f}")
            if config.save_every and step % config.save_every == 0:
                checkpoint = _save(config, step, model, optimizer)
        if checkpoint is None or checkpoint != checkpoint_path(out_dir, step):
            checkpoint = _save(config, step, model, optimizer)
    finally:
        bar.close()
    lm.model.eval()
    saved = save_finetuned(lm, out_dir, method="lora", base_model=config.model_path, int8=config.int8,
                           lora=config.lora_options)
    return {"step": step, "checkpoint": str(checkpoint), "saved": str(saved), "history": history}
