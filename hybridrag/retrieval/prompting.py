"""Retrieved documents in a prompt, and the citations in a model's answer.

Prompt layout (`format_documents`), one block per document, blocks separated by one blank line:

    [DOC_1] Title of the first document
    Text of the first document. [/DOC_1]

    [DOC_2]
    A document without a title (or include_title=False): the header line is the bare token. [/DOC_2]

i.e. "[DOC_n]" + (" " + title if there is one) + "\\n" + text + " [/DOC_n]". Numbers run from `start`.

Boundary safety: a document's title or text could itself contain "[DOC_3]" or "[/DOC_1]" (a knowledge base built
from earlier prompts, a page about this format) and would then end its block early or fake a citation. Such tokens
are escaped, not refused: the "[" that opens anything that reads as a boundary or citation token ("[", optional
spaces, optional "/", optional spaces, "DOC_" in any letter case) becomes "(". The text is otherwise unchanged
(same length), `parse_documents` recovers exactly the blocks that were written, and no citation can come from
document text. Whitespace runs in a title (newlines included) become one space, so the header stays one line.

Citations (`extract_citations`): a citation group is "[" DOC_n ("," DOC_n)* "]", with optional spaces inside and
"DOC" in any letter case: "[DOC_1]", "[doc_2]", "[DOC_1, DOC_3]", "[ DOC_4 ]"; adjacent groups "[DOC_1][DOC_2]"
are two groups. Closing tokens "[/DOC_n]" are not citations, nor are "DOC_1" without brackets, "[1]" or
"[DOC 1]". Numbers come back unique, in order of first appearance.
"""
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["format_documents", "parse_documents", "extract_citations", "check_citations", "Citations",
           "escape_boundaries"]

# "[" that opens a boundary or citation token: escaped in document text, so the layout cannot be broken.
_TOKEN_OPEN = re.compile(r"\[(?=\s*/?\s*doc_)", re.IGNORECASE)
_GROUP = re.compile(r"\[\s*(doc_\d+(?:\s*,\s*doc_\d+)*)\s*\]", re.IGNORECASE)
_NUMBER = re.compile(r"doc_(\d+)", re.IGNORECASE)
_BLOCK = re.compile(r"\[DOC_(\d+)\](?: ([^\n]*))?\n(.*?) \[/DOC_\1\]", re.DOTALL)
_SPACES = re.compile(r"\s+")


def escape_boundaries(text: str) -> str:
    """`text` with the "[" of every boundary- or citation-like token ("[DOC_", "[/doc_", "[ DOC_", ...) replaced by
    "(": same length, nothing else changed."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _TOKEN_OPEN.sub("(", text)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def format_documents(documents: Sequence, *, start: int = 1, include_title: bool = True,
                     max_chars: int | None = None) -> str:
    """The documents as "[DOC_n] title\\ntext [/DOC_n]" blocks separated by blank lines (layout in the module doc).

    Args:
        documents: Document objects (anything with str attributes `text` and `title`), in prompt order.
        start: number of the first document (>= 1).
        include_title: put the title on the header line (documents with an empty title get a bare header anyway).
        max_chars: if given (>= 1), each text is cut to its first max_chars characters (no marker is added).
    Returns:
        The prompt fragment; "" for no documents. Boundary-like tokens inside titles and texts are escaped.
    """
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise TypeError(f"documents must be a sequence of Document, got {type(documents).__name__}")
    _check_int("start", start, 1)
    if not isinstance(include_title, bool):
        raise TypeError(f"include_title must be a bool, got {type(include_title).__name__}")
    if max_chars is not None:
        _check_int("max_chars", max_chars, 1)
    for i, doc in enumerate(documents):
        text, title = getattr(doc, "text", None), getattr(doc, "title", None)
        if not isinstance(text, str) or not isinstance(title, str):
            raise TypeError(f"documents[{i}] must be a Document (str attributes text and title), "
                            f"got {type(doc).__name__}")
    blocks = []
    for n, doc in enumerate(documents, start=start):
        title = _SPACES.sub(" ", escape_boundaries(doc.title)).strip() if include_title else ""
        text = doc.text if max_chars is None else doc.text[:max_chars]
        header = f"[DOC_{n}] {title}" if title else f"[DOC_{n}]"
        blocks.append(f"{header}\n{escape_boundaries(text)} [/DOC_{n}]")
    return "\n\n".join(blocks)


def parse_documents(prompt: str) -> list[tuple[int, str, str]]:
    """The (number, title, text) of every "[DOC_n] ...[/DOC_n]" block in `prompt`, in order: the inverse of
    `format_documents` (texts and titles as written there, i.e. escaped and cut). Text around the blocks is ignored."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return [(int(n), title or "", text) for n, title, text in _BLOCK.findall(prompt)]


@dataclass(frozen=True)
class Citations:
    """Document numbers cited by a response: `valid` (in start..start+num_documents-1) and `invalid` (cited but
    outside that range: the model cited a document it was not given). Each in order of first appearance, unique."""
    valid: list[int]
    invalid: list[int]


def _cited_numbers(response):
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    numbers = []
    seen = set()
    for group in _GROUP.finditer(response):
        for number in _NUMBER.findall(group.group(1)):
            number = int(number)
            if number not in seen:
                seen.add(number)
                numbers.append(number)
    return numbers


def check_citations(response: str, *, num_documents: int, start: int = 1) -> Citations:
    """Split the numbers cited in `response` into those of the num_documents documents of the prompt (numbered from
    `start`, as in `format_documents`) and the rest."""
    _check_int("num_documents", num_documents, 0)
    _check_int("start", start, 1)
    numbers = _cited_numbers(response)
    stop = start + num_documents
    return Citations(valid=[n for n in numbers if start <= n < stop],
                     invalid=[n for n in numbers if not start <= n < stop])


def extract_citations(response: str, *, num_documents: int | None = None, start: int = 1) -> list[int]:
    """Document numbers cited in `response` ("[DOC_n]" groups, see the module doc), unique, in order of first
    appearance. With num_documents, only the numbers of real documents (start..start+num_documents-1) are returned;
    use `check_citations` to see the others."""
    if num_documents is None:
        return _cited_numbers(response)
    return check_citations(response, num_documents=num_documents, start=start).valid
