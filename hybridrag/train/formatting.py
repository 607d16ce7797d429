"""Retrieved passages as training text, and RAG conversations as token ids with a loss mask.

Layout of a retrieval block (`format_documents_for_prompt`), one "[DOC_n]" block per passage:

    [RETRIEVAL_START]
    [DOC_1]
    Title: first title
    Content: first text
    [/DOC_1]
    [RETRIEVAL_END]

No passage gives "[RETRIEVAL_START]\\n[RETRIEVAL_END]" (retrieval ran and found nothing). `format_multihop_documents`
puts a "[HOP_n] Query: ..." line before each hop's passages; numbers run on across hops (DOC_n names one passage in
the whole block) and a passage already shown in an earlier hop is not repeated.

Boundary safety: a title or text holding "[DOC_3]", "[/DOC_1]", "[RETRIEVAL_END]" or "[HOP_2]" would end its block
early or fake a citation, so the "[" opening any such token becomes "(" (hybridrag.retrieval.prompting's
escape_boundaries, extended to these markers); `parse_retrieval_block` recovers exactly the passages written.
Whitespace runs in a title become one space, so a title stays one line.

A retrieval message is {"role": "retrieval", "content": <block>, "documents": [{"id", "title", "text", "score"}]}.
"""
import re
from collections.abc import Mapping, Sequence

from ..retrieval.documents import Document
from ..retrieval.prompting import _check_int, escape_boundaries

__all__ = ["RETRIEVAL_START", "RETRIEVAL_END", "RETRIEVAL_ROLE", "as_passages", "format_documents_for_prompt",
           "format_multihop_documents", "parse_retrieval_block", "escape_markers", "retrieval_message",
           "render_rag_conversation_for_tokenizer", "create_rag_training_example", "check_conversation"]

RETRIEVAL_START = "[RETRIEVAL_START]"
RETRIEVAL_END = "[RETRIEVAL_END]"
RETRIEVAL_ROLE = "retrieval"
RETRIEVAL_AS = ("merge", "system", "user")
_MARKER_OPEN = re.compile(r"\[(?=\s*/?\s*(?:retrieval_(?:start|end)|hop_))", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_BLOCK = re.compile(r"\[DOC_(\d+)\]\nTitle: ([^\n]*)\nContent: (.*?)\n\[/DOC_\1\]", re.DOTALL)


def escape_markers(text: str) -> str:
    """`text` with the "[" of every DOC, RETRIEVAL_START/END or HOP token replaced by "(" (same length)."""
    return _MARKER_OPEN.sub("(", escape_boundaries(text))


def as_passages(documents, name="documents"):
    """Passages as dicts {"id", "title", "text", "score"} from Documents, SearchResults (hits with .document and
    .score), or dicts with "text" (or "content") and optional "id", "title", "score". A passage without an id gets
    None. TypeError naming the position for anything else."""
    if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence):
        raise TypeError(f"{name} must be a list of Document, SearchResult or passage dicts, got "
                        f"{type(documents).__name__}")
    passages = []
    for position, item in enumerate(documents):
        score = None
        if hasattr(item, "document") and hasattr(item, "score"):  # SearchResult
            item, score = item.document, float(item.score)
        if isinstance(item, Document):
            passage = {"id": item.id, "title": item.title, "text": item.text, "score": score}
        elif isinstance(item, Mapping):
            text = item.get("text", item.get("content"))
            passage = {"id": item.get("id"), "title": item.get("title", ""), "text": text,
                       "score": item.get("score")}
        else:
            raise TypeError(f"{name}[{position}] must be a Document, SearchResult or dict with 'text', got "
                            f"{type(item).__name__}")
        for field in ("title", "text"):
            if not isinstance(passage[field], str):
                raise TypeError(f"{name}[{position}].{field} must be a str, got {type(passage[field]).__name__}")
        if passage["id"] is not None and not isinstance(passage["id"], str):
            raise TypeError(f"{name}[{position}].id must be a str or None, got {type(passage['id']).__name__}")
        if passage["score"] is not None and (isinstance(passage["score"], bool)
                                             or not isinstance(passage["score"], (int, float))):
            raise TypeError(f"{name}[{position}].score must be a number or None, got {passage['score']!r}")
        passages.append(passage)
    return passages


def _blocks(passages, start, max_chars):
    blocks = []
    for n, passage in enumerate(passages, start=start):
        title = _SPACES.sub(" ", escape_markers(passage["title"])).strip()
        text = passage["text"] if max_chars is None else passage["text"][:max_chars]
        blocks.append(f"[DOC_{n}]\nTitle: {title}\nContent: {escape_markers(text)}\n[/DOC_{n}]")
    return blocks


def format_documents_for_prompt(documents, *, start: int = 1, max_chars: int | None = None) -> str:
    """The retrieval block of `documents` (Documents, hits or passage dicts, see `as_passages`), numbered from
    `start`; each text cut to max_chars characters when given. Layout and escaping in the module docstring."""
    passages = as_passages(documents)
    _check_int("start", start, 1)
    if max_chars is not None:
        _check_int("max_chars", max_chars, 1)
    return "\n".join([RETRIEVAL_START, *_blocks(passages, start, max_chars), RETRIEVAL_END])


def _passage_key(passage):
    return ("id", passage["id"]) if passage["id"] is not None else ("text", passage["title"], passage["text"])


def format_multihop_documents(hops, *, max_chars: int | None = None) -> str:
    """One retrieval block over several hops.

    Args:
        hops: a list, one entry per hop, of either a list of passages (as `as_passages` takes) or a dict
            {"query": str, "documents": list} (MultiHopRAGTask's hop records).
        max_chars: cut each text to this many characters.
    Returns:
        "[RETRIEVAL_START]", then per hop "[HOP_h]" (+ " Query: q" when known) and its passages not shown in an
        earlier hop (same id, or same title and text when there is no id), numbered on from the previous hop;
        a hop with none left gets the line "(no new documents)"; then "[RETRIEVAL_END]".
    """
    if isinstance(hops, (str, bytes, Mapping)) or not isinstance(hops, Sequence):
        raise TypeError(f"hops must be a list of hops (lists of passages or {{'query', 'documents'}} dicts), got "
                        f"{type(hops).__name__}")
    if max_chars is not None:
        _check_int("max_chars", max_chars, 1)
    lines, seen, number = [RETRIEVAL_START], set(), 1
    for h, hop in enumerate(hops, start=1):
        query = None
        if isinstance(hop, Mapping):
            if "documents" not in hop:
                raise ValueError(f"hops[{h - 1}] is a dict without 'documents'; expected {{'query', 'documents'}}")
            query, hop = hop.get("query"), hop["documents"]
            if query is not None and not isinstance(query, str):
                raise TypeError(f"hops[{h - 1}]['query'] must be a str, got {type(query).__name__}")
        fresh = []
        for passage in as_passages(hop, name=f"hops[{h - 1}]"):
            key = _passage_key(passage)
            if key not in seen:
                seen.add(key)
                fresh.append(passage)
        header = f"[HOP_{h}]" if query is None else f"[HOP_{h}] Query: {_SPACES.sub(' ', escape_markers(query))}"
        lines.append(header.strip())
        lines.extend(_blocks(fresh, number, max_chars) or ["(no new documents)"])
        number += len(fresh)
    lines.append(RETRIEVAL_END)
    return "\n".join(lines)


def parse_retrieval_block(text: str) -> list[tuple[int, str, str]]:
    """The (number, title, content) of every "[DOC_n]" block in `text`, in order: the inverse of the formatters
    (titles and contents as written there, i.e. escaped and cut)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return [(int(n), title, content) for n, title, content in _BLOCK.findall(text)]


def retrieval_message(documents, *, max_chars: int | None = None, content: str | None = None) -> dict:
    """{"role": "retrieval", "content": the block (format_documents_for_prompt, unless `content` is given),
    "documents": the passage dicts}."""
    passages = as_passages(documents)
    if content is None:
        content = format_documents_for_prompt(passages, max_chars=max_chars)
    elif not isinstance(content, str):
        raise TypeError(f"content must be a str or None, got {type(content).__name__}")
    return {"role": RETRIEVAL_ROLE, "content": content, "documents": passages}


def check_conversation(conversation, where="conversation"):
    """The message list of `conversation` ({"messages": [{"role": str, "content": str}, ...]}), checked."""
    if not isinstance(conversation, Mapping) or "messages" not in conversation:
        raise TypeError(f"{where} must be a dict with 'messages', got {type(conversation).__name__}"
                        + (f" with keys {sorted(conversation)}" if isinstance(conversation, Mapping) else ""))
    messages = conversation["messages"]
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"{where}['messages'] must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{where}['messages'] is empty")
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"{where}['messages'][{position}] must be a dict, got {type(message).__name__}")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise TypeError(f"{where}['messages'][{position}]['{field}'] must be a str, got "
                                f"{type(message.get(field)).__name__}")
    return list(messages)


def _template_messages(messages, retrieval_as):
    """Messages a chat template knows (roles system/user/assistant): each retrieval message merged or renamed."""
    out = [dict(role=m["role"], content=m["content"]) for m in messages]
    position = 0
    while position < len(out):
        if out[position]["role"] != RETRIEVAL_ROLE:
            position += 1
            continue
        block = out.pop(position)["content"]
        following = out[position] if position < len(out) else None
        preceding = out[position - 1] if position > 0 else None
        if retrieval_as == "merge" and following is not None and following["role"] == "user":
            following["content"] = f"{block}\n\n{following['content']}"
        elif retrieval_as == "merge" and preceding is not None and preceding["role"] == "system":
            preceding["content"] = f"{preceding['content']}\n\n{block}"
        else:
            out.insert(position, {"role": "user" if retrieval_as == "merge" else retrieval_as, "content": block})
    return out


def _render(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_rag_conversation_for_tokenizer(conversation, tokenizer, *, retrieval_as: str = "merge",
                                          max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a (RAG) conversation through the tokenizer's chat template.

    Args:
        conversation: {"messages": [...]} with roles system/user/assistant and any retrieval messages.
        tokenizer: a Hugging Face fast tokenizer with a chat template (offsets are needed for the mask).
        retrieval_as: how a retrieval message reaches the template, which knows no "retrieval" role: "merge"
            (prepended to the user message that follows it, else appended to the system message before it, else
            a user message of its own), "system" or "user" (a message of that role).
        max_tokens: cut ids and mask to this many tokens.
    Returns:
        (ids, mask): lists of ints of equal length T; mask[t] = 1 for the tokens of assistant turns (the answer
        and the end-of-turn tokens the template writes after it), 0 for everything else (system, retrieval, user,
        the template's "assistant" headers). The ids are the tokenization of the whole rendered text.
    """
    messages = check_conversation(conversation)
    if retrieval_as not in RETRIEVAL_AS:
        raise ValueError(f"retrieval_as must be one of {RETRIEVAL_AS}, got {retrieval_as!r}")
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 1)
    if not getattr(tokenizer, "chat_template", None) or not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer with a chat template, got "
                        f"{type(tokenizer).__name__} without one")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer must be a fast tokenizer (offset mapping gives the loss mask), got "
                        f"{type(tokenizer).__name__}")
    messages = _template_messages(messages, retrieval_as)
    text = _render(tokenizer, messages, False)
    spans = []  # character spans [start, end) of the assistant turns in `text`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant message: it needs a system or user "
                             "message first")
        before = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[:i + 1], False)
        # The mask needs the template to render a conversation as its prefix's text and then more.
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(f"the chat template of {type(tokenizer).__name__} does not render message {i} "
                             "(assistant) after the text of the messages before it, so the answer's tokens cannot "
                             "be located for the loss mask")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    mask = [int(any(start <= first < end for start, end in spans)) for first, _ in encoded["offset_mapping"]]
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def create_rag_training_example(question: str, answer: str, documents, *, system: str | None = None,
                                max_chars: int | None = None, tokenizer=None, retrieval_as: str = "merge",
                                max_tokens: int | None = None) -> dict:
    """A RAG training conversation: {"messages": [system?, retrieval, user, assistant]}. With a tokenizer, also
    "input_ids" and "loss_mask" (render_rag_conversation_for_tokenizer). An empty answer or question is refused:
    it would train nothing or retrieve for nothing."""
    for name, value in (("question", question), ("answer", answer)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{name} is empty: a training example needs a {name}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a str or None, got {type(system).__name__}")
    retrieval = retrieval_message(documents, max_chars=max_chars)
    head = [{"role": "system", "content": system}] if system is not None else []
    turn = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    example = {"messages": head + [retrieval] + turn}
    if tokenizer is not None:
        ids, mask = render_rag_conversation_for_tokenizer(example, tokenizer, retrieval_as=retrieval_as,
                                                          max_tokens=max_tokens)
        example["input_ids"], example["loss_mask"] = ids, mask
    return example
