"""Tasks of conversations with retrieval: each conversation gets a retrieval message with its passages.

    task = RAGTask(conversations, knowledge_base, top_k=3)       # retrieves for the last user message
    task[0]["messages"]  # [..., {"role": "retrieval", "content": "[RETRIEVAL_START] ...", "documents": [...]},
                         #  {"role": "user", ...}, {"role": "assistant", ...}]

A task of conversations is a list (or any sequence, a Hugging Face Dataset included) of {"messages": [{"role",
"content"}, ...]} dicts, or an iterable of them (then the task can be iterated, not indexed). A retriever is a
KnowledgeBase (anything with .search(query, k, mode)) or a callable query -> list of Documents, SearchResults or
passage dicts (its first top_k are kept). The retrieval message goes right before the user message retrieved for
("before_user") or right after the system message ("after_system"; first when there is none). Items are built on
access and the input conversations are never changed.
"""
import re
from collections.abc import Iterable, Mapping, Sequence

from ..retrieval.prompting import _check_int
from .formatting import (RETRIEVAL_ROLE, as_passages, check_conversation, format_multihop_documents,
                         retrieval_message)

__all__ = ["RAGTask", "StaticRAGTask", "MultiHopRAGTask", "create_rag_task", "default_next_query", "POSITIONS"]

POSITIONS = ("before_user", "after_system")
MODES = ("dense", "bm25", "hybrid")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _user_index(messages, where):
    """Index of the last user message (the question retrieved for)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "user":
            return index
    raise ValueError(f"{where} has no user message (roles {[m['role'] for m in messages]}): there is no question to "
                     "retrieve for")


def _insert(conversation, messages, message, position, user):
    """A copy of `conversation` whose messages hold `message` at `position`; other keys are kept."""
    messages = [dict(m) for m in messages]
    if position == "before_user":
        at = user
    else:
        at = 1 if messages[0]["role"] == "system" else 0
    messages.insert(at, message)
    return {**conversation, "messages": messages}


class _ConversationTask:
    """Shared part: the conversations, indexing, iteration and insertion of the retrieval message."""

    def __init__(self, conversations, *, position="before_user", max_chars=None):
        if isinstance(conversations, (str, bytes, Mapping)) or not isinstance(conversations, Iterable):
            raise TypeError(f"conversations must be a list, Dataset or iterable of {{'messages': [...]}} dicts, got "
                            f"{type(conversations).__name__}")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        if max_chars is not None:
            _check_int("max_chars", max_chars, 1)
        self.conversations = conversations
        self.position = position
        self.max_chars = max_chars

    @property
    def indexable(self):
        return isinstance(self.conversations, Sequence) or (hasattr(self.conversations, "__getitem__")
                                                            and hasattr(self.conversations, "__len__"))

    def __len__(self):
        if not hasattr(self.conversations, "__len__"):
            raise TypeError(f"this task wraps a {type(self.conversations).__name__}, which has no length")
        return len(self.conversations)

    def __getitem__(self, index):
        if not self.indexable:
            raise TypeError(f"this task wraps a {type(self.conversations).__name__}, which cannot be indexed; "
                            "iterate over the task instead")
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        size = len(self.conversations)
        if not -size <= index < size:
            raise IndexError(f"index {index} is out of range for a task of {size} conversations")
        index %= size
        return self._build(index, self.conversations[index])

    def __iter__(self):
        for index, conversation in enumerate(self.conversations):
            yield self._build(index, conversation)

    def _build(self, index, conversation):
        where = f"conversation {index}"
        messages = check_conversation(conversation, where)
        if any(m["role"] == RETRIEVAL_ROLE for m in messages):
            raise ValueError(f"{where} already holds a retrieval message")
        user = _user_index(messages, where)
        message = self._retrieve(index, conversation, messages[user]["content"])
        return _insert(self._strip(conversation), messages, message, self.position, user)

    def _strip(self, conversation):
        return conversation

    def _retrieve(self, index, conversation, query):
        raise NotImplementedError


def _check_retriever(retriever, mode):
    if hasattr(retriever, "search") and callable(retriever.search):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return "knowledge_base"
    if callable(retriever):
        return "callable"
    raise TypeError(f"retriever must be a KnowledgeBase (with .search) or a callable query -> documents, got "
                    f"{type(retriever).__name__}")


class RAGTask(_ConversationTask):
    """Retrieves for each conversation's last user message and inserts the passages as a retrieval message.

    Args:
        conversations: the task (see the module docstring).
        retriever: a KnowledgeBase or a callable query -> documents.
        top_k: passages per conversation (>= 1).
        mode: the KnowledgeBase's search mode ("dense", "bm25", "hybrid"); unused for a callable.
        position: "before_user" or "after_system".
        max_chars: cut each passage's text in the block to this many characters.
    """

    def __init__(self, conversations, retriever, *, top_k=3, mode="hybrid", position="before_user", max_chars=None):
        super().__init__(conversations, position=position, max_chars=max_chars)
        _check_int("top_k", top_k, 1)
        self.kind = _check_retriever(retriever, mode)
        self.retriever, self.top_k, self.mode = retriever, top_k, mode

    def search(self, query, k=None):
        """The first k (default top_k) passages for `query`, as passage dicts (see formatting.as_passages)."""
        k = self.top_k if k is None else k
        if self.kind == "knowledge_base":
            hits = self.retriever.search(query, k=k, mode=self.mode)
        else:
            hits = self.retriever(query)
        return as_passages(list(hits), name=f"the retriever's result for {query[:60]!r}")[:k]

    def _retrieve(self, index, conversation, query):
        return retrieval_message(self.search(query), max_chars=self.max_chars)


class StaticRAGTask(_ConversationTask):
    """Pre-retrieved passages: each conversation's "documents" key (removed from the item), or a parallel list
    `documents` (one list of passages per conversation, same length as an indexable task)."""

    def __init__(self, conversations, documents=None, *, documents_key="documents", position="before_user",
                 max_chars=None):
        super().__init__(conversations, position=position, max_chars=max_chars)
        if not isinstance(documents_key, str):
            raise TypeError(f"documents_key must be a str, got {type(documents_key).__name__}")
        if documents is not None:
            if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence):
                raise TypeError(f"documents must be None or a list (one list of passages per conversation), got "
                                f"{type(documents).__name__}")
            if hasattr(conversations, "__len__") and len(documents) != len(conversations):
                raise ValueError(f"documents holds {len(documents)} lists for {len(conversations)} conversations")
        self.documents, self.documents_key = documents, documents_key

    def _retrieve(self, index, conversation, query):
        if self.documents is not None:
            if index >= len(self.documents):
                raise ValueError(f"conversation {index} has no entry in documents (it holds {len(self.documents)})")
            found = self.documents[index]
        elif self.documents_key in conversation:
            found = conversation[self.documents_key]
        else:
            raise ValueError(f"conversation {index} has no {self.documents_key!r} key and no documents= list was "
                             "given: a static task needs each conversation's passages")
        return retrieval_message(as_passages(found, name=f"conversation {index} documents"),
                                 max_chars=self.max_chars)

    def _strip(self, conversation):
        if self.documents is None:
            return {key: value for key, value in conversation.items() if key != self.documents_key}
        return conversation


def _names(text):
    """Identifier-like words of `text` in order of first appearance: with "_" or an inner capital ("__exit__",
    "NameError"): the names a passage hands to the next hop."""
    names = {}
    for word in _IDENTIFIER.findall(text):
        if "_" in word.strip("_") or word.startswith("__") or any(c.isupper() for c in word[1:]):
            names.setdefault(word, None)
    return list(names)


def default_next_query(question, passages, *, terms=4):
    """The query of the next hop: the question, then per new passage up to `terms` names it holds that the
    question does not (identifier-like words such as "__exit__", "NameError": what the next hop must find), or its
    title when it holds none."""
    used = {w.lower() for w in _IDENTIFIER.findall(question)}
    parts = [question]
    for passage in passages:
        names = [n for n in _names(passage["text"]) if n.lower() not in used][:terms]
        if not names and passage["title"]:
            names = [passage["title"]]
        used.update(n.lower() for n in names)
        parts.extend(names)
    return " ".join(parts)


class MultiHopRAGTask(RAGTask):
    """Recursive retrieval: hop 1 searches the question; hop n+1 searches next_query(question, passages hop n found
    that no earlier hop had) and keeps its best top_k passages that no earlier hop had. Stops after max_hops hops,
    or at the first hop that brings no new passage.

    Each item's retrieval message holds every distinct passage (in hop order, format_multihop_documents) and a
    "hops" list: [{"hop": n, "query": str, "documents": [passage dicts new in that hop]}]; "stopped" tells why it
    ended ("max_hops" or "no_new_passages").

    Args: as RAGTask, plus max_hops (>= 1) and next_query (callable (question, new_passages) -> str; default
    `default_next_query`).
    """

    def __init__(self, conversations, retriever, *, max_hops=2, top_k=3, mode="hybrid", next_query=None,
                 position="before_user", max_chars=None):
        super().__init__(conversations, retriever, top_k=top_k, mode=mode, position=position, max_chars=max_chars)
        _check_int("max_hops", max_hops, 1)
        if next_query is not None and not callable(next_query):
            raise TypeError(f"next_query must be a callable (question, passages) -> str, got "
                            f"{type(next_query).__name__}")
        self.max_hops, self.next_query = max_hops, next_query or default_next_query

    def retrieve_hops(self, question):
        """(hops, stopped) for one question; see the class docstring."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question must be a non-empty str, got {question!r}")
        hops, seen, query = [], set(), question
        while True:
            fresh = []
            for passage in self.search(query, k=self.top_k + len(seen)):  # deep enough for top_k unseen ones
                key = passage["id"] if passage["id"] is not None else (passage["title"], passage["text"])
                if key not in seen and len(fresh) < self.top_k:
                    seen.add(key)
                    fresh.append(passage)
            if not fresh:
                return hops, "no_new_passages"
            hops.append({"hop": len(hops) + 1, "query": query, "documents": fresh})
            if len(hops) == self.max_hops:
                return hops, "max_hops"
            query = self.next_query(question, fresh)
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"next_query returned {query!r} for hop {len(hops) + 1}: expected a non-empty str")

    def _retrieve(self, index, conversation, query):
        hops, stopped = self.retrieve_hops(query)
        content = format_multihop_documents(hops, max_chars=self.max_chars)
        message = retrieval_message([p for hop in hops for p in hop["documents"]], content=content)
        message["hops"], message["stopped"] = hops, stopped
        return message


_KINDS = {"rag": RAGTask, "static": StaticRAGTask, "multihop": MultiHopRAGTask}


def create_rag_task(kind, conversations, retriever=None, **options):
    """A task by name: "rag" (RAGTask, needs retriever), "static" (StaticRAGTask; retriever must be None; pass
    documents= or per-conversation "documents"), "multihop" (MultiHopRAGTask, needs retriever). `options` go to the
    class."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if kind == "static":
        if retriever is not None:
            raise ValueError("kind='static' uses pre-retrieved documents: retriever must be None, got "
                             f"{type(retriever).__name__}")
        return StaticRAGTask(conversations, **options)
    if retriever is None:
        raise ValueError(f"kind={kind!r} needs a retriever (a KnowledgeBase or a callable query -> documents)")
    return _KINDS[kind](conversations, retriever, **options)
