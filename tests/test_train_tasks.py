"""hybridrag.train.tasks: RAGTask, StaticRAGTask, MultiHopRAGTask and create_rag_task over a small KnowledgeBase
(hashing encoder) and over callables."""
import pytest

from hybridrag.retrieval import Document
from hybridrag.train.formatting import parse_retrieval_block
from hybridrag.train.tasks import MultiHopRAGTask, RAGTask, StaticRAGTask, create_rag_task, default_next_query

DOCS = [Document("with", "The with statement calls the context manager's __exit__ method after the suite.", "with"),
        Document("exit", "__exit__ should return a true value to suppress the exception.", "context managers"),
        Document("loop", "break ends the nearest enclosing loop.", "break")]


def chat(question, system=None):
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": head + [{"role": "user", "content": question}, {"role": "assistant", "content": "ok"}],
            "id": question}


@pytest.fixture(scope="module")
def kb():
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    from hybridrag.retrieval import HashingEncoder, KnowledgeBase
    return KnowledgeBase.build(DOCS, HashingEncoder(64))


def test_rag_task_inserts_before_the_last_user_message(kb):
    conversations = [chat("What does the with statement call?", system="Be brief.")]
    item = RAGTask(conversations, kb, top_k=2)[0]  # hybrid: BM25 alone finds only passages sharing a term
    assert [m["role"] for m in item["messages"]] == ["system", "retrieval", "user", "assistant"]
    retrieval = item["messages"][1]
    assert retrieval["documents"][0]["id"] == "with" and len(retrieval["documents"]) == 2
    assert parse_retrieval_block(retrieval["content"])[0][1] == "with"
    assert item["id"] == conversations[0]["id"]
    assert len(conversations[0]["messages"]) == 3  # the input is not changed
    two_turns = {"messages": chat("first")["messages"] + chat("break loop")["messages"]}
    item = RAGTask([two_turns], kb, top_k=1, mode="bm25")[0]
    assert [m["role"] for m in item["messages"]] == ["user", "assistant", "retrieval", "user", "assistant"]
    assert item["messages"][2]["documents"][0]["id"] == "loop"


def test_after_system_position_and_callable_retriever():
    calls = []

    def retriever(query):
        calls.append(query)
        return DOCS

    task = RAGTask([chat("q1", system="S"), chat("q2")], retriever, top_k=2, position="after_system")
    assert [m["role"] for m in task[0]["messages"]] == ["system", "retrieval", "user", "assistant"]
    assert [m["role"] for m in task[-1]["messages"]] == ["retrieval", "user", "assistant"]  # no system: first
    assert len(task[1]["messages"][0]["documents"]) == 2 and calls == ["q1", "q2", "q2"]
    assert len(task) == 2 and [i["id"] for i in task] == ["q1", "q2"]


def test_iterables_and_no_documents():
    task = RAGTask((c for c in [chat("a"), chat("b")]), lambda q: [], top_k=1)
    items = list(task)
    assert [m["documents"] for m in (i["messages"][0] for i in items)] == [[], []]
    assert items[0]["messages"][0]["content"] == "[RETRIEVAL_START]\n[RETRIEVAL_END]"
    with pytest.raises(TypeError, match="cannot be indexed"):
        task[0]
    with pytest.raises(TypeError, match="has no length"):
        len(task)


def test_conversation_errors():
    task = RAGTask([{"messages": [{"role": "system", "content": "s"}]}, {"text": "x"}, chat("q")], lambda q: DOCS)
    with pytest.raises(ValueError, match=r"conversation 0 has no user message \(roles \['system'\]\)"):
        task[0]
    with pytest.raises(TypeError, match="conversation 1 must be a dict with 'messages'"):
        task[1]
    with pytest.raises(IndexError, match="index 3 is out of range for a task of 3"):
        task[3]
    done = task[2]
    with pytest.raises(ValueError, match="conversation 0 already holds a retrieval message"):
        RAGTask([done], lambda q: DOCS)[0]
    with pytest.raises(TypeError, match="the retriever's result .* must be a Document"):
        RAGTask([chat("q")], lambda q: ["text"])[0]


@pytest.mark.parametrize("options, error, match", [
    ({"top_k": 0}, ValueError, "top_k must be >= 1, got 0"), ({"top_k": 1.5}, TypeError, "top_k must be an int"),
    ({"position": "end"}, ValueError, "position must be one of"), ({"max_chars": 0}, ValueError, "max_chars must")])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        RAGTask([], lambda q: [], **options)


def test_bad_retriever_and_conversations(kb):
    with pytest.raises(TypeError, match="retriever must be a KnowledgeBase .* got int"):
        RAGTask([], 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        RAGTask([], kb, mode="sparse")
    with pytest.raises(TypeError, match="conversations must be a list, Dataset or iterable"):
        RAGTask("abc", kb)


def test_static_task():
    conversations = [{**chat("q1"), "documents": DOCS[:1]}, {**chat("q2"), "documents": []}]
    task = StaticRAGTask(conversations)
    assert "documents" not in task[0] and task[0]["messages"][0]["documents"][0]["id"] == "with"
    assert task[1]["messages"][0]["documents"] == []
    parallel = StaticRAGTask([chat("q")], documents=[[{"text": "t", "title": "x"}]])
    assert parallel[0]["messages"][0]["documents"][0]["text"] == "t"
    with pytest.raises(ValueError, match="conversation 0 has no 'documents' key"):
        StaticRAGTask([chat("q")])[0]
    with pytest.raises(ValueError, match="documents holds 2 lists for 1 conversations"):
        StaticRAGTask([chat("q")], documents=[[], []])


def test_multihop_follows_the_name_to_the_second_passage():
    texts = {d.id: d for d in DOCS}

    def retriever(query):  # the second passage is found only through the name "__exit__"
        return [texts["exit"]] if "__exit__" in query else [texts["with"]]

    item = MultiHopRAGTask([chat("What must the method the with statement calls return?")], retriever,
                           max_hops=3, top_k=1)[0]
    retrieval = item["messages"][0]
    assert [h["documents"][0]["id"] for h in retrieval["hops"]] == ["with", "exit"]
    assert retrieval["stopped"] == "no_new_passages"  # hop 3 finds "exit" again
    assert "__exit__" in retrieval["hops"][1]["query"]
    assert [d["id"] for d in retrieval["documents"]] == ["with", "exit"]
    assert "[HOP_2] Query:" in retrieval["content"] and len(parse_retrieval_block(retrieval["content"])) == 2


def test_multihop_hop_limit_and_duplicates(kb):
    task = MultiHopRAGTask([], kb, max_hops=2, top_k=1, mode="bm25")
    hops, stopped = task.retrieve_hops("with statement suite")
    assert stopped == "max_hops" and len(hops) == 2
    ids = [h["documents"][0]["id"] for h in hops]
    assert len(set(ids)) == 2  # hop 2 keeps its best passage that hop 1 did not have
    single, stopped = MultiHopRAGTask([], kb, max_hops=1, top_k=3).retrieve_hops("loop")
    assert stopped == "max_hops" and len(single) == 1
    nothing, stopped = MultiHopRAGTask([], lambda q: [], max_hops=4).retrieve_hops("q")
    assert (nothing, stopped) == ([], "no_new_passages")


def test_multihop_errors():
    with pytest.raises(ValueError, match="max_hops must be >= 1"):
        MultiHopRAGTask([], lambda q: [], max_hops=0)
    with pytest.raises(TypeError, match="next_query must be a callable"):
        MultiHopRAGTask([], lambda q: [], next_query="q")
    task = MultiHopRAGTask([], lambda q: DOCS[:1] if q == "q" else DOCS[1:], next_query=lambda q, p: "")
    with pytest.raises(ValueError, match="next_query returned '' for hop 2"):
        task.retrieve_hops("q")
    with pytest.raises(ValueError, match="question must be a non-empty str"):
        task.retrieve_hops(" ")


def test_default_next_query():
    passages = [{"id": "1", "title": "with", "text": "calls __enter__ and __exit__ then NameError", "score": None},
                {"id": "2", "title": "plain", "text": "no names here", "score": None}]
    assert default_next_query("what does __enter__ do", passages) == "what does __enter__ do __exit__ NameError plain"


def test_create_rag_task(kb):
    assert isinstance(create_rag_task("rag", [], kb), RAGTask)
    assert isinstance(create_rag_task("multihop", [], kb, max_hops=3), MultiHopRAGTask)
    assert isinstance(create_rag_task("static", [], documents=[]), StaticRAGTask)
    with pytest.raises(ValueError, match="kind must be one of"):
        create_rag_task("dense", [], kb)
    with pytest.raises(ValueError, match="kind='rag' needs a retriever"):
        create_rag_task("rag", [])
    with pytest.raises(ValueError, match="retriever must be None"):
        create_rag_task("static", [], kb)
