"""hybridrag.train.TrainingConfig: every field's validation, nested sections, JSON/YAML round trips, and which
changes a resumed run refuses."""
import json

import pytest

from hybridrag.system.config import AttentionConfig, RetrieverConfig
from hybridrag.train import TrainingConfig

BAD = [
    ("learning_rate", 0.0, r"learning_rate must be a finite number in \(0.0, inf\], got 0.0"),
    ("learning_rate", float("nan"), r"learning_rate must be a finite number"),
    ("learning_rate", "1e-3", r"learning_rate must be a finite number .* got '1e-3'"),
    ("weight_decay", -0.1, r"weight_decay must be a finite number in \[0.0, inf\], got -0.1"),
    ("adam_betas", (0.9,), r"adam_betas must be two numbers in \[0, 1\), got \(0.9,\)"),
    ("adam_betas", (0.9, 1.0), r"adam_betas must be two numbers in \[0, 1\)"),
    ("adam_eps", 0, r"adam_eps must be a finite number in \(0.0, inf\], got 0"),
    ("batch_size", 0, r"batch_size must be an int >= 1, got 0"),
    ("batch_size", 2.0, r"batch_size must be an int >= 1, got 2.0"),
    ("epochs", 0, r"epochs must be an int >= 1 or None, got 0"),
    ("max_steps", True, r"max_steps must be an int >= 1 or None, got True"),
    ("gradient_accumulation_steps", 0, r"gradient_accumulation_steps must be an int >= 1, got 0"),
    ("warmup_steps", -1, r"warmup_steps must be an int >= 0, got -1"),
    ("schedule", "step", r"schedule must be one of 'linear', 'cosine', 'constant', got 'step'"),
    ("max_grad_norm", 0.0, r"max_grad_norm must be a finite number in \(0.0, inf\] or None, got 0.0"),
    ("loss_normalization", "mean", r"loss_normalization must be one of 'tokens', 'examples', got 'mean'"),
    ("mixed_precision", "fp8", r"mixed_precision must be one of 'no', 'bf16', 'fp16', got 'fp8'"),
    ("mixed_precision", "fp16", r"mixed_precision='fp16' needs a CUDA device .* on device='cpu' use 'bf16' or 'no'"),
    ("gradient_checkpointing", 1, r"gradient_checkpointing must be True or False, got 1"),
    ("eval_every", 0, r"eval_every must be an int >= 1 or None, got 0"),
    ("save_every", -5, r"save_every must be an int >= 1 or None, got -5"),
    ("log_every", None, r"log_every must be an int >= 1, got None"),
    ("early_stopping_patience", 2, r"early_stopping_patience=2 needs eval_every .* got eval_every=None"),
    ("early_stopping_metric", "", r"early_stopping_metric must be a non-empty str, got ''"),
    ("early_stopping_mode", "lower", r"early_stopping_mode must be one of 'min', 'max', got 'lower'"),
    ("early_stopping_min_delta", -1, r"early_stopping_min_delta must be a finite number in \[0.0, inf\]"),
    ("output_dir", "", r"output_dir must be a path \(non-empty str\), got ''"),
    ("seed", 1.5, r"seed must be an int, got 1.5"),
    ("shuffle", "yes", r"shuffle must be True or False, got 'yes'"),
    ("device", "gpu", r"device must be 'cpu', 'cuda' or 'cuda:<n>', got 'gpu'"),
    ("passage_refresh_every", 0, r"passage_refresh_every must be an int >= 1 or None, got 0"),
    ("attention", [1], r"attention must be a dict or a AttentionConfig, got list"),
]


@pytest.mark.parametrize("name, value, message", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_every_field_is_checked_with_a_message_naming_it(name, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TrainingConfig(**{name: value})


def test_epochs_and_max_steps_cannot_both_be_unbounded():
    with pytest.raises(ValueError, match="epochs and max_steps are both None"):
        TrainingConfig(epochs=None)
    assert TrainingConfig(epochs=None, max_steps=5).max_steps == 5


def test_nested_sections_are_the_system_configs_and_are_checked_there():
    config = TrainingConfig(attention={"window_size": 64}, retriever={"top_k": 2})
    assert isinstance(config.attention, AttentionConfig) and config.attention.window_size == 64
    assert isinstance(config.retriever, RetrieverConfig) and config.retriever.top_k == 2
    with pytest.raises(ValueError, match=r"attention.window_size must be an int >= 1 or -1, got 0"):
        TrainingConfig(attention={"window_size": 0})
    with pytest.raises(ValueError, match=r"retriever: unknown keys \['topk'\]"):
        TrainingConfig(retriever={"topk": 2})


def test_json_and_yaml_round_trip_and_unknown_keys_are_refused(tmp_path):
    config = TrainingConfig(learning_rate=3e-4, max_steps=10, schedule="cosine", adam_betas=(0.8, 0.95),
                            attention={"window_size": 32})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config.to_dict()))
    assert TrainingConfig.from_any(path) == config
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("learning_rate: 0.0003\nmax_steps: 10\nschedule: cosine\nadam_betas: [0.8, 0.95]\n"
                         "attention:\n  window_size: 32\n")
    assert TrainingConfig.from_any(yaml_path) == config
    with pytest.raises(ValueError, match=r"config: unknown keys \['lr'\]; known keys of TrainingConfig"):
        TrainingConfig.from_any({"lr": 1e-3})
    with pytest.raises(TypeError, match="config must be None, a TrainingConfig, a dict or a path"):
        TrainingConfig.from_any(3)


def test_resume_relevant_changes_list_field_old_and_new():
    old = TrainingConfig(learning_rate=1e-3, output_dir="a", log_every=5)
    new = TrainingConfig(learning_rate=2e-3, output_dir="b", log_every=1, attention={"window_size": 8})
    changes = new.changes_from(old)
    assert [name for name, _, _ in changes] == ["attention", "learning_rate"]
    assert changes[1] == ("learning_rate", 1e-3, 2e-3)
