"""The search tool: BM25 (the bm25s library) over a local .jsonl corpus, one document per line: {"text": ...},
optionally "title" and "id". The corpus is read and indexed once, when the tool is built; every problem with it is
a UserError naming the file and the line."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from .base import Tool, ToolError, string_tool

if TYPE_CHECKING:
    import bm25s  # imported when a corpus is indexed (a third of a second), not with the package

CORPUS_FIX = 'one JSON object per line, e.g. {"title": "...", "text": "..."}'


@dataclass(frozen=True)
class Document:
    text: str
    title: str | None = None
    id: str | None = None


def search_tool(corpus_path: str, top_k: int) -> Tool:
    """The "search" tool: one argument "query"; returns the top_k documents of the corpus by BM25."""
    documents = read_corpus(corpus_path)
    index = build_index(documents)
    description = (
        f"Searches a local collection of {len(documents)} documents by keywords (BM25) and returns up to "
        f"{top_k} matching documents, best first."
    )
    return string_tool("search", description, "query", "Keywords to search for", lambda query: search(index, documents, query, top_k))


def read_corpus(corpus_path: str) -> list[Document]:
    """The documents of a .jsonl file, or UserError naming the file, the line and the fix."""
    path = Path(corpus_path)
    if not path.is_file():
        raise UserError(f"--search_corpus {corpus_path}: no such file; pass a .jsonl file with {CORPUS_FIX}")
    documents, number = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    documents.append(parse_line(line, f"--search_corpus {corpus_path} line {number}"))
    except UnicodeDecodeError:
        raise UserError(f"--search_corpus {corpus_path} line {number + 1}: not UTF-8 text; save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"--search_corpus {corpus_path}: cannot read it ({e.strerror}); check the file's permissions") from None
    if not documents:
        raise UserError(f"--search_corpus {corpus_path}: the file has no documents; write {CORPUS_FIX}")
    return documents


def parse_line(line: str, where: str) -> Document:
    """One corpus line as a Document; `where` names the file and line in the error."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON ({e.msg}); write {CORPUS_FIX}") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise UserError(f'{where}: needs a "text" string field; write {CORPUS_FIX}')
    title, id_ = row.get("title"), row.get("id")
    return Document(row["text"], None if title is None else str(title), None if id_ is None else str(id_))


def build_index(documents: list[Document]) -> "bm25s.BM25":
    """A BM25 index of the documents' title and text."""
    import bm25s

    index = bm25s.BM25()
    texts = [f"{d.title}\n{d.text}" if d.title else d.text for d in documents]
    index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    return index


def search(index: "bm25s.BM25", documents: list[Document], query: str, top_k: int) -> str:
    """The best documents for the query, formatted for the model; ToolError for a blank query."""
    import bm25s

    if not query.strip():
        raise ToolError("search: the query is empty; write the keywords to search for")
    tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
    found, scores = index.retrieve(tokens, k=min(top_k, len(documents)), show_progress=False)
    hits = [documents[int(i)] for i, score in zip(found[0], scores[0]) if score > 0]
    if not hits:
        return f"No documents match {query!r}; try other keywords."
    return "\n\n".join(format_hit(rank, document) for rank, document in enumerate(hits, start=1))


def format_hit(rank: int, document: Document) -> str:
    """'[1] Title' (or '[1]') then the text."""
    heading = f"[{rank}] {document.title}" if document.title else f"[{rank}]"
    return f"{heading}\n{document.text}"
