"""hybridrag.pipeline: HybridRAGPipeline.query for both use_hybrid values (answer and sources), the vector store
adapter's explicit fallback and its generated documents, real-time queries through the StreamProcessor, a cascade of
system answers, default_config through JSON and YAML, and bad input.

The system runs a random 2-layer Llama (hidden 64) with SmolLM2's tokenizer on attn_implementation="hybridrag", the
hashing encoder, and a tiny HybridEncoder over the bundled all-MiniLM-L6-v2 tokenizer: answers are noise, and the
file runs in seconds on a busy CPU."""
import asyncio
import json
import logging
import pathlib

import pytest
import torch
import yaml
from pydoc_data.topics import topics

from hybridrag.distillation import SystemAnswerer, TeacherStudentCascade
from hybridrag.encoders import HybridEncoder, HybridEncoderConfig
from hybridrag.pipeline import HybridRAGConfig, HybridRAGPipeline, HybridVectorStoreAdapter, default_config
from hybridrag.retention import RetentionConfig
from hybridrag.retrieval import Document, HashingEncoder, KnowledgeBase
from hybridrag.streaming import StreamError, StreamingConfig
from hybridrag.system import HybridRAGSystem, create_hybrid_rag_system, load_language_model
from hybridrag.system.model import LanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")

TOPICS = ["assert", "for", "while", "if", "try", "with", "pass", "global"]
QUESTION = "Which exception does an assert statement raise when its condition is false?"
CONFIG = {"encoder": "hashing-256", "retriever": {"top_k": 3}, "generation": {"max_new_tokens": 4},
          "attention": {"segment_length": 64, "window_overlap": 8}}
ENCODER = dict(vocab_size=30522, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, window_size=4,
               output_dim=24, max_length=256, dropout=0.0)


@pytest.fixture(scope="module")
def language_model():
    """A random tiny Llama with SmolLM2-135M-Instruct's tokenizer (and chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridrag.integrations.transformers import register

    register()
    tokenizer = load_language_model().tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         attn_implementation="hybridrag", tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    return LanguageModel(model=model, tokenizer=tokenizer, name="tiny-llama", path=pathlib.Path("tiny-llama"),
                         attn_implementation="hybridrag", int8=False, dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def system(language_model):
    system = create_hybrid_rag_system(CONFIG, language_model=language_model)
    system.create_vectorstore([Document(name, topics[name], name) for name in TOPICS])
    return system


@pytest.fixture(scope="module")
def encoder():
    return HybridEncoder(ENCODER).eval()


@pytest.fixture(scope="module")
def pipeline(system, encoder):
    return HybridRAGPipeline(system, encoder, use_hybrid=True)


def _check_result(out, method, k):
    assert set(out) >= {"answer", "sources", "method", "encoder", "timings", "citations", "success"}
    assert isinstance(out["answer"], str) and out["method"] == method
    assert len(out["sources"]) == k
    for source in out["sources"]:
        assert set(source) == {"id", "text", "score", "attention_mass"}
        assert source["attention_mass"] is not None and source["attention_mass"] >= 0
    assert set(out["timings"]) == {"retrieve", "passages", "prefill", "first_token", "decode", "total"}
    assert out["timings"]["total"] >= out["timings"]["retrieve"] >= 0


def test_query_answers_with_sources_for_both_use_hybrid_values(system, encoder, pipeline):
    hybrid = pipeline.query(QUESTION, top_k=2)
    _check_result(hybrid, "hybrid", 2)
    assert hybrid["encoder"] == pipeline.vector_store.encoder.name and hybrid["encoder"].startswith("HybridEncoder-")
    expected = pipeline.vector_store.search(QUESTION, 2, system.config.retriever.mode)
    assert [s["id"] for s in hybrid["sources"]] == [h.document.id for h in expected]
    base = HybridRAGPipeline(system, encoder, use_hybrid=False).query(QUESTION)
    _check_result(base, "base_rag", 3)
    assert base["encoder"] == "hashing-256"
    assert [s["id"] for s in base["sources"]] == [h.document.id for h in system.retrieve(QUESTION)]
    # per call, and without a hybrid encoder: the system's own retrieval with its hybrid method
    assert pipeline.query(QUESTION, 1, use_hybrid=False)["method"] == "base_rag"
    plain = HybridRAGPipeline(system).query(QUESTION, top_k=2)
    _check_result(plain, "hybrid", 2)
    assert plain["encoder"] == "hashing-256"


def test_the_adapters_fallback_is_explicit(system, encoder, caplog):
    kb = system.knowledge_base
    with caplog.at_level(logging.WARNING, logger="hybridrag.pipeline.vector_store"):
        fallback = HybridVectorStoreAdapter(kb)
    assert "using the knowledge base's own encoder 'hashing-256'" in caplog.text
    assert "no hybrid_encoder was given" in caplog.text
    assert fallback.using_fallback and fallback.describe()["fallback_reason"] == "no hybrid_encoder was given"
    assert fallback.embed(["a text"]).shape == (1, 256) and fallback.encoder.name == "hashing-256"
    hybrid = HybridVectorStoreAdapter(kb, encoder)
    assert not hybrid.using_fallback and hybrid.fallback_reason is None
    assert hybrid.embed(["a text"]).shape == (1, 24)
    assert hybrid.embed(["a text"], use_hybrid=False).shape == (1, 256)  # the original, asked for explicitly
    assert len(hybrid.knowledge_base) == len(kb) and hybrid.knowledge_base is not kb
    assert [h.document.id for h in hybrid.search(QUESTION, 3, "dense", use_hybrid=False)] == \
        [h.document.id for h in kb.search(QUESTION, 3, "dense")]
    with pytest.raises(ValueError, match="fallback_encoder makes 128-dim vectors but the knowledge base holds 256"):
        HybridVectorStoreAdapter(kb, encoder, fallback_encoder=HashingEncoder(128))
    other = HashingEncoder(256)
    other.name = "another-256"
    with pytest.raises(ValueError, match="fallback_encoder is 'another-256' but the knowledge base was built with"):
        HybridVectorStoreAdapter(kb, encoder, fallback_encoder=other)
    with pytest.raises(TypeError, match="knowledge_base must be a hybridrag.retrieval.KnowledgeBase"):
        HybridVectorStoreAdapter([], encoder)


def test_generated_documents_are_flagged_listable_and_removable(encoder):
    kb = KnowledgeBase.build([Document(name, topics[name][:800], name) for name in TOPICS[:4]], HashingEncoder(64))
    store = HybridVectorStoreAdapter(kb, encoder)
    ids = store.add_generated(["zebras assert loudly in synthetic text", "a generated note on quokkas"],
                              {"source": "diffusion"})
    assert ids == ["generated-0", "generated-1"] and store.generated() == ids
    assert kb.get("generated-0").metadata == {"source": "diffusion", "synthetic": True}
    for side in (True, False):  # both indexes hold them
        assert store.search("quokkas", 1, "bm25", use_hybrid=side)[0].document.id == "generated-1"
    more = store.add_generated(["third"], [{"n": 3}])
    assert more == ["generated-2"] and len(store) == 7 and len(store.hybrid) == 7
    with pytest.raises(ValueError, match=r"not generated documents of this store .*\['assert'\]"):
        store.remove_generated(["assert", "generated-0"])
    assert store.remove_generated(["generated-0"]) == 1 and store.generated() == ["generated-1", "generated-2"]
    assert store.remove_generated() == 2 and store.generated() == [] and len(store.hybrid) == len(kb) == 4
    with pytest.raises(ValueError, match="metadata has 1 entries but texts has 2"):
        store.add_generated(["a", "b"], [{}])
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        store.add_generated(["a", " "])
    with pytest.raises(ValueError, match="texts is empty"):
        store.add_generated([])
    kb.add([Document("behind", "added to the original directly")])
    assert store.refresh() == {"added": 1, "removed": 0} and "behind" in store.hybrid


def test_real_time_queries_through_the_stream_processor(pipeline):
    results = pipeline.stream_queries([QUESTION, ("user", "What does pass do?"), ("user", " "),
                                       ("user", "Is this refused?")], top_k=1, streaming={"max_pending": 2,
                                                                                         "batch_size": 2})
    by_stream = {}
    for stream_id, index, output in results:
        by_stream.setdefault(stream_id, []).append((index, output))
    assert [i for i, _ in by_stream[0]] == [0] and by_stream[0][0][1]["method"] == "hybrid"
    assert [i for i, _ in by_stream["user"]] == [0, 1, 2]
    first, bad, refused = (output for _, output in by_stream["user"])
    assert len(first["sources"]) == 1
    assert isinstance(bad, StreamError) and "query is empty" in str(bad.error)
    assert isinstance(refused, StreamError) and refused.failed_index == 1  # the failed stream's later queries
    with pytest.raises(TypeError, match="got a single str"):
        pipeline.stream_queries(QUESTION)
    with pytest.raises(TypeError, match=r"a str or a \(stream_id, str\) pair"):
        pipeline.stream_queries([42])


def test_a_reader_that_stops_early_leaves_nothing_running(pipeline):
    answered = []

    async def arriving():  # queries that arrive over time, from two users
        for i in range(6):
            yield (i % 2, f"What does the statement number {i} do?")
            await asyncio.sleep(0)

    async def first_two():
        async with asyncio.timeout(60):
            stream = pipeline.astream_queries(arriving(), top_k=1, streaming={"max_pending": 2, "batch_size": 1})
            async for item in stream:
                answered.append(item)
                if len(answered) == 2:
                    break
            await stream.aclose()
        return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    left = asyncio.run(first_two())
    assert left == [] and len(answered) == 2 and all(isinstance(out, dict) for _, _, out in answered)


def test_a_cascade_of_system_answers(system):
    student = SystemAnswerer(system, method="base_rag", top_k=1)
    teacher = SystemAnswerer(system, method="hybrid")
    out = student.answer(QUESTION)
    assert len(out["response"]["passages"]) == 1 and len(out["scores"]) == 2
    cascade = TeacherStudentCascade(student, teacher, measure="margin")
    report = cascade.calibrate([QUESTION, "What does the with statement do?"], target_agreement=0.5)
    result = cascade(QUESTION)
    assert result["answered_by"] == ("student" if result["confidence"] >= report["threshold"] else "teacher")
    assert cascade.stats()["queries"] == 1
    attention = SystemAnswerer(system, attention=True).answer(QUESTION)
    assert 0 <= attention["attention_quality"] <= 1
    with pytest.raises(ValueError, match="method='direct' has none"):
        SystemAnswerer(system, method="direct", attention=True)


def test_default_config_round_trips_through_json_and_yaml(tmp_path):
    config = default_config()
    assert isinstance(config.encoder, HybridEncoderConfig) and isinstance(config.retention, RetentionConfig)
    assert isinstance(config.streaming, StreamingConfig) and config is not default_config()
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert HybridRAGConfig.from_any(tmp_path / "c.json") == config == HybridRAGConfig.from_any(tmp_path / "c.yaml")
    changed = {"encoder": {"hidden_size": 256, "num_heads": 4}, "distillation": {"measure": "entropy"},
               "retention": {"weight_bounds": [0.5, 2.0]}, "streaming": {"timeout": 0.01}}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(changed))
    loaded = HybridRAGConfig.from_any(tmp_path / "d.yaml")
    assert loaded.encoder.hidden_size == 256 and loaded.distillation.measure == "entropy"
    assert loaded.retention.weight_bounds == (0.5, 2.0) and loaded.diffusion == config.diffusion
    assert HybridRAGConfig.from_any(json.loads(json.dumps(loaded.to_dict()))) == loaded


@pytest.mark.parametrize("values, error, match", [
    ({"encoders": {}}, ValueError, r"config: unknown keys \['encoders'\]; known keys of HybridRAGConfig"),
    ({"encoder": {"hidden": 3}}, ValueError, r"encoder: unknown keys \['hidden'\]"),
    ({"encoder": {"num_heads": 5}}, ValueError, r"encoder: num_heads \(5\) must divide hidden_size"),
    ({"streaming": {"batch_size": 99}}, ValueError, r"streaming: batch_size must be <= max_pending"),
    ({"streaming": {"timeout": "1"}}, TypeError, "streaming: timeout must be a number"),
    ({"retention": {"fine_k": 60}}, ValueError, r"retention: fine_k must be <= coarse_k"),
    ({"retention": {"weight_bounds": [2.0, 3.0]}}, ValueError, r"retention: weight_bounds\[0\]"),
    ({"distillation": {"threshold": -1}}, ValueError, r"distillation: threshold must be >= 0 for measure 'margin'"),
    ({"diffusion": 3}, TypeError, "diffusion must be a dict or a DiffusionConfig"),
])
def test_bad_config(values, error, match):
    with pytest.raises(error, match=match):
        HybridRAGConfig.from_any(values)


def test_bad_pipeline_input(system, encoder, language_model):
    with pytest.raises(TypeError, match="base_rag_pipeline must be a HybridRAGSystem"):
        HybridRAGPipeline(object(), encoder)
    with pytest.raises(TypeError, match="use_hybrid must be True or False"):
        HybridRAGPipeline(system, encoder, use_hybrid="yes")
    empty = create_hybrid_rag_system(CONFIG, language_model=language_model)
    with pytest.raises(ValueError, match="no knowledge base to index"):
        HybridRAGPipeline(empty, encoder)
    pinned = create_hybrid_rag_system({**CONFIG, "retriever": {"query_embed_dim": 256}},
                                      language_model=language_model)
    pinned.knowledge_base = system.knowledge_base
    with pytest.raises(ValueError, match="retriever.query_embed_dim is 256 but the encoder's dimension is 24"):
        HybridRAGPipeline(pinned, encoder)
    pipeline = HybridRAGPipeline(system)
    for top_k, match in [(0, "top_k must be None"), (99, "more than attention.max_retrieved_segments")]:
        with pytest.raises(ValueError, match=match):
            pipeline.query(QUESTION, top_k)
    with pytest.raises(ValueError, match="query is empty"):
        pipeline.query("  ")
    with pytest.raises(TypeError, match="query must be a str"):
        pipeline.query(None)
    with pytest.raises(ValueError, match="retrieved passages were given with method='direct'"):
        system.generate_response(QUESTION, method="direct", retrieved=[])
    with pytest.raises(TypeError, match=r"retrieved\[0\] must be a SearchResult"):
        system.generate_response(QUESTION, retrieved=["assert"])
    assert isinstance(system, HybridRAGSystem)
