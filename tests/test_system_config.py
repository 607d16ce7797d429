"""hybridrag.system.config: every field's validation, reading dicts and JSON/YAML files, round trips, and the checks
against the language model and the encoder."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from hybridrag.system.config import AttentionConfig, GenerationConfig, RetrieverConfig, SystemConfig

ATTENTION_BAD = [
    ("window_size", 0, r"attention.window_size must be an int >= 1 or -1, got 0"),
    ("window_size", -2, r"attention.window_size must be an int >= 1 or -1, got -2"),
    ("window_size", 2.0, r"attention.window_size must be an int >= 1 or -1, got 2.0"),
    ("window_size", True, r"attention.window_size must be an int >= 1 or -1, got True"),
    ("window_overlap", -1, r"attention.window_overlap must be an int >= 0, got -1"),
    ("window_overlap", 200, r"attention.window_overlap must be < attention.segment_length=200, got 200"),
    ("num_landmark_tokens", -1, r"attention.num_landmark_tokens must be an int >= 0, got -1"),
    ("landmark_stride", 0, r"attention.landmark_stride must be an int >= 1 or None, got 0"),
    ("landmark_stride", "8", r"attention.landmark_stride must be an int >= 1 or None, got '8'"),
    ("global_attention_heads", [0, 1], r"per-head global attention is not supported"),
    ("global_attention_heads", 0, r"one pattern to every head"),
    ("max_retrieved_segments", 0, r"attention.max_retrieved_segments must be an int >= 1, got 0"),
    ("segment_length", 15, r"attention.segment_length must be an int >= 16, got 15"),
    ("hidden_size", 0, r"attention.hidden_size must be an int >= 1 or None, got 0"),
    ("num_attention_heads", 1.5, r"attention.num_attention_heads must be an int >= 1 or None, got 1.5"),
    ("dropout", 0.1, r"attention.dropout must be 0.0: dropout applies to training \(hybridrag.train\), not to "
                     r"answering; got 0.1"),
    ("dropout", "0", r"attention.dropout must be 0.0"),
]
RETRIEVER_BAD = [
    ("query_embed_dim", 0, r"retriever.query_embed_dim must be an int >= 1 or None, got 0"),
    ("doc_embed_dim", "384", r"retriever.doc_embed_dim must be an int >= 1 or None, got '384'"),
    ("hidden_dim", 256, r"retriever.hidden_dim configures training of the neural retriever, which this system does "
                        r"not run"),
    ("contrastive_margin", 0.1, r"retriever.contrastive_margin configures training"),
    ("hard_negative_ratio", 1.0, r"retriever.hard_negative_ratio configures training"),
    ("retrieval_temperature", 0.05, r"retriever.retrieval_temperature configures training"),
    ("num_candidates", 0, r"retriever.num_candidates must be an int >= 1, got 0"),
    ("top_k", 0, r"retriever.top_k must be an int >= 1, got 0"),
    ("top_k", None, r"retriever.top_k must be an int >= 1, got None"),
    ("mode", "sparse", r"retriever.mode must be one of 'hybrid', 'dense', 'bm25', got 'sparse'"),
]
GENERATION_BAD = [
    ("max_new_tokens", 0, r"generation.max_new_tokens must be an int >= 1, got 0"),
    ("temperature", -0.1, r"generation.temperature must be a finite number >= 0 \(0 = greedy\), got -0.1"),
    ("temperature", float("inf"), r"generation.temperature must be a finite number"),
    ("temperature", float("nan"), r"generation.temperature must be a finite number"),
    ("top_p", 0.0, r"generation.top_p must be a number in \(0, 1\], got 0.0"),
    ("top_p", 1.5, r"generation.top_p must be a number in \(0, 1\], got 1.5"),
    ("seed", 1.0, r"generation.seed must be an int, got 1.0"),
    ("seed", False, r"generation.seed must be an int, got False"),
]
SYSTEM_BAD = [
    ("attn_implementation", "flash", r"attn_implementation must be one of 'hybridrag', 'sdpa', 'eager', got 'flash'"),
    ("int8", 1, r"int8 must be True or False, got 1"),
    ("encoder", "", r"encoder must be 'minilm', 'hashing-<dim>' or a local sentence-transformers folder, got ''"),
    ("encoder", "hashing-1", r"encoder 'hashing-1': the hashing encoder's dimension must be an int >= 2"),
    ("encoder", "hashing-x", r"encoder 'hashing-x'"),
    ("encoder", "minilm2", r"got 'minilm2', which is not a folder"),
    ("encoder", "hybrid-encoder:/no/such.pt", r"encoder 'hybrid-encoder:/no/such.pt': no HybridEncoder checkpoint"),
    ("index_kind", "annoy", r"index_kind must be one of 'auto', 'flat', 'ivf', 'hnsw', got 'annoy'"),
    ("passage_cache", "yes", r"passage_cache must be True or False, got 'yes'"),
    ("passage_cache_size", 0, r"passage_cache_size must be an int >= 1, got 0"),
    ("passage_cache_bytes", 0, r"passage_cache_bytes must be an int >= 1 or None, got 0"),
    ("passage_cache_storage", "fp8", r"passage_cache_storage must be one of 'model', 'float16', 'bfloat16', "
                                     r"'int8', got 'fp8'"),
    ("passage_cache_policy", "fifo", r"passage_cache_policy must be one of 'lru', 'lfu', 'importance', got 'fifo'"),
    ("precompute_passages", 1, r"precompute_passages must be True or False, got 1"),
    ("attention_feedback", "no", r"attention_feedback must be True or False, got 'no'"),
    ("recompute_tokens", -1, r"recompute_tokens must be an int >= 0, got -1"),
    ("recompute_tokens", 2.5, r"recompute_tokens must be an int >= 0, got 2.5"),
    ("drop_unattended", 1.0, r"drop_unattended must be None or a share in \(0, 1\), got 1.0"),
    ("drop_unattended", True, r"drop_unattended must be None or a share in \(0, 1\), got True"),
    ("device", "gpu", r"device must be 'cpu', 'cuda' or 'cuda:<n>', got 'gpu'"),
    ("model_path", "/no/such/model", r"model_path must be None .* got '/no/such/model', which is not a folder"),
    ("model_path", 3, r"model_path must be None or a path \(str\), got 3"),
    ("cache_dir", 3, r"cache_dir must be None or a path \(str\), got 3"),
    ("attention", 3, r"attention must be a dict or a AttentionConfig, got int"),
]


@pytest.mark.parametrize("field, value, message", ATTENTION_BAD)
def test_attention_fields_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", RETRIEVER_BAD)
def test_retriever_fields_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        RetrieverConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", GENERATION_BAD)
def test_generation_fields_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", SYSTEM_BAD)
def test_system_fields_are_checked(field, value, message):
    with pytest.raises((TypeError, ValueError), match=message):
        SystemConfig(**{field: value})


def test_defaults():
    config = SystemConfig()
    assert config.attention == AttentionConfig(window_size=256, window_overlap=32, num_landmark_tokens=4,
                                               landmark_stride=None, max_retrieved_segments=8, segment_length=200)
    assert (config.retriever.num_candidates, config.retriever.top_k, config.retriever.mode) == (50, 4, "hybrid")
    assert config.generation == GenerationConfig(max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0)
    assert (config.model_path, config.cache_dir, config.attn_implementation, config.int8) == (None, None,
                                                                                           "hybridrag", False)
    assert (config.encoder, config.index_kind, config.passage_cache, config.passage_cache_size, config.device) == \
        ("minilm", "auto", True, 256, "cpu")
    assert (config.passage_cache_bytes, config.passage_cache_storage, config.passage_cache_policy,
            config.precompute_passages, config.attention_feedback, config.recompute_tokens, config.drop_unattended) == \
        (2 ** 30, "model", "lru", False, False, 48, None)


def test_accepted_edge_values(tmp_path):
    attention = AttentionConfig(window_size=-1, window_overlap=15, num_landmark_tokens=0, landmark_stride=1,
                                segment_length=16, hidden_size=576, num_attention_heads=9, dropout=0)
    assert attention.dropout == 0.0 and isinstance(attention.dropout, float)
    generation = GenerationConfig(temperature=1, top_p=1)
    assert isinstance(generation.temperature, float) and isinstance(generation.top_p, float)
    config = SystemConfig(encoder="hashing-64", device="cuda:1", model_path=tmp_path, cache_dir=tmp_path / "c",
                          attn_implementation="eager", int8=True, index_kind="hnsw", passage_cache=False,
                          passage_cache_size=1, passage_cache_bytes=None, passage_cache_storage="int8",
                          passage_cache_policy="importance", attention_feedback=True, drop_unattended=0.5,
                          recompute_tokens=0)
    assert config.model_path == str(tmp_path) and config.cache_dir == str(tmp_path / "c")
    assert SystemConfig(encoder=str(tmp_path)).encoder == str(tmp_path)
    assert SystemConfig(encoder=tmp_path).encoder == str(tmp_path)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        AttentionConfig(window=3)


def test_from_any_none_instance_and_dict():
    assert SystemConfig.from_any(None) == SystemConfig()
    config = SystemConfig(int8=True)
    assert SystemConfig.from_any(config) is config
    built = SystemConfig.from_any({"attention": {"window_size": 64}, "retriever": {"mode": "bm25"},
                                   "generation": {"max_new_tokens": 8}, "encoder": "hashing-32"})
    assert built.attention.window_size == 64 and built.attention.segment_length == 200
    assert built.retriever.mode == "bm25" and built.generation.max_new_tokens == 8 and built.encoder == "hashing-32"
    assert SystemConfig.from_any({"attention": AttentionConfig(window_size=8)}).attention.window_size == 8


def test_from_any_refuses_unknown_keys_listing_them_and_the_known_ones():
    with pytest.raises(ValueError, match=r"config: unknown keys \['temperatur', 'top'\]; known keys of "
                                         r"SystemConfig: \['attention', 'retriever'"):
        SystemConfig.from_any({"top": 1, "temperatur": 0.5})
    with pytest.raises(ValueError, match=r"attention: unknown keys \['window'\]; known keys of AttentionConfig: "
                                         r"\['window_size', 'window_overlap'"):
        SystemConfig.from_any({"attention": {"window": 3}})
    with pytest.raises(ValueError, match=r"generation: unknown keys \['1'\]"):
        SystemConfig.from_any({"generation": {1: 2}})


def test_from_any_refuses_other_types():
    with pytest.raises(TypeError, match="config must be None, a SystemConfig, a dict or a path"):
        SystemConfig.from_any(3)
    with pytest.raises(TypeError, match="retriever must be a dict"):
        SystemConfig.from_any({"retriever": [1]})


def test_round_trip_is_json(tmp_path):
    config = SystemConfig(attention={"window_size": -1, "landmark_stride": 16, "hidden_size": 576},
                          retriever={"top_k": 2, "doc_embed_dim": 384}, generation={"temperature": 0.7, "seed": 3},
                          model_path=str(tmp_path), encoder="hashing-128", device="cuda")
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert SystemConfig.from_any(data) == config
    assert SystemConfig.from_any(json.loads(json.dumps(data))) == config
    assert SystemConfig.from_any(SystemConfig().to_dict()) == SystemConfig()


def test_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"retriever": {"top_k": 7}, "device": "cuda"}), encoding="utf-8")
    config = SystemConfig.from_any(path)
    assert config.retriever.top_k == 7 and config.device == "cuda"
    assert SystemConfig.from_any(str(path)) == config


def test_yaml_files(tmp_path):
    text = "attention:\n  window_size: 128\n  landmark_stride: 32\ngeneration:\n  top_p: 0.9\nint8: true\n"
    for name in ("config.yaml", "config.yml"):
        (tmp_path / name).write_text(text, encoding="utf-8")
        config = SystemConfig.from_any(tmp_path / name)
        assert (config.attention.window_size, config.attention.landmark_stride) == (128, 32)
        assert config.generation.top_p == 0.9 and config.int8 is True
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    assert SystemConfig.from_any(tmp_path / "empty.yaml") == SystemConfig()


def test_file_round_trip(tmp_path):
    config = SystemConfig(retriever={"mode": "dense", "num_candidates": 9}, passage_cache_size=3)
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()), encoding="utf-8")
    assert SystemConfig.from_any(tmp_path / "c.json") == config
    yaml = pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    assert SystemConfig.from_any(tmp_path / "c.yaml") == config


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "absent.yaml"
    with pytest.raises(FileNotFoundError, match="no such config file: .*absent.yaml"):
        SystemConfig.from_any(missing)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"int8": tru', encoding="utf-8")
    with pytest.raises(ValueError, match=r"config file .*bad.json: not valid JSON"):
        SystemConfig.from_any(bad_json)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("attention: [1, 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"config file .*bad.yaml: not valid YAML"):
        SystemConfig.from_any(bad_yaml)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"config file .*list.yaml must hold a mapping of field names, got list"):
        SystemConfig.from_any(listed)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"encoder": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"config file .*latin.json: not valid UTF-8"):
        SystemConfig.from_any(latin)
    with pytest.raises(ValueError, match=r"config file .*config.toml must end in .json, .yaml or .yml"):
        SystemConfig.from_any(tmp_path / "config.toml")
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"retriever": {"k": 3}}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"retriever: unknown keys \['k'\]"):
        SystemConfig.from_any(unknown)
    invalid = tmp_path / "invalid.yml"
    invalid.write_text("retriever:\n  top_k: 0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"retriever.top_k must be an int >= 1, got 0"):
        SystemConfig.from_any(invalid)


def test_check_against_model():
    smollm = SimpleNamespace(hidden_size=576, num_attention_heads=9)
    assert AttentionConfig().check_against_model(smollm) is not None
    AttentionConfig(hidden_size=576, num_attention_heads=9).check_against_model(smollm)
    AttentionConfig(hidden_size=576).check_against_model({"hidden_size": 576, "num_attention_heads": 9})
    with pytest.raises(ValueError, match=r"attention.hidden_size is 512 but the language model's hidden_size is 576"):
        AttentionConfig(hidden_size=512).check_against_model(smollm)
    with pytest.raises(ValueError, match=r"attention.num_attention_heads is 8 but the language model's "
                                         r"num_attention_heads is 9"):
        AttentionConfig(num_attention_heads=8).check_against_model(smollm)
    with pytest.raises(ValueError, match=r"attention.hidden_size is 576 but the model config has no hidden_size"):
        AttentionConfig(hidden_size=576).check_against_model(SimpleNamespace())


def test_check_against_model_with_a_transformers_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                      intermediate_size=128)
    AttentionConfig(hidden_size=64, num_attention_heads=4).check_against_model(config)
    with pytest.raises(ValueError, match="language model's num_attention_heads is 4"):
        AttentionConfig(num_attention_heads=9).check_against_model(config)


def test_check_against_encoder():
    assert RetrieverConfig().check_against_encoder(384) is not None
    RetrieverConfig(query_embed_dim=384, doc_embed_dim=384).check_against_encoder(384)
    with pytest.raises(ValueError, match=r"retriever.query_embed_dim is 256 but the encoder's dimension is 384"):
        RetrieverConfig(query_embed_dim=256).check_against_encoder(384)
    with pytest.raises(ValueError, match=r"retriever.doc_embed_dim is 128 but the encoder's dimension is 384"):
        RetrieverConfig(doc_embed_dim=128).check_against_encoder(384)


def test_package_exports_the_config_classes():
    import hybridrag.system as system

    assert system.SystemConfig is SystemConfig and system.AttentionConfig is AttentionConfig
    assert system.RetrieverConfig is RetrieverConfig and system.GenerationConfig is GenerationConfig
    assert Path(system.__file__).parent.joinpath("config.py").is_file()


def test_precomputing_passages_needs_the_passage_cache():
    with pytest.raises(ValueError, match="precompute_passages=True needs passage_cache=True"):
        SystemConfig(precompute_passages=True, passage_cache=False)
