"""Answer checking: a registry from verifier name to a function (response text, ground truth) -> [0, 1].

Rows name their verifier in the `dataset` field (open-instruct's RLVR format). Verifiers know strings
only: no tensors, no config. `python -c "from open_instruct2.verifiers import describe; print(describe())"`
lists them with their docs. Time is bounded: answers are length-capped before parsing, and math-verify's
parsing and comparison run under 1-second alarms (main thread), so a pathological expression scores 0
instead of hanging the run.
"""

import json
import re
import string
from collections import Counter
from typing import Callable

VerifierFn = Callable[[str, str], float]
VERIFIERS: dict[str, VerifierFn] = {}
VERIFIER_DOCS: dict[str, str] = {}
GROUND_TRUTH_CHECKS: dict[str, Callable[[str], object]] = {}
MAX_ANSWER_CHARS = 400  # longer extracted answers are not parsed (they are never a short final answer)
_LOADING: list[str] | None = None  # names registered while load_verifier_module runs a user's file


def register(name: str, doc: str, check_ground_truth: Callable[[str], object] | None = None):
    """Decorator: add a verifier under `name` (user modules use this too). `check_ground_truth`, if given,
    parses a row's ground truth at start-up and raises ValueError naming what is wrong (its result is unused)."""

    def wrap(fn: VerifierFn) -> VerifierFn:
        if _LOADING is not None:
            _LOADING.append(name)
        VERIFIERS[name] = fn
        VERIFIER_DOCS[name] = doc
        if check_ground_truth is not None:
            GROUND_TRUTH_CHECKS[name] = check_ground_truth
        return fn

    return wrap


def describe() -> str:
    return "\n".join(f"{name}: {VERIFIER_DOCS[name]}" for name in sorted(VERIFIERS))


def final_answer(text: str, thinking_open: bool = False) -> str:
    """The one answer extraction every verifier and the rubric judge see: everything up to the last
    `</think>` is dropped (the reasoning is not the answer), and the last `<answer>...</answer>` block is
    taken when there is one (an unclosed last `<answer>` runs to the end).

    A response still inside a reasoning block has no final answer ("", which every verifier scores 0): a
    `<think>` with no `</think>` after it, or no `</think>` at all when the prompt itself opened the block
    (`thinking_open`: chat templates that end the generation prompt with `<think>`). Otherwise a response cut off
    mid-thought ("... which is 42, but let me verify") would be scored on its reasoning, and a truncating length
    limit would pay for stopping next to a number."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif thinking_open:
        return ""
    if "<think>" in text:
        return ""
    start = text.rfind("<answer>")
    if start >= 0:
        body = text[start + len("<answer>") :]
        text = body.split("</answer>", 1)[0]
    return text.strip()


def opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside a `<think>` block (its last `<think>` has no `</think>` after it)."""
    return prompt_text.rfind("<think>") > prompt_text.rfind("</think>")


# ---------------------------------------------------------------- numbers (gsm8k)

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> float | None:
    """'$1,234.50.' -> 1234.5; '-3.0' -> -3.0; None when there is no number."""
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def numbers_in(text: str) -> list[str]:
    return _NUMBER.findall(text)


def numbers_equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def gsm8k_truth(ground_truth: str) -> float:
    """The number after the last '####' of a gsm8k ground truth (the whole text when there is none)."""
    truth = normalize_number(ground_truth.split("####")[-1])
    if truth is None:
        raise ValueError(f"gsm8k ground truth {ground_truth!r} is not a number")
    return truth


@register("gsm8k", "The number after the last '####', else the last number in the text; commas, '$', trailing '.' and '.0' normalised; compared numerically. Numbers written in words score 0.")
def verify_gsm8k(response: str, ground_truth: str) -> float:
    truth = gsm8k_truth(ground_truth)
    if "####" in response:
        found = numbers_in(response.rsplit("####", 1)[1])
        candidate = found[0] if found else None
    else:
        found = numbers_in(response)
        candidate = found[-1] if found else None
    value = normalize_number(candidate) if candidate else None
    return float(value is not None and numbers_equal(value, truth))


@register("gsm8k_strict", "Only the number right after the last '####' counts (no fallback to the last number): the answer in the place the prompt asks for.")
def verify_gsm8k_strict(response: str, ground_truth: str) -> float:
    truth = gsm8k_truth(ground_truth)
    if "####" not in response:
        return 0.0
    after = response.rsplit("####", 1)[1].lstrip()
    found = _NUMBER.match(after)
    value = normalize_number(found.group(0)) if found else None
    return float(value is not None and numbers_equal(value, truth))


@register("gsm8k_shaped", "1 for the right number right after the last '####' (gsm8k_strict); 0.5 when only the last number of the text is right (the answer without the asked-for format); else 0.")
def verify_gsm8k_shaped(response: str, ground_truth: str) -> float:
    if verify_gsm8k_strict(response, ground_truth):
        return 1.0
    found = numbers_in(response)
    value = normalize_number(found[-1]) if found else None
    return 0.5 if value is not None and numbers_equal(value, gsm8k_truth(ground_truth)) else 0.0


@register("gsm8k_format", "The answer in the asked-for place, once: 1 for the right number right after the only '####'; 0.2 for a wrong number there; 0 without '####', with more than one (a list of guesses), or with no number after it.")
def verify_gsm8k_format(response: str, ground_truth: str) -> float:
    if response.count("####") != 1:
        return 0.0
    found = _NUMBER.match(response.split("####", 1)[1].lstrip())
    if not found:
        return 0.0
    value = normalize_number(found.group(0))
    return 1.0 if value is not None and numbers_equal(value, gsm8k_truth(ground_truth)) else 0.2


# ---------------------------------------------------------------- math


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, nested braces respected; `\\boxed 7` (LaTeX's
    brace-less form) gives its one token. A brace counts only right after the command, never a later one."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    command = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    after = rest[len(command) :]
    if not after.lstrip().startswith("{"):
        token = re.match(r"\s+([^\s$]+)", after)
        return token.group(1).rstrip(".") if token else None
    i = start + len(command) + (len(after) - len(after.lstrip()))
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_ANSWER_PHRASE = re.compile(r"(?:final answer is|the answer is|answer:)\s*\$?(.+?)\$?\s*(?:\.\s|\.?$|\n)", re.IGNORECASE | re.DOTALL)


def extract_math_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = _ANSWER_PHRASE.findall(text)
    return phrases[-1].strip() if phrases else None


def _plain(answer: str) -> str:
    """'\\text{(B)}' -> 'b': text wrappers, $, parentheses, spaces and case removed (for choices and words)."""
    answer = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", answer)
    return re.sub(r"[\s$()]", "", answer).lower().rstrip(".")


def math_equal(answer: str, truth: str) -> bool:
    """Mathematical equivalence with math-verify (fractions, decimals, intervals, x=3 vs 3, ...)."""
    if _plain(answer) == _plain(truth):
        return True
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    from math_verify import parse, verify
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"${truth}$", extraction_config=config, parsing_timeout=1)
    pred = parse(f"${answer}$", extraction_config=config, parsing_timeout=1)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=1))


@register("math", "The last \\boxed{...} (nested braces), else a final-answer phrase ('the answer is X'), compared with the ground truth for mathematical equivalence by math-verify (1/2 = 0.5 = \\frac{1}{2}, intervals, x=3 vs 3); 1-second bounds.")
def verify_math(response: str, ground_truth: str) -> float:
    answer = extract_math_answer(response)
    truths = [t for t in (last_boxed(ground_truth), ground_truth) if t]
    return float(answer is not None and any(math_equal(answer, t) for t in truths))


_MINERVA = re.compile(r"Final Answer: The final answer is (.+?)\. I hope it is correct\.")


@register("strict_math", "Only the Minerva form 'Final Answer: The final answer is X. I hope it is correct.' counts; X is compared as in math.")
def verify_strict_math(response: str, ground_truth: str) -> float:
    found = _MINERVA.findall(response)
    return float(bool(found) and math_equal(found[-1].strip().strip("$"), ground_truth))


# ---------------------------------------------------------------- strings


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_text_answer(response: str) -> str:
    """The text after the last 'answer:' (any case), else the whole response."""
    parts = re.split(r"answer\s*:", response, flags=re.IGNORECASE)
    return parts[-1].strip()


@register("string_matching", "Normalised exact match (lower case, no punctuation or articles) of the text after the last 'answer:' (else the whole response) against the ground truth.")
def verify_string_matching(response: str, ground_truth: str) -> float:
    return float(normalize_text(extract_text_answer(response)) == normalize_text(ground_truth))


@register("string_f1", "Token F1 between the normalised answer (as in string_matching) and the ground truth.")
def verify_string_f1(response: str, ground_truth: str) -> float:
    pred, gold = normalize_text(extract_text_answer(response)).split(), normalize_text(ground_truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold or common == 0:
        return float(pred == gold)
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _budget(ground_truth: str) -> int:
    try:
        value = int(str(ground_truth).strip())
    except ValueError:
        raise ValueError(f"length ground truth {ground_truth!r} must be a whole number of words") from None
    if value <= 0:
        raise ValueError(f"length ground truth {ground_truth!r} must be > 0")
    return value


@register("max_length", "Ground truth N is a budget in WORDS (whitespace-split; verifiers see text, not tokens): score 1 - |words - N| / N, at least 0 (hit the length).", _budget)
def verify_max_length(response: str, ground_truth: str) -> float:
    n = _budget(ground_truth)
    return max(0.0, 1.0 - abs(len(response.split()) - n) / n)


@register("up_to_max_length", "Ground truth N is a budget in WORDS: 1 up to N words, then 1 - (words - N) / N, at least 0.", _budget)
def verify_up_to_max_length(response: str, ground_truth: str) -> float:
    n, words = _budget(ground_truth), len(response.split())
    return 1.0 if words <= n else max(0.0, 1.0 - (words - n) / n)


from . import ifeval as _ifeval  # noqa: E402  (registers "ifeval")


# ---------------------------------------------------------------- user verifiers, remapping


def load_verifier_module(path: str) -> list[str]:
    """Execute a user's Python file that calls `register(...)`; returns the names it added."""
    import hashlib
    import importlib.util

    from .errors import UserError

    global _LOADING
    name = "open_instruct2_user_verifiers_" + hashlib.sha1(path.encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"--verifier_module {path!r} is not a Python file; give a .py file")
    module = importlib.util.module_from_spec(spec)
    _LOADING = []  # what this file registers (loaded again in the same process, e.g. a resumed run, it registers the same names)
    try:
        spec.loader.exec_module(module)
        added = sorted(set(_LOADING))
    except Exception as e:  # noqa: BLE001 - the user's code: report it in one line
        raise UserError(f"--verifier_module {path!r} failed to load: {type(e).__name__}: {e}; fix the file") from None
    finally:
        _LOADING = None
    if not added:
        raise UserError(f"--verifier_module {path!r} registered no verifier; call open_instruct2.verifiers.register(name, doc) on a function")
    return added


def parse_remap(pairs: list[str] | None) -> dict[str, str]:
    """['math=strict_math'] -> {'math': 'strict_math'}."""
    return dict(pair.split("=", 1) for pair in pairs or [])


def resolve_names(names: list[str], remap: dict[str, str]) -> list[str]:
    return [remap.get(n, n) for n in names]


def check_known(names: set[str]) -> None:
    from .errors import DataError

    unknown = sorted(names - set(VERIFIERS))
    if unknown:
        raise DataError(
            f"unknown verifier(s) {', '.join(unknown)} in the data's 'dataset' field; known: {', '.join(sorted(VERIFIERS))}; "
            "map names with --remap_verifier old=new or add one with --verifier_module"
        )


def check_ground_truths(rows: list[tuple[str, list[str], list[str]]]) -> None:
    """Run each verifier's ground-truth check over the whole dataset before training: (where, names, truths)."""
    from .errors import DataError

    for where, names, truths in rows:
        for name, truth in zip(names * (len(truths) if len(names) == 1 else 1), truths):
            check = GROUND_TRUTH_CHECKS.get(name)
            if check is not None:
                try:
                    check(truth)
                except ValueError as e:
                    raise DataError(f"{where}: {e}; fix the row's ground_truth") from None
