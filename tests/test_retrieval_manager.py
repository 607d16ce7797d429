"""RetrievalManager: rank-based weighting, the prompt, citations, and the feedback loop end to end."""
import numpy as np
import pytest

from hybridrag.retention.feedback import FeedbackExtractor, WeightUpdater
from hybridrag.retrieval.documents import Document
from hybridrag.retrieval.encoder import HashingEncoder
from hybridrag.retrieval.knowledge_base import KnowledgeBase
from hybridrag.retrieval.manager import RetrievalManager
from hybridrag.retrieval.prompting import parse_documents

CORPUS = [Document(f"d{i}", f"python exceptions note {i} " + "filler " * i, f"Note {i}") for i in range(8)]


@pytest.fixture
def kb():
    return KnowledgeBase.build(CORPUS, HashingEncoder(256))


def ids(results):
    return [r.document.id for r in results]


def test_without_weights_it_is_the_knowledge_base_search(kb):
    manager = RetrievalManager(kb, mode="dense")
    assert ids(manager.retrieve("python exceptions", 4)) == ids(kb.search("python exceptions", 4, "dense"))


def test_weights_reorder_by_weight_over_rank(kb):
    updater = WeightUpdater(method="multiplicative", rate=1.0, bounds=(0.1, 10.0))
    manager = RetrievalManager(kb, mode="dense", weights=updater)
    plain = ids(kb.search("python exceptions", 8, "dense"))
    updater.update([plain[2]], np.array([1.0]))  # weight e: share e / 3 = 0.906 < 1 (rank 1), > 1 / 2 (rank 2)
    weighted = manager.retrieve("python exceptions", 3)
    assert ids(weighted) == [plain[0], plain[2], plain[1]]
    assert [r.score for r in weighted] == pytest.approx([0.0, 1.0 - np.log(3), -np.log(2)])


def test_prompt_and_citations(kb):
    manager = RetrievalManager(kb, mode="bm25")
    prompt, results = manager.prompt("exceptions note", 3)
    blocks = parse_documents(prompt)
    assert [n for n, _, _ in blocks] == [1, 2, 3]
    assert [text for _, _, text in blocks] == [r.document.text for r in results]
    assert prompt.endswith("Question: exceptions note\nAnswer citing documents as [DOC_n]:")
    cited = manager.cited("As [DOC_3] and [DOC_1, DOC_9] say ... [DOC_3]", results)
    assert cited == [results[2].document, results[0].document]  # DOC_9 was not in the prompt


def test_feedback_loop_promotes_the_document_the_answer_attended_to(kb):
    manager = RetrievalManager(kb, mode="dense", weights=WeightUpdater(method="ema", rate=0.5))
    extractor = FeedbackExtractor()
    query = "python exceptions"
    ranks = []
    for _ in range(8):
        results = manager.retrieve(query, 4)
        ranks.append(ids(results).index("d2") + 1)
        attention = np.array([0.8 if r.document.id == "d2" else 0.05 for r in results])
        manager.record_feedback(results, extractor.from_scores(attention))
    # d2 starts third; attended to, it rises (the others, ignored, sink) until it leads and stays there
    assert ranks[0] == 3 and ranks[-1] == 1 and ranks == sorted(ranks, reverse=True), ranks


def test_bad_input(kb):
    with pytest.raises(ValueError, match="mode must be one of"):
        RetrievalManager(kb, mode="sparse")
    with pytest.raises(TypeError, match="weights must be a WeightUpdater"):
        RetrievalManager(kb, weights={})
    with pytest.raises(ValueError, match="candidates must be a positive int, got 0"):
        RetrievalManager(kb, candidates=0)
    with pytest.raises(ValueError, match="has no weights to update"):
        RetrievalManager(kb).record_feedback([], [])
    with pytest.raises(ValueError, match="query is empty"):
        RetrievalManager(kb).retrieve("")
