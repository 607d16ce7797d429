"""BM25Index: ranking against BM25 computed by hand, term-less queries, add/remove, persistence, errors."""
import json
import math
import threading

import pytest

from hybridrag.retrieval.bm25 import BM25Index

TEXTS = ["the cat sat on the mat", "dogs bark at the mailman", "a cat and a dog play outside", "cat cat cat naps"]
IDS = ["mat", "bark", "play", "naps"]


def lucene_bm25(query_terms, texts, k1=1.5, b=0.75):
    """bm25s's "lucene" BM25: idf = ln(1 + (N - n + 0.5) / (n + 0.5)) and tf / (tf + k1 (1 - b + b |d| / avg|d|)), without
    Lucene's constant (k1 + 1) factor; words of 2+ characters, English stopwords dropped."""
    stop = {"the", "on", "at", "a", "and"}
    documents = [[w for w in t.split() if w not in stop and len(w) > 1] for t in texts]
    average = sum(map(len, documents)) / len(documents)
    scores = []
    for words in documents:
        score = 0.0
        for term in query_terms:
            frequency, containing = words.count(term), sum(term in d for d in documents)
            if frequency:
                idf = math.log(1 + (len(documents) - containing + 0.5) / (containing + 0.5))
                score += idf * frequency / (frequency + k1 * (1 - b + b * len(words) / average))
        scores.append(score)
    return scores


@pytest.fixture
def index():
    index = BM25Index()
    index.build(TEXTS, IDS)
    return index


def test_scores_match_bm25_by_hand(index):
    for query, terms in [("cat", ["cat"]), ("Cat dog!", ["cat", "dog"]), ("mailman bark", ["mailman", "bark"])]:
        expected = lucene_bm25(terms, TEXTS)
        ranking = index.search(query, 4)
        matched = sorted(((s, i) for s, i in zip(expected, IDS) if s > 0), reverse=True)
        assert [i for i, _ in ranking] == [i for _, i in matched]
        for (doc_id, score), (true_score, _) in zip(ranking, matched):
            assert score == pytest.approx(true_score, rel=1e-5), (query, doc_id)


def test_only_matching_documents_are_returned(index):
    assert [i for i, _ in index.search("cat", 10)] == ["naps", "mat", "play"]  # "bark" has no cat: not a hit
    assert index.search("zebra", 3) == []
    assert index.search("the and a", 3) == []  # stopwords only
    assert index.search_many(["zebra", "dogs"], 2) == [[], [("bark", pytest.approx(index.search("dogs", 1)[0][1]))]]


def test_add_and_remove_rebuild(index):
    index.add(["zebra crossing"], ["zebra"])
    assert index.search("zebra", 3)[0][0] == "zebra"
    assert index.remove(["zebra", "mat", "unknown"]) == 2
    assert len(index) == 3 and index.search("zebra", 3) == []
    assert "mat" not in [i for i, _ in index.search("cat", 5)]
    assert BM25Index().search("anything", 3) == []  # empty index


def test_save_load_round_trip(tmp_path, index):
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25", dict(zip(IDS, TEXTS)))
    for query in ("cat", "dog bark", "zebra"):
        assert loaded.search(query, 4) == index.search(query, 4)
    loaded.add(["new cat"], ["new"])
    assert "new" in [i for i, _ in loaded.search("cat", 5)]


def test_load_errors(tmp_path, index):
    with pytest.raises(FileNotFoundError, match="no BM25 index at"):
        BM25Index.load(tmp_path / "absent", {})
    index.save(tmp_path / "bm25")
    with pytest.raises(ValueError, match=r"names ids with no text: \['mat'\]"):
        BM25Index.load(tmp_path / "bm25", {"bark": "x", "play": "y", "naps": "z"})
    (tmp_path / "bm25" / "bm25.json").write_text("{broken")
    with pytest.raises(ValueError, match="are corrupted"):
        BM25Index.load(tmp_path / "bm25", dict(zip(IDS, TEXTS)))


def test_input_errors(index):
    with pytest.raises(ValueError, match="method must be one of"):
        BM25Index(method="tfidf")
    with pytest.raises(ValueError, match="k1 must be a finite number >= 0, got -1"):
        BM25Index(k1=-1)
    with pytest.raises(ValueError, match="ids has 1 entries but texts has 2"):
        BM25Index().build(["a b", "c d"], ["x"])
    with pytest.raises(ValueError, match="ids must be new and unique"):
        index.add(["more"], ["mat"])
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        index.search("cat", 0)
    with pytest.raises(TypeError, match="queries must be a list of strings, got str"):
        index.search_many("cat", 1)


@pytest.mark.parametrize("texts", [["   ", ""], ["a b", "x"], ["the and", "of a"]])
def test_a_corpus_with_no_token_gives_no_hit_and_round_trips(tmp_path, texts):
    index = BM25Index()
    index.build(texts, ["p", "q"])
    assert index.search("a the x", 5) == [] and index.search_many(["b", "of"], 2**31) == [[], []]
    index.save(tmp_path / "bm25")
    assert [p.name for p in (tmp_path / "bm25").iterdir()] == ["bm25.json"]  # no bm25s files for no vocabulary
    loaded = BM25Index.load(tmp_path / "bm25", dict(zip(["p", "q"], texts)))
    assert len(loaded) == 2 and loaded.search("a the x", 5) == []
    loaded.add(["real words"], ["r"])
    assert [i for i, _ in loaded.search("words", 5)] == ["r"]


def test_files_saved_before_the_indexed_flag_still_load(tmp_path, index):
    index.save(tmp_path / "bm25")
    settings = json.loads((tmp_path / "bm25" / "bm25.json").read_text())
    del settings["indexed"]
    (tmp_path / "bm25" / "bm25.json").write_text(json.dumps(settings))
    loaded = BM25Index.load(tmp_path / "bm25", dict(zip(IDS, TEXTS)))
    assert loaded.search("cat", 4) == index.search("cat", 4)


def test_concurrent_first_searches_build_once():
    builds = []
    for _ in range(5):
        index = BM25Index()
        index.add(TEXTS, IDS)  # not built yet: the first search builds it
        original = index._index
        index._index = lambda: (builds.append(1), original())
        barrier, errors, results = threading.Barrier(4), [], []

        def search():
            try:
                barrier.wait(5)
                results.append(index.search("cat", 4))
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=search, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors and not [t for t in threads if t.is_alive()]
        assert [[i for i, _ in r] for r in results] == [["naps", "mat", "play"]] * 4
    assert len(builds) == 5  # one build per index, however many searches raced for it
