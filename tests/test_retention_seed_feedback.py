"""Seed 004's contract: FeedbackExtractor(embedding_func, config).extract_feedback and WeightUpdater(graph, config)
.update_weights. The seed's worked example exactly, the three metadata forms (the matrix at ranks 2, 3 and 4), items
as ids and as dicts, the embedding fallback, EMA updates in a graph, both forms kept apart, and bad input."""
import asyncio
import inspect

import numpy as np
import pytest
import torch

from hybridrag.retention import FeedbackExtractor, HyperedgeGraph, WeightUpdater

SEED = {"method": "attention", "attention_threshold": 0.1, "positive_feedback": 1.0, "negative_feedback": 0.3,
        "neutral_feedback": 0.5}                          # the seed's own settings
GRADED = {**SEED, "positive_feedback": 0.7}               # with 1.0 every attention above the threshold maps to 1.0
SEED_ATTENTION = {"he1": 0.45, "he2": 0.05, "he3": 0.15}
CONTEXT_TEXTS = ["Entity A relates to Entity B...", "Entity C connects to Entity D..."]
ITEMS = [{"id": "he1", "text": "Entity A relates to Entity B"}, {"id": "he2", "text": "entity c  connects to ENTITY D"}]


def no_embeddings(texts):
    raise AssertionError("an attention form must not call embedding_func")


def extract(config, retrieved, metadata, embed=no_embeddings, answer="Entity A relates to Entity B."):
    return asyncio.run(FeedbackExtractor(embed, config).extract_feedback(answer, retrieved, metadata))


def assert_feedback(got, expected):
    assert list(got) == list(expected)                    # the retrieved items, in their order
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=0, abs=1e-9), key


@pytest.mark.parametrize("retrieved", [["he1", "he2", "he3"],
                                       [{"id": key, "text": f"text of {key}"} for key in ("he1", "he2", "he3")]])
def test_the_seeds_worked_example(retrieved):
    feedback = extract(SEED, retrieved, {"hyperedge_attention": SEED_ATTENTION})
    assert_feedback(feedback, {"he1": 1.0, "he2": 0.4, "he3": 1.0})
    assert all(type(value) is float for value in feedback.values())
    # The keyword form shares the attention out first (0.05 / 0.65 of it), hence the he2 = 0.454:
    shares = FeedbackExtractor(threshold=0.1, positive=1.0, negative=0.3, neutral=0.5).from_scores(
        np.array([0.45, 0.05, 0.15]))
    assert shares[1] == pytest.approx(0.3 + 0.2 * (0.05 / 0.65) / 0.1, abs=1e-12)


def test_the_formula_between_and_at_its_anchors():
    attention = {"zero": 0.0, "low": 0.05, "below": 0.0999999, "at": 0.1, "he3": 0.15, "he1": 0.45, "one": 1.0}
    expected = {"zero": 0.3, "low": 0.3 + 0.5 * 0.2, "below": 0.3 + 0.999999 * 0.2, "at": 0.7,
                "he3": 0.7 + 0.05 / 0.9 * 0.3, "he1": 0.7 + 0.35 / 0.9 * 0.3, "one": 1.0}
    assert_feedback(extract(GRADED, list(attention), {"hyperedge_attention": attention}), expected)
    only_some = extract(GRADED, ["he3", "he1"], {"hyperedge_attention": attention, "query": "unused"})
    assert_feedback(only_some, {"he3": expected["he3"], "he1": expected["he1"]})   # taken as is, not normalised


SEED_TOKENS = {0: 0.15, 1: 0.20, 2: 0.10, 3: 0.05, 4: 0.03}
SEED_MAPPING = {"he1": [0, 1, 2], "he2": [3, 4]}


@pytest.mark.parametrize("weights", [SEED_TOKENS, np.array([0.15, 0.20, 0.10, 0.05, 0.03]),
                                     torch.tensor([0.15, 0.20, 0.10, 0.05, 0.03], dtype=torch.float64)])
def test_attention_weights_with_context_mapping_average_each_item(weights):
    metadata = {"attention_weights": weights, "context_mapping": SEED_MAPPING}
    # he1: mean(.15, .2, .1) = .15; he2: mean(.05, .03) = .04 (a sum would give .08 and 0.46)
    assert_feedback(extract(SEED, ["he1", "he2"], metadata), {"he1": 1.0, "he2": 0.3 + 0.4 * 0.2})
    assert_feedback(extract(GRADED, ITEMS, metadata), {"he1": 0.7 + 0.05 / 0.9 * 0.3, "he2": 0.38})
    mapping = {"he1": np.array([0, 1, 2]), "he2": (3, 4)}
    assert_feedback(extract(GRADED, ["he1", "he2"], {"attention_weights": weights, "context_mapping": mapping}),
                    {"he1": 0.7 + 0.05 / 0.9 * 0.3, "he2": 0.38})


def base_matrix():
    """[T, T], T = 9: context tokens 0..5 (two chunks of 3), answer rows 6..8 giving chunk 1 a mean .2 per token and
    chunk 2 a mean .05."""
    matrix = np.zeros((9, 9))
    for row in range(6):
        matrix[row, :row + 1] = 1 / (row + 1)
    matrix[6] = [.3, .2, .1, .05, .05, .05, .25, 0, 0]
    matrix[7] = [.2, .2, .2, 0, .1, .05, .1, .15, 0]
    matrix[8] = [.1, .2, .3, .1, 0, .05, .1, .1, .05]
    return matrix


def ranked(matrix, shape):
    """A (*shape, T, T) matrix whose mean over the leading dims is `matrix` while each slice differs from it."""
    rng = np.random.default_rng(1)
    noise = rng.uniform(-0.5, 0.5, shape + matrix.shape)
    noise -= noise.mean(axis=tuple(range(len(shape))))
    return matrix + noise * np.minimum(matrix, 1 - matrix)           # |noise| < 1: stays in [0, 1]


MATRIX_EXPECTED = {"he1": 0.7 + 0.1 / 0.9 * 0.3, "he2": 0.3 + 0.5 * 0.2}


@pytest.mark.parametrize("shape", [(), (4,), (3, 2)])  # [T, T], [H, T, T], [L, H, T, T]
def test_attention_matrix_at_every_rank(shape):
    matrix = ranked(base_matrix(), shape)
    assert shape == () or np.abs(matrix - base_matrix()).max() > 0.05   # no slice is the average itself
    metadata = {"attention_matrix": matrix, "context_texts": CONTEXT_TEXTS, "answer_start_pos": 6,
                "context_end_pos": 6}
    assert_feedback(extract(GRADED, ITEMS, metadata), MATRIX_EXPECTED)
    assert_feedback(extract(SEED, ITEMS, metadata), {"he1": 1.0, "he2": 0.4})
    as_tensor = {**metadata, "attention_matrix": torch.tensor(matrix)}
    assert_feedback(extract(GRADED, ITEMS[::-1], as_tensor), {"he2": MATRIX_EXPECTED["he2"],
                                                              "he1": MATRIX_EXPECTED["he1"]})


def test_attention_matrix_spans_and_items_in_several_chunks():
    metadata = {"attention_matrix": base_matrix(), "context_texts": CONTEXT_TEXTS, "answer_start_pos": 6,
                "context_end_pos": 6}
    spans = extract(GRADED, ITEMS, {**metadata, "context_spans": [(0, 4), (4, 6)]})
    assert_feedback(spans, {"he1": 0.7 + (0.65 / 4 - 0.1) / 0.9 * 0.3, "he2": 0.4})   # chunk 1 = tokens 0..3
    both = extract(GRADED, [{"id": "entity", "text": "ENTITY"}], metadata)           # in both chunks: 6 tokens
    assert_feedback(both, {"entity": 0.7 + (0.75 / 6 - 0.1) / 0.9 * 0.3})
    later = base_matrix()
    later[7:, :6] *= 0.4                                  # only the answer rows (from answer_start_pos) count
    assert_feedback(extract(GRADED, ITEMS, {**metadata, "attention_matrix": later, "answer_start_pos": 7,
                                            "context_end_pos": 6}),
                    {"he1": 0.3 + 0.8 * 0.2, "he2": 0.3 + 0.2 * 0.2})


VECTORS = {"the answer": [1.0, 0.0, 0.0], "same": [2.0, 0.0, 0.0], "orthogonal": [0.0, 1.0, 0.0],
           "opposite": [-1.0, 0.0, 0.0], "close": [0.6, 0.8, 0.0]}
EMBEDDED = [{"id": key, "text": key} for key in ("same", "orthogonal", "opposite", "close")]


class Recorder:
    """A deterministic embedding_func (fixed vectors per text) that records its calls; async or plain."""

    def __init__(self, asynchronous=False, tensor=False):
        self.calls, self.asynchronous, self.tensor = [], asynchronous, tensor

    def __call__(self, texts):
        self.calls.append(list(texts))
        vectors = [VECTORS[text] for text in texts]
        vectors = torch.tensor(vectors, dtype=torch.float64) if self.tensor else np.array(vectors)
        if self.asynchronous:
            async def result():
                return vectors
            return result()
        return vectors


@pytest.mark.parametrize("config, metadata", [({}, None), ({"method": "attention"}, None),
                                              ({"method": "attention"}, {"query": "q", "timestamp": 3})])
@pytest.mark.parametrize("embed", [Recorder(), Recorder(asynchronous=True), Recorder(tensor=True)])
def test_embedding_fallback(config, metadata, embed):
    embed.calls.clear()
    feedback = extract(config, EMBEDDED, metadata, embed=embed, answer="the answer")
    # similarity (1 + cos) / 2: 1, .5, 0, .8; threshold 0.7, positive 1.0
    assert_feedback(feedback, {"same": 1.0, "orthogonal": 0.3 + 0.5 / 0.7 * 0.2, "opposite": 0.3, "close": 1.0})
    assert embed.calls == [["the answer", "same", "orthogonal", "opposite", "close"]]   # one call
    graded = extract({"positive_feedback": 0.7, "similarity_threshold": 0.6}, EMBEDDED, None, embed=embed,
                     answer="the answer")
    assert graded["close"] == pytest.approx(0.7 + 0.2 / 0.4 * 0.3, abs=1e-9)
    assert graded["orthogonal"] == pytest.approx(0.3 + 0.5 / 0.6 * 0.2, abs=1e-9)


def test_defaults_and_empty_retrieval():
    extractor = FeedbackExtractor(Recorder())
    assert repr(extractor) == ("FeedbackExtractor(Recorder, {'method': 'embedding', 'attention_threshold': 0.1, "
                               "'positive_feedback': 1.0, 'negative_feedback': 0.3, 'neutral_feedback': 0.5, "
                               "'similarity_threshold': 0.7})")
    assert asyncio.run(extractor.extract_feedback("the answer", [])) == {}
    # the seed's threshold and feedback values are the defaults: only the method needs setting
    assert_feedback(extract({"method": "attention"}, ["he1", "he2", "he3"], {"hyperedge_attention": SEED_ATTENTION}),
                    {"he1": 1.0, "he2": 0.4, "he3": 1.0})


def run(coroutine):
    return asyncio.run(coroutine)


def test_ema_updates_with_the_seeds_numbers():
    graph = HyperedgeGraph({"he1": 1.0, "he2": 1.0, "he3": 1.0})
    updater = WeightUpdater(graph, {"strategy": "ema", "update_alpha": 0.1})
    extractor = FeedbackExtractor(no_embeddings, {"method": "attention", "attention_threshold": 0.1})

    async def process_query():                           # the seed's integration example
        feedback = await extractor.extract_feedback("answer", ["he1", "he2", "he3"],
                                                    {"hyperedge_attention": SEED_ATTENTION})
        return {key: await updater.update_weights(key, signal) for key, signal in feedback.items()}

    assert_feedback(run(process_query()), {"he1": 1.0, "he2": 0.9 * 1.0 + 0.1 * 0.4, "he3": 1.0})
    assert_feedback(run(process_query()), {"he1": 1.0, "he2": 0.9 * 0.94 + 0.1 * 0.4, "he3": 1.0})
    assert graph.weight("he2") == pytest.approx(0.886, abs=1e-12)
    low = HyperedgeGraph({"he": 0.5})
    updater = WeightUpdater(low, {"strategy": "ema", "update_alpha": 0.1})
    assert run(updater.update_weights("he", 1.0)) == pytest.approx(0.55, abs=1e-12)
    for _ in range(9):
        run(updater.update_weights("he", 0.3))
    assert low.weight("he") == pytest.approx(0.3 + (0.55 - 0.3) * 0.9 ** 9, abs=1e-12)   # drawn to the signal
    default = HyperedgeGraph({"x": 0.2})
    assert run(WeightUpdater(default, {}).update_weights("x", 1.0)) == pytest.approx(0.28, abs=1e-12)   # alpha 0.1
    assert repr(WeightUpdater(default, {"update_alpha": 1.0})) == ("WeightUpdater(HyperedgeGraph, {'strategy': 'ema', "
                                                                   "'update_alpha': 1.0})")


class SlowGraph:
    """A user's own graph storage: async get_node / upsert_node that yield to the event loop, like a database."""

    def __init__(self, nodes):
        self.nodes = nodes

    async def get_node(self, node_id):
        await asyncio.sleep(0)
        return dict(self.nodes[node_id]) if node_id in self.nodes else None

    async def upsert_node(self, node_id, node_data):
        await asyncio.sleep(0)
        self.nodes[node_id] = node_data


def test_any_graph_storage_and_concurrent_updates():
    graph = SlowGraph({"he": {"weight": 0.8, "label": "A-B", "source": 3}})
    updater = WeightUpdater(graph, {"strategy": "ema", "update_alpha": 0.1})

    async def together():
        return await asyncio.gather(*(updater.update_weights("he", 0.3) for _ in range(10)))

    weights = run(together())
    assert weights[-1] == pytest.approx(0.3 + 0.5 * 0.9 ** 10, abs=1e-12)   # no update lost
    assert graph.nodes["he"] == {"weight": weights[-1], "label": "A-B", "source": 3}   # other fields kept
    assert repr(updater) == "WeightUpdater(SlowGraph, {'strategy': 'ema', 'update_alpha': 0.1})"


def test_hyperedge_graph_stores_copies():
    graph = HyperedgeGraph({"he": 1.0})
    node = run(graph.get_node("he"))
    node["weight"] = 5.0
    assert graph.weight("he") == 1.0 and run(graph.get_node("nope")) is None
    run(graph.upsert_node("new", {"weight": 2, "label": "x"}))
    assert len(graph) == 2 and "new" in graph and run(graph.get_node("new")) == {"weight": 2.0, "label": "x"}
    with pytest.raises(ValueError, match="hyperedge 'nope' is not in the graph"):
        graph.weight("nope")
    with pytest.raises(ValueError, match="node_data of 'x' has no 'weight'"):
        run(graph.upsert_node("x", {"label": "x"}))
    with pytest.raises(TypeError, match=r"weights\['a'\] must be a number, got str"):
        HyperedgeGraph({"a": "1"})
    with pytest.raises(TypeError, match=r"hyperedge ids must be str, got int"):
        HyperedgeGraph({3: 1.0})


def test_the_two_forms_stay_apart():
    assert inspect.iscoroutinefunction(FeedbackExtractor.extract_feedback)
    assert inspect.iscoroutinefunction(WeightUpdater.update_weights)
    seed, keyword = FeedbackExtractor(Recorder(), SEED), FeedbackExtractor(threshold=0.2)
    with pytest.raises(TypeError, match=r"from_scores belongs to the keyword form FeedbackExtractor\(\*, threshold"):
        seed.from_scores(np.ones(2))
    with pytest.raises(TypeError, match=r"extract_feedback belongs to the seed form FeedbackExtractor\(embedding_"):
        run(keyword.extract_feedback("a", ["he1"], None))
    with pytest.raises(TypeError, match=r"FeedbackExtractor takes the seed form .* not both: got positional "
                                        r"arguments and threshold"):
        FeedbackExtractor(Recorder(), SEED, threshold=0.2)
    updater = WeightUpdater(HyperedgeGraph({"a": 1.0}), {"strategy": "ema"})
    with pytest.raises(TypeError, match=r"update belongs to the keyword form WeightUpdater\(\*, method"):
        updater.update(["a"], np.ones(1))
    with pytest.raises(TypeError, match=r"update_weights belongs to the seed form WeightUpdater\(graph, config\)"):
        run(WeightUpdater().update_weights("a", 0.5))
    with pytest.raises(TypeError, match=r"not both: got positional arguments and method, rate"):
        WeightUpdater(HyperedgeGraph(), {}, method="ema", rate=0.2)


CONFIG_CASES = [
    ({"method": "citation"}, ValueError, r"config\['method'\] must be one of \('embedding', 'attention'\), got "
                                         r"'citation'"),
    ({"attention_threshold": 0.0}, ValueError, r"config\['attention_threshold'\] must be in \(0, 1\), got 0.0"),
    ({"attention_threshold": 1.0}, ValueError, r"config\['attention_threshold'\] must be in \(0, 1\), got 1.0"),
    ({"similarity_threshold": 1.5}, ValueError, r"config\['similarity_threshold'\] must be in \(0, 1\), got 1.5"),
    ({"attention_threshold": "0.1"}, TypeError, r"config\['attention_threshold'\] must be a number, got str"),
    ({"positive_feedback": float("nan")}, ValueError, r"config\['positive_feedback'\] must be finite, got nan"),
    ({"negative_feedback": 0.6}, ValueError, r"need 0 <= negative_feedback <= neutral_feedback <= positive_feedback "
                                             r"<= 1, got negative_feedback=0.6"),
    ({"positive_feedback": 1.2}, ValueError, r"<= positive_feedback <= 1, got .*positive_feedback=1.2"),
    ({"attention_treshold": 0.2}, ValueError, r"config has unknown keys 'attention_treshold'; the keys are "
                                              r"\('method', 'attention_threshold'"),
    (["method", "attention"], TypeError, r"config must be a dict, got list"),
]


@pytest.mark.parametrize("config, error, match", CONFIG_CASES)
def test_bad_extractor_config(config, error, match):
    with pytest.raises(error, match=match):
        FeedbackExtractor(Recorder(), config)


def test_bad_embedding_func():
    with pytest.raises(TypeError, match=r"embedding_func must be callable .*got str"):
        FeedbackExtractor("minilm", SEED)
    with pytest.raises(TypeError, match=r"embedding_func must be callable .*got NoneType"):
        FeedbackExtractor(None, SEED)


MATRIX = {"attention_matrix": base_matrix(), "context_texts": CONTEXT_TEXTS, "answer_start_pos": 6,
          "context_end_pos": 6}


def bad_calls():
    tokens = {"attention_weights": SEED_TOKENS, "context_mapping": SEED_MAPPING}
    return [
        (["he1"], {"hyperedge_attention": {"he1": 1.5}}, ValueError,
         r"hyperedge_attention\['he1'\] must be an attention in \[0, 1\], got 1.5"),
        (["he1"], {"hyperedge_attention": {"he1": -0.1}}, ValueError, r"must be an attention in \[0, 1\], got -0.1"),
        (["he1"], {"hyperedge_attention": {"he1": float("nan")}}, ValueError, r"must be finite, got nan"),
        (["he1", "he4"], {"hyperedge_attention": SEED_ATTENTION}, ValueError,
         r"hyperedge_attention has no entry for the retrieved item 'he4'"),
        (["he1"], {"hyperedge_attention": [0.4]}, TypeError, r"hyperedge_attention must be a dict keyed by item id"),
        (["he1"], {"attention_weights": SEED_TOKENS}, ValueError,
         r"metadata has no 'context_mapping': the attention_weights form needs 'attention_weights', "
         r"'context_mapping'"),
        (["he1"], {"context_mapping": SEED_MAPPING}, ValueError, r"metadata has no 'attention_weights'"),
        (["he1", "he3"], tokens, ValueError, r"context_mapping has no entry for the retrieved item 'he3'"),
        (["he1"], {**tokens, "context_mapping": {"he1": [0, 7]}}, ValueError,
         r"context_mapping\['he1'\] has the positions \[7\], which attention_weights does not have"),
        (["he1"], {**tokens, "context_mapping": {"he1": []}}, ValueError,
         r"context_mapping\['he1'\] must be a non-empty list of token positions, got \[\]"),
        (["he1"], {**tokens, "context_mapping": {"he1": [1, 1]}}, ValueError, r"repeats a token position"),
        (["he1"], {**tokens, "attention_weights": [0.1, 0.2]}, TypeError,
         r"attention_weights must be a \{position: attention\} dict or a 1-D array, got list"),
        (["he1"], {**tokens, "attention_weights": {"0": 0.1}}, TypeError,
         r"attention_weights key '0' must be an int, got str"),
        (["he1"], {**tokens, "attention_weights": np.array([0.1, 2.0])}, ValueError,
         r"attention_weights must be attentions in \[0, 1\], got a maximum of 2.0"),
        (["he1"], {**tokens, "hyperedge_attention": SEED_ATTENTION}, ValueError,
         r"metadata mixes the hyperedge_attention and attention_weights forms; pass one"),
        (ITEMS, {**MATRIX, "attention_matrix": base_matrix()[None, None, None]}, ValueError,
         r"attention_matrix must be a non-empty array of 2 or 3 or 4 dims, got shape \(1, 1, 1, 9, 9\)"),
        (ITEMS, {**MATRIX, "attention_matrix": base_matrix()[0]}, ValueError,
         r"attention_matrix must be a non-empty array of 2 or 3 or 4 dims, got shape \(9,\)"),
        (ITEMS, {**MATRIX, "attention_matrix": base_matrix()[:, :8]}, ValueError,
         r"attention_matrix must end in \[T, T\] \(queries, keys\), got shape \(9, 8\)"),
        (ITEMS, {**MATRIX, "attention_matrix": 2 * base_matrix()}, ValueError,
         r"attention_matrix must hold attentions in \[0, 1\], got a maximum of"),
        (ITEMS, {**MATRIX, "attention_matrix": base_matrix().tolist()}, TypeError,
         r"attention_matrix must be a numpy array or a torch tensor, got list"),
        (ITEMS, {**MATRIX, "answer_start_pos": 9}, ValueError,
         r"answer_start_pos must be < T = 9 \(the answer needs at least one row\), got 9"),
        (ITEMS, {**MATRIX, "answer_start_pos": 6.0}, TypeError, r"answer_start_pos must be an int, got float"),
        (ITEMS, {**MATRIX, "context_end_pos": 7}, ValueError,
         r"context_end_pos must be <= answer_start_pos = 6 \(the context comes before the answer\), got 7"),
        (ITEMS, {**MATRIX, "context_end_pos": 0}, ValueError, r"context_end_pos must be >= 1, got 0"),
        (ITEMS, {key: value for key, value in MATRIX.items() if key != "answer_start_pos"}, ValueError,
         r"metadata has no 'answer_start_pos': the attention_matrix form needs"),
        (ITEMS, {**MATRIX, "context_texts": []}, ValueError, r"context_texts must be a non-empty list of non-empty "
                                                             r"str, got \[\]"),
        (ITEMS, {**MATRIX, "context_texts": ["a"] * 7}, ValueError,
         r"7 context_texts cannot share context_end_pos = 6 tokens"),
        (ITEMS, {**MATRIX, "context_spans": [(0, 3)]}, ValueError,
         r"context_spans must be a list of 2 \(start, end\) pairs"),
        (ITEMS, {**MATRIX, "context_spans": [(0, 3), (3, 7)]}, ValueError,
         r"context_spans\[1\] must satisfy 0 <= start < end <= context_end_pos = 6, got \(3, 7\)"),
        (["he1"], MATRIX, ValueError, r"the attention_matrix form matches items to context_texts by text, but "
                                      r"'he1' came as a bare id"),
        ([{"id": "he5", "text": "Entity E"}], MATRIX, ValueError,
         r"the text of retrieved item 'he5' \('Entity E'\) is in none of the context_texts"),
        ("he1", None, TypeError, r"retrieved must be a list of ids or \{'id', 'text'\} dicts, got str"),
        (["he1", "he1"], {"hyperedge_attention": SEED_ATTENTION}, ValueError, r"retrieved repeats the ids \['he1'\]"),
        ([{"id": "he1"}], None, ValueError, r"retrieved\[0\] has no 'text'; a dict item needs 'id' and 'text'"),
        ([{"id": "he1", "text": " "}], None, ValueError, r"retrieved\[0\]\['text'\] must be a non-empty str"),
        ([{"id": 1, "text": "a"}], None, TypeError, r"retrieved\[0\]'s id must be a str, got int"),
        (["he1", ""], None, ValueError, r"retrieved\[1\]'s id must be a non-empty str, got ''"),
        ([("he1", "a")], None, TypeError, r"retrieved\[0\] must be an id str or a dict with 'id' and 'text', got "
                                          r"tuple"),
        (["same"], None, ValueError, r"the embedding fallback embeds each item's text, but \['same'\] came as bare"),
        (EMBEDDED, ["hyperedge_attention"], TypeError, r"metadata must be a dict or None, got list"),
    ]


@pytest.mark.parametrize("retrieved, metadata, error, match", bad_calls())
def test_bad_extract_feedback_calls(retrieved, metadata, error, match):
    with pytest.raises(error, match=match):
        extract({"method": "attention"}, retrieved, metadata, embed=Recorder(), answer="the answer")


def test_bad_fallback_and_method_calls():
    with pytest.raises(ValueError, match=r"config\['method'\] is 'embedding' but metadata has the "
                                         r"hyperedge_attention form; set method 'attention'"):
        extract({}, ["he1"], {"hyperedge_attention": SEED_ATTENTION})
    with pytest.raises(ValueError, match="answer must be non-empty text for the embedding fallback"):
        extract({}, EMBEDDED, None, embed=Recorder(), answer="  ")
    with pytest.raises(TypeError, match="answer must be a str, got NoneType"):
        extract({}, EMBEDDED, None, embed=Recorder(), answer=None)
    with pytest.raises(ValueError, match=r"embedding_func must return \(3, d\) real embeddings for the answer and "
                                         r"the 2 items, got dtype float64 and shape \(2, 3\)"):
        extract({}, EMBEDDED[:2], None, embed=lambda texts: np.ones((2, 3)), answer="the answer")
    with pytest.raises(ValueError, match=r"embedding_func gave zero vectors \(no cosine\) for texts \[1\]"):
        extract({}, EMBEDDED[:1], None, embed=lambda texts: np.array([[1.0, 0], [0, 0]]), answer="the answer")
    with pytest.raises(ValueError, match="embedding_func's result has NaN or inf values"):
        extract({}, EMBEDDED[:1], None, embed=lambda texts: [[1.0, 0], [np.nan, 0]], answer="the answer")
    with pytest.raises(ValueError, match=r"embedding_func must return \(2, d\) real embeddings, got a list numpy "
                                         r"cannot read as one"):
        extract({}, EMBEDDED[:1], None, embed=lambda texts: [[1.0, 0], [1.0]], answer="the answer")


class SyncGraph:
    def get_node(self, node_id):
        return {"weight": 1.0}

    def upsert_node(self, node_id, node_data):
        pass


def test_bad_updater_config_and_updates():
    graph = HyperedgeGraph({"he1": 1.0})
    cases = [
        ((graph, {"strategy": "additive"}), ValueError,
         r"config\['strategy'\] must be one of \('ema',\) \(the seed defines ema only\), got 'additive'"),
        ((graph, {"update_alpha": 0.0}), ValueError, r"config\['update_alpha'\] must be in \(0, 1\], got 0.0"),
        ((graph, {"update_alpha": 1.5}), ValueError, r"config\['update_alpha'\] must be in \(0, 1\], got 1.5"),
        ((graph, {"update_alpha": True}), TypeError, r"config\['update_alpha'\] must be a number, got bool"),
        ((graph, {"decay_factor": 0.99}), ValueError,
         r"config has unknown keys 'decay_factor'; the keys are \('strategy', 'update_alpha'\)"),
        ((graph, "ema"), TypeError, r"config must be a dict, got str"),
        (({"he1": 1.0}, {}), TypeError, r"graph must provide async get_node\(id\) and upsert_node\(id, node\) .*but "
                                        r"dict has no async get_node or upsert_node"),
        ((SyncGraph(), {}), TypeError, r"but SyncGraph has no async get_node or upsert_node"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            WeightUpdater(*args)
    updater = WeightUpdater(graph, {"strategy": "ema", "update_alpha": 0.1})
    updates = [
        (("he1", 1.2), ValueError, r"signal must be a feedback in \[0, 1\], got 1.2"),
        (("he1", -0.1), ValueError, r"signal must be a feedback in \[0, 1\], got -0.1"),
        (("he1", float("nan")), ValueError, r"signal must be finite, got nan"),
        (("he1", "0.5"), TypeError, r"signal must be a number, got str"),
        (("he9", 0.5), ValueError, r"hyperedge 'he9' is not in the graph"),
        ((7, 0.5), TypeError, r"hyperedge ids must be str, got int"),
        (("", 0.5), ValueError, r"hyperedge ids must be non-empty str, got ''"),
    ]
    for args, error, match in updates:
        with pytest.raises(error, match=match):
            run(updater.update_weights(*args))
    assert graph.weight("he1") == 1.0                     # nothing was written
    no_weight = WeightUpdater(SlowGraph({"he": {"label": "x"}}), {})
    with pytest.raises(ValueError, match=r"the graph's node 'he' has no 'weight', got \{'label': 'x'\}"):
        run(no_weight.update_weights("he", 0.5))
