"""HybridRAGTrainer: AdamW with warmup and a schedule, gradient accumulation, clipping, autocast, evaluation, early
stopping, JSON-lines logs, a progress bar, checkpoints with exact resume, and data parallelism (DDP under torchrun).

    trainer = HybridRAGTrainer(config, model, train_dataset, eval_dataset=None, collate_fn=None, compute_metrics=None)
    summary = trainer.train()                          # or train(resume_from="latest" | path, stop_at_step=n)

The model's contract: model(**tensors of the batch) returns a dict with "loss" (a scalar: the mean over the
batch's label tokens, or over its rows with loss_normalization="examples"). Values of the batch that are not
tensors (task_type) are metadata and are not passed. The loss of a step is the mean over all label tokens (or
rows) of its micro-batches on every process, so batch 4 equals 2 x 2 accumulated and 2 processes with batch b equal
one process with batch 2b, up to float rounding.

Exact resume: a checkpoint holds the model, optimizer, scheduler and gradient scaler states, every rank's RNG states
(torch, CUDA, numpy, random), the data position (epoch and micro-batch within it: the order of an epoch is a function
of seed and epoch), the step and the early-stopping state. Training N steps, saving, and resuming in new objects for
N more gives the same parameters, bit for bit on CPU, as 2N steps in one go.
"""
import contextlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from . import distributed
from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainingConfig
from .data import IGNORE_INDEX, collate_rag

CHECKPOINT_KEYS = ("format", "step", "epoch", "batch_in_epoch", "world_size", "config", "model", "optimizer",
                   "scheduler", "scaler", "rng", "early_stopping")


def lr_lambda(config, total_steps):
    """The learning-rate multiplier of optimizer step s (0-based): linear warmup over warmup_steps, then linear or
    cosine decay to 0 at total_steps, or constant."""
    warmup, schedule = config.warmup_steps, config.schedule

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _check_dataset(name, dataset):
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name} must be a map-style dataset (__len__ and __getitem__), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: training and evaluation need at least one example")


def _count_tokens(batch):
    """Tokens a batch feeds the model: the sum of its attention_mask and *_mask tensors."""
    return sum(int(v.sum()) for k, v in batch.items() if isinstance(v, torch.Tensor)
               and (k == "attention_mask" or k.endswith("_mask")))


class HybridRAGTrainer:
    """Trains `model` on `train_dataset` as `config` says (see the module docstring).

    Args:
        config: a TrainingConfig (or a dict / JSON / YAML path for TrainingConfig.from_any).
        model: an nn.Module with the contract above (moved to the config's device).
        train_dataset, eval_dataset: map-style datasets (RAGDataset or any), non-empty; eval_dataset is needed by
            eval_every and early stopping.
        collate_fn: list of items -> dict batch; default RAGCollator(pad_id=0).
        compute_metrics: None or compute_metrics(model, eval_dataset) -> dict of str -> float, called by evaluate()
            on every rank with the model in eval mode under torch.no_grad (its keys join "eval_loss").
    Attributes: step, epoch, history (the logged dicts), total_steps, rank, world_size, device.
    """

    def __init__(self, config, model, train_dataset, eval_dataset=None, collate_fn=None, compute_metrics=None):
        self.config = config = TrainingConfig.from_any(config) if not isinstance(config, TrainingConfig) else config
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_dataset("train_dataset", train_dataset)
        if eval_dataset is not None:
            _check_dataset("eval_dataset", eval_dataset)
        elif config.eval_every is not None:
            raise ValueError(f"eval_every={config.eval_every} needs an eval_dataset, got None")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        if compute_metrics is not None and not callable(compute_metrics):
            raise TypeError(f"compute_metrics must be callable, got {type(compute_metrics).__name__}")
        if compute_metrics is not None and eval_dataset is None:
            raise ValueError("compute_metrics was given without an eval_dataset to compute them on")
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} but CUDA is not available on this machine")
        if config.mixed_precision == "bf16":
            if config.device.startswith("cuda") and not torch.cuda.is_bf16_supported():
                raise ValueError("mixed_precision='bf16' but this CUDA device has no bfloat16 support; use 'fp16'")
            if config.device == "cpu" and not torch.amp.is_autocast_available("cpu"):
                raise ValueError("mixed_precision='bf16' but this torch build has no CPU autocast; use 'no'")
        if config.gradient_checkpointing and not callable(getattr(model, "gradient_checkpointing_enable", None)):
            raise ValueError(f"gradient_checkpointing=True but {type(model).__name__} has no "
                             "gradient_checkpointing_enable() method")
        if config.passage_refresh_every is not None and not callable(getattr(model, "refresh_passages", None)):
            raise ValueError(f"passage_refresh_every={config.passage_refresh_every} but {type(model).__name__} has "
                             "no refresh_passages() method")

        self.rank, self.world_size, self.device = distributed.setup(config.device)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate_fn = collate_fn or collate_rag
        self.compute_metrics = compute_metrics
        self._seed(config.seed)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = model.to(self.device)
        self.wrapped = DistributedDataParallel(model) if self.world_size > 1 else model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(model).__name__} has no parameter that requires grad: nothing to train")
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                                           betas=config.adam_betas, eps=config.adam_eps)
        self.sampler = DistributedSampler(train_dataset, num_replicas=self.world_size, rank=self.rank,
                                          shuffle=config.shuffle, seed=config.seed)
        micro = math.ceil(len(self.sampler) / config.batch_size)
        self.steps_per_epoch = math.ceil(micro / config.gradient_accumulation_steps)
        bounds = [config.max_steps or math.inf, (config.epochs or math.inf) * self.steps_per_epoch]
        self.total_steps = int(min(bounds))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, self.total_steps))
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_metric, self.bad_evals = None, 0
        self.history = []
        self.output_dir = Path(config.output_dir)

    # -- set-up ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _seed(seed):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _epoch_batches(self, epoch):
        """This rank's micro-batches of `epoch` as lists of dataset indices (the same for a given seed and epoch)."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        size = self.config.batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _to_device(self, batch):
        if not isinstance(batch, dict):
            raise TypeError(f"collate_fn must return a dict of tensors, got {type(batch).__name__}")
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def _weight(self, batch):
        """The count the model's loss is a mean over: label tokens, or rows."""
        if self.config.loss_normalization == "examples":
            return next(iter(batch.values())).shape[0]
        if "labels" not in batch:
            raise ValueError(f"loss_normalization='tokens' needs 'labels' in the batch (the tokens the loss is a "
                             f"mean over), got keys {sorted(batch)}; use loss_normalization='examples'")
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def _loss_of(self, outputs, where):
        if not isinstance(outputs, dict) or "loss" not in outputs:
            raise TypeError(f"the model must return a dict with 'loss', got {type(outputs).__name__}")
        loss = outputs["loss"]
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"the model's 'loss' must be a scalar tensor, got {getattr(loss, 'shape', loss)!r}")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at {where}; stopping (the last checkpoint is intact)")
        return loss

    # -- one optimizer step ---------------------------------------------------------------------------------------

    def _train_step(self, micro_batches):
        batches = [self._to_device(self.collate_fn(items)) for items in micro_batches]
        weights = [self._weight(b) for b in batches]
        total, = distributed.all_sum([sum(weights)], self.device, self.world_size)
        step_loss, lr = 0.0, self.optimizer.param_groups[0]["lr"]
        for i, (batch, weight) in enumerate(zip(batches, weights)):
            if weight == 0:
                raise ValueError(f"micro-batch {i} of step {self.step + 1} has no label token (every label is "
                                 f"{IGNORE_INDEX}): its mean loss is undefined")
            sync = self.world_size == 1 or i == len(batches) - 1
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():  # all-reduce on the last only
                with self._autocast():
                    loss = self._loss_of(self.wrapped(**batch), f"step {self.step + 1}, micro-batch {i}")
                scaled = loss.float() * (weight * self.world_size / total)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            step_loss += loss.item() * weight / total
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.config.max_grad_norm is not None:
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, tokens = distributed.all_sum([step_loss, sum(_count_tokens(b) for b in batches)], self.device,
                                                self.world_size)
        return step_loss, tokens, grad_norm, lr

    # -- evaluation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self):
        """{"eval_loss": the mean over eval_dataset's label tokens (or rows), **compute_metrics(...)}; each rank
        takes every world_size-th batch and the sums are reduced."""
        if self.eval_dataset is None:
            raise ValueError("evaluate() needs an eval_dataset; the trainer was built without one")
        self.model.eval()
        try:
            size = self.config.batch_size
            starts = range(self.rank * size, len(self.eval_dataset), size * self.world_size)
            loss_sum, weight_sum = 0.0, 0.0
            for start in starts:
                items = [self.eval_dataset[i] for i in range(start, min(start + size, len(self.eval_dataset)))]
                batch = self._to_device(self.collate_fn(items))
                weight = self._weight(batch)
                with self._autocast():
                    loss = self._loss_of(self.model(**batch), f"evaluation at step {self.step}")
                loss_sum += loss.item() * weight
                weight_sum += weight
            loss_sum, weight_sum = distributed.all_sum([loss_sum, weight_sum], self.device, self.world_size)
            results = {"eval_loss": loss_sum / weight_sum}
            if self.compute_metrics is not None:
                metrics = self.compute_metrics(self.model, self.eval_dataset)
                if not isinstance(metrics, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                            and not isinstance(v, bool) for k, v in metrics.items()):
                    raise TypeError(f"compute_metrics must return a dict of str -> number, got {metrics!r}"[:300])
                if "eval_loss" in metrics:
                    raise ValueError("compute_metrics returned 'eval_loss', which the trainer computes itself")
                results.update({k: float(v) for k, v in metrics.items()})
        finally:
            self.model.train()
        return results

    def _early_stop(self, results):
        """True when the metric has not improved for early_stopping_patience evaluations."""
        config = self.config
        if config.early_stopping_patience is None:
            return False
        if config.early_stopping_metric not in results:
            raise ValueError(f"early_stopping_metric={config.early_stopping_metric!r} is not among the evaluation's "
                             f"results {sorted(results)}")
        value = results[config.early_stopping_metric]
        sign = 1.0 if config.early_stopping_mode == "min" else -1.0
        if self.best_metric is None or sign * (self.best_metric - value) > config.early_stopping_min_delta:
            self.best_metric, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= config.early_stopping_patience

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self):
        """Write checkpoint-<step>.pt into output_dir (rank 0; every rank's RNG state goes in it); its path."""
        rngs = distributed.gather_objects(rng_state(), self.world_size)
        path = checkpoint_path(self.output_dir, self.step)
        if self.rank == 0:
            save_checkpoint({
                "format": 1, "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.world_size, "config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "rng": rngs,
                "early_stopping": {"best": self.best_metric, "bad_evals": self.bad_evals}}, path)
        distributed.barrier(self.world_size)
        return path

    def load_checkpoint(self, path):
        """Restore everything from `path` (see the module docstring). Every check runs before any state changes:
        a corrupt file, a config that changed in a field that changes training, another world size or a model
        whose parameters differ is a ValueError and leaves the trainer as it was."""
        state = load_checkpoint(path)
        missing = [key for key in CHECKPOINT_KEYS if key not in state]
        if missing:
            raise ValueError(f"checkpoint {path} lacks {missing}; it was not written by HybridRAGTrainer")
        saved = TrainingConfig.from_any(state["config"])
        changes = self.config.changes_from(saved)
        if changes:
            listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changes)
            raise ValueError(f"cannot resume from {path}: the config changed in fields that change training "
                             f"({listed}). Resume with the saved values, or start a new run in another output_dir")
        if state["world_size"] != self.world_size:
            raise ValueError(f"cannot resume from {path}: it was written by {state['world_size']} processes, this run "
                             f"has {self.world_size} (the data order and RNG states are per process)")
        mine = self.model.state_dict()
        theirs = state["model"]
        if set(mine) != set(theirs):
            raise ValueError(f"cannot resume from {path}: the model's state keys differ (only in the checkpoint: "
                             f"{sorted(set(theirs) - set(mine))[:5]}, only in the model: "
                             f"{sorted(set(mine) - set(theirs))[:5]})")
        wrong = [(k, tuple(theirs[k].shape), tuple(mine[k].shape)) for k in mine if theirs[k].shape != mine[k].shape]
        if wrong:
            raise ValueError(f"cannot resume from {path}: tensor shapes differ (name, checkpoint, model): {wrong[:5]}")
        groups = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        if groups != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise ValueError(f"cannot resume from {path}: the optimizer's parameter groups differ "
                             f"({groups} parameters per group in the checkpoint)")
        if (state["scaler"] is None) != (self.scaler is None):
            raise ValueError(f"cannot resume from {path}: gradient scaler state mismatch")
        self.model.load_state_dict(theirs)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.rank])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_metric = state["early_stopping"]["best"]
        self.bad_evals = state["early_stopping"]["bad_evals"]

    # -- logs -----------------------------------------------------------------------------------------------------

    def _log(self, record):
        self.history.append(record)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / "log.jsonl").open("a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self, resume_from=None, stop_at_step=None):
        """Train until total_steps (or early stopping, or stop_at_step); a checkpoint is written at the end.

        resume_from: None, a checkpoint path, or "latest" (the highest step in output_dir; an error if none).
        stop_at_step: None, or pause after this optimizer step (> the current step), with a checkpoint.
        Returns {"step", "epoch", "stopped_early", "checkpoint", "best_metric", "last_eval"}.
        """
        if stop_at_step is not None and (isinstance(stop_at_step, bool) or not isinstance(stop_at_step, int)):
            raise TypeError(f"stop_at_step must be None or an int, got {type(stop_at_step).__name__}")
        if resume_from is not None:
            if resume_from == "latest":
                path = latest_checkpoint(self.output_dir)
                if path is None:
                    raise ValueError(f"resume_from='latest' but {self.output_dir} holds no checkpoint-*.pt")
            elif isinstance(resume_from, (str, Path)):
                path = Path(resume_from)
            else:
                raise TypeError(f"resume_from must be None, 'latest' or a path, got {type(resume_from).__name__}")
            self.load_checkpoint(path)
            self._log({"event": "resume", "step": self.step, "checkpoint": str(path)})
        if stop_at_step is not None and stop_at_step <= self.step:
            raise ValueError(f"stop_at_step must be > the current step {self.step}, got {stop_at_step}")
        config = self.config
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (config.progress_bar and self.rank == 0))
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0.0, time.perf_counter()
        stopped_early, last_eval, checkpoint = False, None, None
        self.model.train()
        try:
            while self.step < end and not stopped_early:
                batches = self._epoch_batches(self.epoch)
                group = batches[self.batch_in_epoch:self.batch_in_epoch + config.gradient_accumulation_steps]
                items = [[self.train_dataset[i] for i in indices] for indices in group]
                loss, tokens, grad_norm, lr = self._train_step(items)
                self.step += 1
                self.batch_in_epoch += len(group)
                if self.batch_in_epoch >= len(batches):
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                window_loss, window_steps, window_tokens = window_loss + loss, window_steps + 1, window_tokens + tokens
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if config.passage_refresh_every and self.step % config.passage_refresh_every == 0:
                    self.model.refresh_passages()
                if self.step % config.log_every == 0 or self.step == end:
                    elapsed = time.perf_counter() - window_start
                    self._log({"step": self.step, "epoch": self.epoch, "loss": window_loss / window_steps,
                               "lr": lr, "grad_norm": grad_norm,
                               "tokens_per_second": window_tokens / elapsed if elapsed > 0 else None})
                    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0.0, time.perf_counter()
                if config.eval_every and self.step % config.eval_every == 0:
                    last_eval = self.evaluate()
                    self._log({"step": self.step, **last_eval})
                    stopped_early = self._early_stop(last_eval)
                    if stopped_early:
                        self._log({"event": "early_stop", "step": self.step, "best": self.best_metric})
                if config.save_every and self.step % config.save_every == 0:
                    checkpoint = self.save_checkpoint()
            if checkpoint is None or checkpoint != checkpoint_path(self.output_dir, self.step):
                checkpoint = self.save_checkpoint()
        finally:
            bar.close()
        return {"step": self.step, "epoch": self.epoch, "stopped_early": stopped_early, "checkpoint": str(checkpoint),
                "best_metric": self.best_metric, "last_eval": last_eval}
