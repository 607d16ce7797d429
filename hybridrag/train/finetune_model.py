"""The language model being fine-tuned: a fresh (uncached) load of the base, its adapters, the answer-only loss, and
the saved format that `load_finetuned` reads back.

Saved folder (the run's output_dir): finetune.json ({"format": "hybridrag-finetune", "version": 1, "method",
"base_model" (a folder, or null for the default SmolLM2-135M-Instruct), "int8", "lora": {rank, alpha, dropout,
targets, layers} or null}) and adapter_model.safetensors (LoRA) or model/ (full: save_pretrained and the tokenizer).
"""
import json
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX
from ..nn.lora import apply_lora, load_lora_state_dict, lora_state_dict, merge_lora

__all__ = ["load_base_model", "AnswerLossModel", "save_finetuned", "load_finetuned", "FORMAT"]

FORMAT = "hybridrag-finetune"
ADAPTER_FILE = "adapter_model.safetensors"
MANIFEST = "finetune.json"


def load_base_model(model_path=None, *, int8=False, attn_implementation="sdpa"):
    """A fresh LanguageModel (not the process-wide cached one, which must not be changed in place) from
    `model_path` (a local transformers folder) or the default SmolLM2-135M-Instruct. FileNotFoundError for a
    missing folder; ValueError when the tokenizer's vocabulary does not fit the model's embeddings."""
    from ..system.model import load_language_model
    lm = load_language_model(model_path, attn_implementation=attn_implementation, int8=int8, fresh=True)
    folder = lm.path
    rows = lm.model.get_input_embeddings().num_embeddings
    if len(lm.tokenizer) > rows:
        raise ValueError(f"the tokenizer in {folder} has {len(lm.tokenizer)} tokens but the model's embedding has "
                         f"{rows} rows: tokenizer and model do not match")
    return lm


class AnswerLossModel(nn.Module):
    """Wraps a transformers causal LM for HybridRAGTrainer: forward(input_ids, attention_mask, labels) ->
    {"loss": mean cross-entropy over the label tokens}. The LM head runs only at the positions that predict a label
    token (the answer), not over the whole prompt.

    trainable_state_only: state_dict()/load_state_dict() cover only the parameters that require grad (the
    adapters), so checkpoints stay small; the frozen base is reloaded from its folder."""

    def __init__(self, lm, *, trainable_state_only):
        super().__init__()
        self.lm = lm
        self.trainable_state_only = trainable_state_only

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        return {"loss": F.cross_entropy(logits, targets[keep])}

    def _trainable(self, prefix=""):
        return {prefix + name for name, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if not self.trainable_state_only:
            return state
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        names = self._trainable(prefix)
        return {key: value for key, value in state.items() if key in names}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not self.trainable_state_only:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        names = self._trainable()
        if strict and set(state_dict) != names:
            raise ValueError(f"the state does not hold exactly the trainable parameters: only in the state "
                             f"{sorted(set(state_dict) - names)[:4]}, missing {sorted(names - set(state_dict))[:4]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def save_finetuned(lm, output_dir, *, method, base_model, int8, lora):
    """Write the fine-tuned model into output_dir (the module docstring's layout); the manifest's path."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if method == "lora":
        save_file(lora_state_dict(lm.model), str(output_dir / ADAPTER_FILE))
    else:
        lm.model.save_pretrained(output_dir / "model")
        lm.tokenizer.save_pretrained(output_dir / "model")
    manifest = {"format": FORMAT, "version": 1, "method": method,
                "base_model": None if base_model is None else str(Path(base_model).resolve()),
                "int8": int8, "lora": lora}
    path = output_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def _read_manifest(path):
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{folder} holds no {MANIFEST}: not a folder written by rag-finetune / "
                                "refrag-finetune (or the run has not finished)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON ({error.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != 1:
        raise ValueError(f"{file} is not a {FORMAT} version 1 manifest")
    if manifest.get("method") not in ("lora", "full"):
        raise ValueError(f"{file}: method must be 'lora' or 'full', got {manifest.get('method')!r}")
    return folder, manifest


def load_finetuned(path, *, attn_implementation="hybridrag", merge=False):
    """The fine-tuned model of a rag-finetune / refrag-finetune output folder as a LanguageModel (eval mode, CPU),
    ready for hybridrag.system.generation. merge=True folds LoRA adapters into the base (int8 bases requantized)."""
    from ..system.model import load_language_model
    folder, manifest = _read_manifest(path)
    int8 = bool(manifest["int8"])
    if manifest["method"] == "full":
        lm = load_language_model(folder / "model", attn_implementation=attn_implementation, int8=int8, fresh=True)
        lm.name = folder.name
    else:
        from safetensors.torch import load_file
        lm = load_base_model(manifest["base_model"], int8=int8, attn_implementation=attn_implementation)
        options = manifest["lora"]
        apply_lora(lm.model, rank=options["rank"], alpha=options["alpha"], dropout=0.0, targets=options["targets"],
                   layers=options["layers"])
        load_lora_state_dict(lm.model, load_file(str(folder / ADAPTER_FILE)))
        if merge:
            merge_lora(lm.model)
        lm.name, lm.path = f"{lm.name}+{folder.name}", folder
    lm.model.eval()
    return lm
