"""Continual fine-tuning of a NeuralRetriever on a bounded buffer of new (query, positive) pairs."""
import copy
import math
import re
from collections import Counter, deque
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checked_file import read_checked, state_mismatches, write_checked
from ..nn.common import _check_flag, _check_positive_int
from ..retrieval.neural import NeuralRetriever, _check_number
from .memory import remove_stale_temporaries

FORMAT = 3  # 3: the buffer's source labels
_AUTO_NAME = r"step-\d{8}\.pt"  # the names of automatic checkpoints in checkpoint_dir


def _pad_stack(rows, value):
    """Stack (..., L_i) integer tensors into (n, ..., max L), right-padding the last dim with value."""
    length = max(row.shape[-1] for row in rows)
    return torch.stack([F.pad(row, (0, length - row.shape[-1]), value=value) for row in rows])


class ContinualLearner:
    """Buffers new training pairs and fine-tunes the retriever on them with gradient accumulation and checkpoints.

    - Buffer: the last `buffer_size` examples (query, positive, hard negatives or None). When it is full, each new
      example drops the oldest one; `dropped` counts them (and `observe` returns how many it dropped). All buffered
      examples must agree on having hard negatives, and on their number M. Each example may carry a source label
      (observe's `source`, e.g. "synthetic" for generated pairs): `sources()` counts them, `remove(source)` drops
      them.
    - Sampling: a random permutation of the buffer (a torch.Generator seeded with `seed`) is read batch_size examples
      at a time; when fewer than batch_size remain, or after `observe` changed the buffer, a new permutation is drawn.
      Token inputs of different lengths are right-padded with the retriever's padding_idx.
    - step(): accumulation_steps micro-batches, each `retriever.loss(...) / accumulation_steps` back-propagated, then
      one optimizer step. The loss is a mean over the micro-batch, so with in_batch_negatives=False the accumulated
      gradient equals that of one batch of batch_size * accumulation_steps; with in-batch negatives each query's
      negatives are its own micro-batch's positives (as in any accumulation of a contrastive loss).
    - Inputs must be finite: `observe` refuses a NaN/inf row. A step whose loss or gradient is not finite raises
      FloatingPointError before the optimizer step: parameters and optimizer state are unchanged, the gradients are
      cleared, step_count does not advance; the micro-batches it drew are used up, so a caller may catch it and go on.
    - Checkpoints: model, optimizer (and its class), step, buffer, dropped count and sampler state in one file written
      atomically (a temporary `.{name}.{pid}.{random}.tmp` in the same directory, then os.replace; temporaries of
      killed writers are removed by the next save or load, see `remove_stale_temporaries`). The file is one header
      line `hybridrag.ContinualLearner checkpoint 2 sha256=<64 hex>\\n` followed by the torch.save payload the sha256
      is of. load_checkpoint checks the header, the checksum, the config, the model's parameter names and shapes and
      the optimizer's class and groups before it changes anything, so a failing load leaves the learner as it was; it
      resumes so that the next steps are identical to an uninterrupted run. With checkpoint_dir and checkpoint_every,
      step() saves checkpoint_dir/step-XXXXXXXX.pt every checkpoint_every steps.

    Args:
        retriever: the NeuralRetriever to train.
        optimizer: a torch optimizer over its parameters; default AdamW(retriever.parameters(), lr=lr).
        lr: learning rate of the default optimizer.
        buffer_size, batch_size, accumulation_steps: positive ints.
        hard_negative_ratio, margin, in_batch_negatives: passed to `retriever.loss`.
        checkpoint_dir: folder for automatic checkpoints and save_checkpoint() without a path.
        checkpoint_every: steps between automatic checkpoints (needs checkpoint_dir), or None.
        seed: of the sampler.
    """

    def __init__(self, retriever, *, optimizer=None, lr=1e-3, buffer_size=1024, batch_size=32, accumulation_steps=1,
                 hard_negative_ratio=1.0, margin=0.0, in_batch_negatives=True, checkpoint_dir=None,
                 checkpoint_every=None, seed=0):
        if not isinstance(retriever, NeuralRetriever):
            raise TypeError(f"retriever must be a NeuralRetriever, got {type(retriever).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        _check_number("lr", lr, 0.0)
        for name, value in (("buffer_size", buffer_size), ("batch_size", batch_size),
                            ("accumulation_steps", accumulation_steps)):
            _check_positive_int(name, value)
        if batch_size > buffer_size:
            raise ValueError(f"batch_size ({batch_size}) must not exceed buffer_size ({buffer_size})")
        _check_flag("in_batch_negatives", in_batch_negatives)
        self.loss_options = {"hard_negative_ratio": _check_number("hard_negative_ratio", hard_negative_ratio, 0.0, 1.0),
                             "margin": _check_number("margin", margin, 0.0), "in_batch_negatives": in_batch_negatives}
        if checkpoint_every is not None:
            _check_positive_int("checkpoint_every", checkpoint_every)
            if checkpoint_dir is None:
                raise ValueError(f"checkpoint_every={checkpoint_every} needs a checkpoint_dir")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.retriever = retriever
        self.optimizer = torch.optim.AdamW(retriever.parameters(), lr=lr) if optimizer is None else optimizer
        self.buffer_size, self.batch_size, self.accumulation_steps = buffer_size, batch_size, accumulation_steps
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.buffer = deque(maxlen=buffer_size)
        self._sources = deque(maxlen=buffer_size)  # the source label (str or None) of each buffered example
        self.dropped = 0  # examples pushed out of the full buffer, in total
        self.step_count = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._order, self._cursor = None, 0

    def __len__(self):
        return len(self.buffer)

    def __repr__(self):
        return (f"ContinualLearner(buffered={len(self)}/{self.buffer_size}, batch_size={self.batch_size}, "
                f"accumulation_steps={self.accumulation_steps}, steps={self.step_count}, dropped={self.dropped}, "
                f"checkpoint_dir={None if self.checkpoint_dir is None else str(self.checkpoint_dir)!r})")

    def observe(self, queries, positives, hard_negatives=None, *, source=None):
        """Buffer N examples: queries and positives (N, ...) as `NeuralRetriever.loss` takes them, hard_negatives
        (N, M, ...) or None; source: None or a non-empty str labelling all N (where they came from, so that
        `remove(source)` can take them out again). Returns how many old examples this call dropped (oldest
        first)."""
        _check_source(source)
        retriever = self.retriever
        retriever._check_inputs("queries", queries)
        retriever._check_inputs("positives", positives, rows=queries.shape[0])
        if hard_negatives is not None:
            retriever._check_inputs("hard_negatives", hard_negatives, ndim=3, rows=queries.shape[0])
        if self.buffer:
            held = self.buffer[0][2]
            had = "none" if held is None else f"M={held.shape[0]}"
            got = "none" if hard_negatives is None else f"M={hard_negatives.shape[1]}"
            if had != got:
                raise ValueError(f"hard_negatives must match the buffered examples ({had} hard negatives each), "
                                 f"got {got}")
        if retriever.mode == "tokens" and retriever.padding_idx is None and self.buffer:
            for name, x, held in zip(("queries", "positives", "hard_negatives"), (queries, positives, hard_negatives),
                                     self.buffer[0]):
                if x is not None and held.shape[-1] != x.shape[-1]:
                    raise ValueError(f"{name} has length {x.shape[-1]} but the buffered ones have {held.shape[-1]}; "
                                     "token inputs of different lengths need a retriever with a padding_idx")
        for name, x in (("queries", queries), ("positives", positives), ("hard_negatives", hard_negatives)):
            _check_finite(name, x)
        before = self.dropped
        for i in range(queries.shape[0]):
            if len(self.buffer) == self.buffer_size:
                self.dropped += 1
            # clones: a row view would keep (and a checkpoint would save) the caller's whole tensor
            self.buffer.append((queries[i].detach().clone(), positives[i].detach().clone(),
                                None if hard_negatives is None else hard_negatives[i].detach().clone()))
            self._sources.append(source)
        self._order = None
        return self.dropped - before

    def sources(self):
        """{source label (None for unlabelled): buffered examples with it}."""
        return dict(Counter(self._sources))

    def remove(self, source):
        """Drop every buffered example observed with this source label (a str); returns how many. The sampler
        draws a new permutation next. Removed examples do not count as dropped."""
        _check_source(source)
        if source is None:
            raise ValueError("remove takes the source label (a str) given to observe, got None")
        keep = [i for i, label in enumerate(self._sources) if label != source]
        removed = len(self.buffer) - len(keep)
        if removed:
            self.buffer = deque((self.buffer[i] for i in keep), maxlen=self.buffer_size)
            self._sources = deque((self._sources[i] for i in keep), maxlen=self.buffer_size)
            self._order = None
        return removed

    def _collate(self, indices):
        examples = [self.buffer[i] for i in indices]
        pad = self.retriever.padding_idx if self.retriever.padding_idx is not None else 0
        stack = torch.stack if self.retriever.mode == "features" else lambda rows: _pad_stack(rows, pad)
        queries, positives = stack([e[0] for e in examples]), stack([e[1] for e in examples])
        negatives = None if examples[0][2] is None else stack([e[2] for e in examples])
        return queries, positives, negatives

    def _next_indices(self):
        if self._order is None or self._cursor + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.buffer), generator=self._generator)
            self._cursor = 0
        indices = self._order[self._cursor:self._cursor + self.batch_size].tolist()
        self._cursor += self.batch_size
        return indices

    def step(self):
        """One optimizer step over accumulation_steps micro-batches. Returns {"step", "loss" (mean micro-batch
        loss)}. Needs at least batch_size buffered examples. FloatingPointError, with no step taken, when a loss or
        a gradient is not finite."""
        if len(self.buffer) < self.batch_size:
            raise ValueError(f"the buffer holds {len(self.buffer)} examples, fewer than batch_size "
                             f"({self.batch_size}); observe more first")
        self.retriever.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.accumulation_steps):
            loss = self.retriever.loss(*self._collate(self._next_indices()), **self.loss_options)
            value = loss.item()
            if not math.isfinite(value):
                self._refuse_step(f"the loss of micro-batch {micro} is {value}")
            (loss / self.accumulation_steps).backward()
            total += value
        bad = self._non_finite_gradient()
        if bad is not None:
            self._refuse_step(f"the gradient of {bad} has NaN or inf values")
        self.optimizer.step()
        self.step_count += 1
        if self.checkpoint_every is not None and self.step_count % self.checkpoint_every == 0:
            self.save_checkpoint()
        return {"step": self.step_count, "loss": total / self.accumulation_steps}

    def _non_finite_gradient(self):
        """The name of the first optimised parameter whose gradient is not finite, or None."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or torch.stack([torch.isfinite(g).all() for g in grads]).all():  # one sync
            return None
        names = {id(p): name for name, p in self.retriever.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    return names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
        return None

    def _refuse_step(self, what):
        self.optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"step {self.step_count + 1} refused: {what}; the optimizer step was not taken "
                                 "(parameters and optimizer state unchanged)")

    def train(self, epochs=1):
        """ceil(epochs * len(buffer) / (batch_size * accumulation_steps)) steps. Returns {"steps", "losses" (per
        step), "mean_loss"}."""
        _check_positive_int("epochs", epochs)
        steps = math.ceil(epochs * len(self.buffer) / (self.batch_size * self.accumulation_steps))
        losses = [self.step()["loss"] for _ in range(max(steps, 1))]
        return {"steps": len(losses), "losses": losses, "mean_loss": sum(losses) / len(losses)}

    def _config(self):
        return {"buffer_size": self.buffer_size, "batch_size": self.batch_size,
                "accumulation_steps": self.accumulation_steps}

    def save_checkpoint(self, path=None):
        """Write the full training state to path (default checkpoint_dir/step-XXXXXXXX.pt) atomically; returns the
        Path. Size: the model and optimizer state plus the buffered tensors, plus a 112-byte header."""
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("save_checkpoint needs a path when the learner has no checkpoint_dir")
            path = self.checkpoint_dir / f"step-{self.step_count:08d}.pt"
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.checkpoint_dir, _AUTO_NAME)  # earlier steps' names are not written again
        state = {"format": FORMAT, "config": self._config(), "model": self.retriever.state_dict(),
                 "optimizer_class": _class_name(self.optimizer), "optimizer": self.optimizer.state_dict(),
                 "step": self.step_count, "dropped": self.dropped,
                 "buffer": [list(example) for example in self.buffer], "sources": list(self._sources),
                 "generator": self._generator.get_state(),
                 "order": self._order, "cursor": self._cursor}
        return write_checked(path, "ContinualLearner", FORMAT, state)

    def load_checkpoint(self, path):
        """Restore the state save_checkpoint wrote, all or nothing. The learner's buffer_size, batch_size and
        accumulation_steps must equal the checkpoint's (they decide which examples the next steps draw), and so must
        the retriever's parameter names and shapes and the optimizer's class and groups. FileNotFoundError if path
        is missing; ValueError naming the file if it is not an intact checkpoint or does not fit this learner."""
        path = Path(path)
        remove_stale_temporaries(path.parent, re.escape(path.name))
        state = _read_checkpoint(path, self.retriever.log_temperature.device)
        self._check_checkpoint(path, state)
        generator = torch.Generator()
        try:
            generator.set_state(state["generator"].cpu())
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: the sampler state is not a torch.Generator state: {err}") from None
        model, optimizer = self.retriever.state_dict(), self.optimizer.state_dict()
        model = {name: value.detach().clone() for name, value in model.items()}
        optimizer = copy.deepcopy(optimizer)
        try:
            self.retriever.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except BaseException:  # put back what was there: a load changes all or nothing
            self.retriever.load_state_dict(model)
            self.optimizer.load_state_dict(optimizer)
            raise
        self.step_count, self.dropped = state["step"], state["dropped"]
        self.buffer = deque((tuple(example) for example in state["buffer"]), maxlen=self.buffer_size)
        self._sources = deque(state["sources"], maxlen=self.buffer_size)
        self._generator.set_state(generator.get_state())
        self._order, self._cursor = state["order"], state["cursor"]
        if self._order is not None:
            self._order = self._order.cpu()

    def _check_checkpoint(self, path, state):
        """ValueError naming path unless state is a checkpoint this learner can load in full."""
        for key, value in self._config().items():
            if state["config"].get(key) != value:
                raise ValueError(f"{path}: the checkpoint has {key}={state['config'].get(key)} but this learner has "
                                 f"{value}")
        _check_model_state(path, state["model"], self.retriever)
        mine = _class_name(self.optimizer)
        if state["optimizer_class"] != mine:
            raise ValueError(f"{path}: the checkpoint holds the state of a {state['optimizer_class']} optimizer but "
                             f"this learner's optimizer is a {mine}")
        _check_optimizer_state(path, state["optimizer"], self.optimizer)
        for name in ("step", "dropped", "cursor"):
            if isinstance(state[name], bool) or not isinstance(state[name], int) or state[name] < 0:
                raise ValueError(f"{path}: {name} must be an int >= 0, got {state[name]!r}")
        if state["order"] is not None and not isinstance(state["order"], torch.Tensor):
            raise ValueError(f"{path}: the sampler order must be a tensor or None, got {type(state['order']).__name__}")
        buffer = state["buffer"]
        if not isinstance(buffer, list) or len(buffer) > self.buffer_size or not all(
                isinstance(e, list) and len(e) == 3 and isinstance(e[0], torch.Tensor)
                and isinstance(e[1], torch.Tensor) and (e[2] is None or isinstance(e[2], torch.Tensor))
                for e in buffer):
            raise ValueError(f"{path}: the buffer must be a list of at most {self.buffer_size} [query, positive, "
                             "hard negatives or None] tensor triples")
        sources = state["sources"]
        if not isinstance(sources, list) or len(sources) != len(buffer) or not all(
                s is None or (isinstance(s, str) and s) for s in sources):
            raise ValueError(f"{path}: sources must be a list of {len(buffer)} labels (None or a non-empty str), one "
                             "per buffered example")


def _check_source(source):
    if source is not None and not isinstance(source, str):
        raise TypeError(f"source must be None or a str, got {type(source).__name__}")
    if source == "":
        raise ValueError("source must be a non-empty str or None, got ''")


def _check_finite(name, x):
    """ValueError naming the first row (of dim 0) of a float tensor x that holds NaN or inf; ints always pass."""
    if x is None or not x.dtype.is_floating_point:
        return
    finite = torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)  # [N]
    if not finite.all():
        row = int(torch.nonzero(~finite)[0, 0])
        raise ValueError(f"{name} row {row} has NaN or inf values; every buffered example must be finite")


def _class_name(optimizer):
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _read_checkpoint(path, device):
    """The state dict in the checkpoint file at path, after checking its header and checksum."""
    keys = ("format", "config", "model", "optimizer_class", "optimizer", "step", "dropped", "buffer", "sources",
            "generator", "order", "cursor")
    state = read_checked(path, "ContinualLearner", FORMAT, keys, device)
    if not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise ValueError(f"{path}: config and model must be dicts")
    return state


def _check_model_state(path, saved, retriever):
    """ValueError unless saved has exactly the retriever's state names, each a tensor of the same shape."""
    parts = state_mismatches(saved, retriever.state_dict(), dtypes=False)
    if parts:
        raise ValueError(f"{path}: the checkpoint's model does not match this learner's retriever: "
                         f"{'; '.join(parts)}")


def _check_optimizer_state(path, saved, optimizer):
    """ValueError unless saved has the optimizer's group sizes and per-parameter state tensors of its shapes."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or \
            not isinstance(saved.get("state"), dict):
        raise ValueError(f"{path}: the optimizer state must be a dict with 'state' and 'param_groups'")
    mine = [len(group["params"]) for group in optimizer.param_groups]
    theirs = [len(group.get("params", ())) if isinstance(group, dict) else None for group in saved["param_groups"]]
    if mine != theirs:
        raise ValueError(f"{path}: the checkpoint's optimizer has parameter groups of sizes {theirs} but this "
                         f"learner's has {mine}")
    shapes = {}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        shapes.update(zip(saved_group["params"], (tuple(p.shape) for p in group["params"])))
    for index, entries in saved["state"].items():
        for name, value in (entries.items() if isinstance(entries, dict) else ()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes.get(index):
                raise ValueError(f"{path}: the optimizer's {name} of parameter {index} has shape "
                                 f"{tuple(value.shape)} but the parameter has {shapes.get(index)}")
