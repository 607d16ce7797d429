"""HybridRAGSystem end to end on the real offline model (SmolLM2-135M-Instruct, converted once into the cache) over
a few of Python's bundled doc topics: the three methods, the passage store, attention mass and its analysis,
classification, persistence and bad input. Short answers (8 tokens) keep it within CI's budget."""
import pytest
import torch
from pydoc_data.topics import topics

from hybridrag.retrieval import Document
from hybridrag.system import HybridRAGSystem, create_hybrid_rag_system

TOPICS = ["assert", "for", "while", "if", "try", "with", "pass", "global", "nonlocal", "lambda", "return", "raise"]
QUESTION = "Which exception does an assert statement raise when its condition is false?"


@pytest.fixture(scope="module")
def system():
    config = {"encoder": "hashing-256", "retriever": {"top_k": 3}, "generation": {"max_new_tokens": 8},
              "attention": {"segment_length": 120, "window_overlap": 16}}
    system = create_hybrid_rag_system(config)
    system.create_vectorstore([Document(name, topics[name], name) for name in TOPICS])
    return system


def test_each_method_answers_with_every_field(system):
    results = system.compare_methods(QUESTION)
    assert set(results) == {"hybrid", "base_rag", "direct"}
    for method, result in results.items():
        assert result["method"] == method and result["success"] and result["response"]
        assert set(result["timings"]) == {"retrieve", "passages", "prefill", "first_token", "decode"}
        assert result["tokens_per_second"] > 0 and result["prompt_tokens"] > 0
    assert results["direct"]["passages"] == [] and results["direct"]["citations"] == []
    for method in ("hybrid", "base_rag"):
        passages = results[method]["passages"]
        assert len(passages) == 3 and {"id", "text", "score", "attention_mass"} <= set(passages[0])
        masses = [p["attention_mass"] for p in passages]
        assert all(m is not None and m >= 0 for m in masses) and sum(masses) > 0
        assert set(results[method]["citations"]) <= {p["id"] for p in passages}
    # the same retrieved passages and the same tokens: only the attention pattern differs
    assert [p["id"] for p in results["hybrid"]["passages"]] == [p["id"] for p in results["base_rag"]["passages"]]
    assert results["hybrid"]["prompt_tokens"] == results["base_rag"]["prompt_tokens"]


def test_cached_passages_are_reused_and_only_the_question_runs(system):
    system.passages.clear()
    first = system.generate_response(QUESTION, measure_attention=False)
    hits = system.passages.hits
    again = system.generate_response(QUESTION, measure_attention=False)
    assert system.passages.hits == hits + 4  # the prefix and the three passages
    assert again["timings"]["passages"] < first["timings"]["passages"] / 3
    assert again["response"] == first["response"]


def test_the_answer_streams_piece_by_piece(system):
    pieces = []
    result = system.generate_response(QUESTION, on_token=pieces.append)
    assert len(pieces) >= 2 and "".join(pieces).strip() == result["response"]


def test_attention_analysis(system, tmp_path):
    plot = tmp_path / "heatmap.png"
    analysis = system.analyze_attention_patterns(QUESTION, plot=plot)
    layers = system.language_model.model.config.num_hidden_layers
    heads = system.language_model.model.config.num_attention_heads
    mass = torch.tensor(analysis["mass"])
    assert mass.shape == (layers, heads, 3) and (mass >= 0).all()
    assert sum(analysis["per_passage"]) == pytest.approx(1.0)
    for row in analysis["per_layer"]:
        assert sum(row) == pytest.approx(1.0)
    assert 0 <= analysis["entropy"] <= 1 and 1 / 3 <= analysis["focus"] <= 1
    assert 0 <= analysis["coverage"] <= 1 and 0 <= analysis["attention_quality"] <= 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classification_picks_the_likeliest_label(system):
    result = system.generate_response("Is pass a statement that does nothing?", task_type="classification",
                                      labels=["yes", "no"])
    assert result["response"] in ("yes", "no") and set(result["label_scores"]) == {"yes", "no"}


def test_save_and_load(system, tmp_path):
    system.generate_response(QUESTION, measure_attention=False)  # the store holds this question's passages
    system.save(tmp_path / "system")
    loaded = HybridRAGSystem.load(tmp_path / "system", language_model=system.language_model)
    assert loaded.config == system.config and len(loaded.knowledge_base) == len(system.knowledge_base)
    assert [h.document.id for h in loaded.retrieve(QUESTION)] == [h.document.id for h in system.retrieve(QUESTION)]
    assert len(loaded.passages) == len(system.passages) and loaded.passages.nbytes == system.passages.nbytes
    answer = loaded.generate_response(QUESTION, measure_attention=False)
    assert loaded.passages.misses == 0 and answer["response"] == system.generate_response(QUESTION)["response"]
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        HybridRAGSystem.load(tmp_path / "nothing")


def _sibling(system, **config):
    """A system with `config` over the fixture's knowledge base and model."""
    base = {"encoder": "hashing-256", "retriever": {"top_k": 3}, "generation": {"max_new_tokens": 8},
            "attention": {"segment_length": 120, "window_overlap": 16}}
    other = create_hybrid_rag_system({**base, **config}, language_model=system.language_model)
    other.knowledge_base = system.knowledge_base
    return other


def test_the_last_passages_last_tokens_run_with_the_question(system):
    """recompute_tokens: the stitched cache stops that many tokens before the end of the last passage, and those
    tokens run with the suffix. A whole single passage recomputed is base RAG's prompt in two calls: the same
    answer."""
    parts = system.prompt_parts(QUESTION, [hit.document for hit in system.retrieve(QUESTION)])
    n = system.config.recompute_tokens
    input_ids, cache = system.prefill_inputs(parts, "hybrid")
    assert 0 < n < parts.passages[-1].shape[1]
    assert torch.equal(input_ids, torch.cat([parts.passages[-1][:, -n:], parts.suffix], dim=1))
    assert cache.get_seq_length() == parts.length - input_ids.shape[1]
    whole = _sibling(system, recompute_tokens=10 ** 6, retriever={"top_k": 1})
    hybrid, base = (whole.generate_response(QUESTION, method=m, measure_attention=False) for m in ("hybrid",
                                                                                                   "base_rag"))
    assert hybrid["response"] == base["response"] and hybrid["prompt_tokens"] == base["prompt_tokens"]
    none = _sibling(system, recompute_tokens=0)
    assert torch.equal(none.prefill_inputs(parts, "hybrid")[0], parts.suffix)


def test_precomputed_passages_fill_the_store_up_to_its_bound(system, caplog):
    other = _sibling(system, passage_cache_size=6)
    with caplog.at_level("WARNING"):
        assert other.precompute_passages(progress=False) == 5  # and the prefix: 6
    assert len(other.passages) == 6 and other.passages.evictions == 0
    assert f"5 of {len(system.knowledge_base)} passages encoded" in caplog.text


def test_an_int8_store_answers_from_a_quarter_of_the_bytes(system):
    other = _sibling(system, passage_cache_storage="int8")
    system.generate_response(QUESTION, measure_attention=False)
    result = other.generate_response(QUESTION, measure_attention=False)
    per_token = [store.nbytes / store.tokens for store in (other.passages, system.passages)]
    assert result["success"] and per_token[0] < 0.3 * per_token[1]


def test_attention_feedback_moves_the_weights_and_is_saved(system, tmp_path):
    other = _sibling(system, attention_feedback=True)
    result = other.generate_response(QUESTION)
    ids = [p["id"] for p in result["passages"]]
    weights = other.weights.weight(ids)
    assert len(other.weights) == 3 and (weights != 1.0).any()
    assert weights[ids.index(result["citations"][0])] > 1.0  # the most attended passage gains
    reranked = other.retrieve(QUESTION)  # retrieval now goes through the weights
    assert len(reranked) == len(ids) and reranked[0].document.id == result["citations"][0]
    other.save(tmp_path / "fed")
    loaded = HybridRAGSystem.load(tmp_path / "fed", language_model=system.language_model)
    assert (loaded.weights.weight(ids) == weights).all()


def test_dropping_unattended_passages_answers_from_the_rest(system):
    other = _sibling(system, drop_unattended=0.99)
    result = other.generate_response(QUESTION)
    kept, dropped = [p["id"] for p in result["passages"]], [d["id"] for d in result["dropped"]]
    assert kept and len(kept) + len(dropped) == 3 and not set(kept) & set(dropped)
    assert all(d["share"] < 0.99 / 3 for d in result["dropped"])
    assert result["prompt_tokens"] < system.generate_response(QUESTION)["prompt_tokens"] or not dropped


def test_a_neural_retriever_re_scores_the_candidates(system):
    from hybridrag.retrieval.neural import NeuralRetriever

    kb = system.knowledge_base
    dense = create_hybrid_rag_system({"encoder": "hashing-256", "retriever": {"top_k": 3, "mode": "dense"}},
                                     neural_retriever=NeuralRetriever(256))  # identity towers: the encoder's cosine
    dense.knowledge_base = kb
    hits = dense.retrieve(QUESTION)
    plain = kb.search(QUESTION, 3, "dense")
    assert [h.document.id for h in hits] == [h.document.id for h in plain]
    assert [h.score for h in hits] == pytest.approx([h.score / 0.05 for h in plain], rel=1e-4)

    candidates = kb.search(QUESTION, 50, "hybrid")
    target = candidates[-1].document.id  # the weakest candidate, made the best by the query tower
    retriever = NeuralRetriever(256)
    with torch.no_grad():
        question = torch.from_numpy(kb.encoder.encode([QUESTION]))[0]
        retriever.query_tower.weight.copy_(torch.outer(torch.from_numpy(kb.embeddings_for([target]))[0], question))
    steered = _sibling(system)
    steered.neural_retriever = retriever
    assert steered.retrieve(QUESTION)[0].document.id == target
    with pytest.raises(TypeError, match="neural_retriever must be None or a NeuralRetriever in features mode"):
        create_hybrid_rag_system(neural_retriever=NeuralRetriever(vocab_size=10))


@pytest.mark.parametrize("call, error, match", [
    (lambda s: s.generate_response("   "), ValueError, "question is empty"),
    (lambda s: s.generate_response(3), TypeError, "question must be a str"),
    (lambda s: s.generate_response(QUESTION, task_type="poem"), ValueError, "task_type must be one of"),
    (lambda s: s.generate_response(QUESTION, task_type="classification"), ValueError, "needs labels"),
    (lambda s: s.generate_response(QUESTION, labels=["a"]), ValueError, "labels apply to"),
    (lambda s: s.generate_response(QUESTION, method="other"), ValueError, "method must be"),
    (lambda s: s.generate_response("why " * 9000), ValueError, "past the model's context"),
])
def test_bad_input(system, call, error, match):
    with pytest.raises(error, match=match):
        call(system)


def test_no_knowledge_base_yet():
    system = create_hybrid_rag_system({"encoder": "hashing-256"})
    with pytest.raises(ValueError, match="no knowledge base: call create_vectorstore"):
        system.retrieve(QUESTION)
    with pytest.raises(ValueError, match="nothing to save"):
        system.save("anywhere")


def test_documents_added_later_are_chunked_found_and_removed(system):
    other = _sibling(system)
    other.create_vectorstore([Document(name, topics[name], name) for name in TOPICS[:3]])
    before = len(other.knowledge_base)
    added = other.add_documents([Document("with", topics["with"], "with")])
    assert added >= 2 and len(other.knowledge_base) == before + added  # chunked as create_vectorstore chunks
    opening = " ".join(topics["with"].split()[4:30])
    assert other.retrieve(opening)[0].document.metadata["source_id"] == "with"
    with pytest.raises(ValueError, match=r"documents already in the knowledge base: \['with'\]"):
        other.add_documents([Document("with", "again")])
    with pytest.raises(ValueError, match=r"documents with no text to index: \['blank'\]"):
        other.add_documents([Document("blank", " \n ")])
    assert len(other.knowledge_base) == before + added  # the refused calls changed nothing
    assert other.remove_documents(["with", "missing"]) == added and len(other.knowledge_base) == before
