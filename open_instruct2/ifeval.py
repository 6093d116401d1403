"""The `ifeval` verifier: instruction-following constraints, as in IFEval and open-instruct's IF data.

Ground truth, as open-instruct stores it: a JSON string of {"instruction_id": [...], "kwargs": [{...}, ...]}
(or a one-element list holding that object); kwargs entries may carry unused keys set to null.
Score = the fraction of the row's constraints the response satisfies (partial credit; 1.0 = all).

Supported instruction ids (IFEval's names and arguments):
  length_constraints:number_words (relation, num_words)      length_constraints:number_sentences (relation, num_sentences)
  length_constraints:number_paragraphs (num_paragraphs; paragraphs split by a *** line)
  keywords:existence (keywords)   keywords:forbidden_words (forbidden_words)   keywords:frequency (keyword, frequency, relation)
  keywords:letter_frequency (letter, let_frequency, let_relation)   punctuation:no_comma
  change_case:english_lowercase   change_case:english_capital   change_case:capital_word_frequency (capital_frequency, capital_relation)
  detectable_format:json_format   detectable_format:title (<<title>>)   detectable_format:number_bullet_lists (num_bullets)
  detectable_format:number_highlighted_sections (num_highlights)   detectable_format:multiple_sections (section_spliter, num_sections)
  detectable_content:number_placeholders (num_placeholders, [like this])   detectable_content:postscript (postscript_marker)
  startend:end_checker (end_phrase)   startend:quotation
Relations are IFEval's: "less than" (count < N) and "at least" (count >= N).
"""

import json
import re

from .verifiers import register


def _compare(count: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"relation {relation!r} must be 'less than' or 'at least'")


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w+\b", text)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]


def _count_word(text: str, word: str) -> int:
    """Whole-word occurrences; the edges are 'no word character next to it', so words that start or end
    with a symbol ($5, C++) are found too (\\b cannot sit before a $)."""
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE))


def _paragraphs(text: str, num_paragraphs: int) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", text)
    if parts and not parts[0].strip():
        parts = parts[1:]
    if parts and not parts[-1].strip():
        parts = parts[:-1]
    return len(parts) == num_paragraphs and all(p.strip() for p in parts)


def _json(text: str) -> bool:
    body = text.strip()
    body = re.sub(r"^```(?:json|Json|JSON)?\s*", "", body)
    body = re.sub(r"\s*```$", "", body)
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def _bullets(text: str) -> int:
    return len(re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)) + len(re.findall(r"^\s*-.*$", text, flags=re.MULTILINE))


def _highlights(text: str) -> int:
    return sum(1 for h in re.findall(r"\*[^\n\*]+\*", text) if h.strip("*").strip()) + sum(
        1 for h in re.findall(r"\*\*[^\n\*]+\*\*", text) if h.strip("*").strip()
    )


def _sections(text: str, splitter: str, n: int) -> bool:
    parts = re.split(rf"\s?{re.escape(splitter)}\s?\d+\s?", text)
    return len(parts) - 1 >= n


CONSTRAINTS = {
    "length_constraints:number_words": lambda r, k: _compare(len(_words(r)), k["relation"], k["num_words"]),
    "length_constraints:number_sentences": lambda r, k: _compare(len(_sentences(r)), k["relation"], k["num_sentences"]),
    "length_constraints:number_paragraphs": lambda r, k: _paragraphs(r, k["num_paragraphs"]),
    "keywords:existence": lambda r, k: all(re.search(re.escape(w), r, flags=re.IGNORECASE) for w in k["keywords"]),
    "keywords:forbidden_words": lambda r, k: not any(_count_word(r, w) for w in k["forbidden_words"]),
    "keywords:frequency": lambda r, k: _compare(_count_word(r, k["keyword"]), k["relation"], k["frequency"]),
    "keywords:letter_frequency": lambda r, k: _compare(r.lower().count(k["letter"].lower()), k["let_relation"], k["let_frequency"]),
    "punctuation:no_comma": lambda r, k: "," not in r,
    "change_case:english_lowercase": lambda r, k: r == r.lower() and any(c.isalpha() for c in r),
    "change_case:english_capital": lambda r, k: r == r.upper() and any(c.isalpha() for c in r),
    "change_case:capital_word_frequency": lambda r, k: _compare(
        sum(1 for w in _words(r) if w.isupper()), k["capital_relation"], k["capital_frequency"]
    ),
    "detectable_format:json_format": lambda r, k: _json(r),
    "detectable_format:title": lambda r, k: any(t.strip() for t in re.findall(r"<<([^\n<>]+)>>", r)),
    "detectable_format:number_bullet_lists": lambda r, k: _bullets(r) == k["num_bullets"],
    "detectable_format:number_highlighted_sections": lambda r, k: _highlights(r) >= k["num_highlights"],
    "detectable_format:multiple_sections": lambda r, k: _sections(r, k["section_spliter"], k["num_sections"]),
    "detectable_content:number_placeholders": lambda r, k: len(re.findall(r"\[.*?\]", r)) >= k["num_placeholders"],
    "detectable_content:postscript": lambda r, k: bool(
        re.search(rf"\s*{re.escape(k['postscript_marker'].lower())}.*$", r.lower(), flags=re.MULTILINE)
    ),
    "startend:end_checker": lambda r, k: r.strip().strip('"').strip().lower().endswith(k["end_phrase"].strip().lower()),
    "startend:quotation": lambda r, k: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
}


def parse_ground_truth(ground_truth: str) -> list[tuple[str, dict]]:
    """[(instruction id, kwargs without nulls)], or ValueError naming what is wrong."""
    try:
        data = json.loads(ground_truth)
    except ValueError:
        raise ValueError(f"ifeval ground truth is not JSON: {ground_truth[:80]!r}") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict) or "instruction_id" not in data:
        raise ValueError("ifeval ground truth must be {'instruction_id': [...], 'kwargs': [...]}")
    ids = data["instruction_id"]
    kwargs = data.get("kwargs") or [{} for _ in ids]
    if len(kwargs) != len(ids):
        raise ValueError(f"ifeval ground truth has {len(ids)} instruction ids but {len(kwargs)} kwargs")
    out = []
    for instruction, args in zip(ids, kwargs):
        if instruction not in CONSTRAINTS:
            raise ValueError(f"ifeval instruction {instruction!r} is not supported; supported: {', '.join(sorted(CONSTRAINTS))}")
        out.append((instruction, {k: v for k, v in (args or {}).items() if v is not None}))
    return out


@register("ifeval", "Instruction-following constraints (IFEval ids, e.g. length_constraints:number_words, keywords:existence, punctuation:no_comma, detectable_format:json_format); ground truth {'instruction_id': [...], 'kwargs': [...]}; score = fraction satisfied.", parse_ground_truth)
def verify_ifeval(response: str, ground_truth: str) -> float:
    constraints = parse_ground_truth(ground_truth)
    if not constraints:
        return 0.0
    satisfied = 0
    for instruction, kwargs in constraints:
        try:
            satisfied += bool(CONSTRAINTS[instruction](response, kwargs))
        except KeyError as missing:
            raise ValueError(f"ifeval {instruction}: missing argument {missing}") from None
    return satisfied / len(constraints)
