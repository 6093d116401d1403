"""Answer checking: a registry from verifier name to a function (response text, ground truth) -> [0, 1].

Rows name their verifier in the `dataset` field (open-instruct's RLVR format). Verifiers know strings
only: no tensors, no config.
"""

import re
from typing import Callable

VerifierFn = Callable[[str, str], float]
VERIFIERS: dict[str, VerifierFn] = {}
VERIFIER_DOCS: dict[str, str] = {}


def register(name: str, doc: str):
    """Decorator: add a verifier under `name` (user modules use this too)."""

    def wrap(fn: VerifierFn) -> VerifierFn:
        VERIFIERS[name] = fn
        VERIFIER_DOCS[name] = doc
        return fn

    return wrap


# ---------------------------------------------------------------- numbers

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


@register("gsm8k", "The number after the last '####', else the last number in the text; commas, '$', trailing '.' and '.0' normalised; compared numerically.")
def verify_gsm8k(response: str, ground_truth: str) -> float:
    truth = normalize_number(ground_truth.split("####")[-1])
    if truth is None:
        raise ValueError(f"gsm8k ground truth {ground_truth!r} is not a number")
    if "####" in response:
        found = numbers_in(response.rsplit("####", 1)[1])
        candidate = found[0] if found else None
    else:
        found = numbers_in(response)
        candidate = found[-1] if found else None
    value = normalize_number(candidate) if candidate else None
    return float(value is not None and numbers_equal(value, truth))


# ---------------------------------------------------------------- user verifiers, remapping


def load_verifier_module(path: str) -> list[str]:
    """Execute a user's Python file that calls `register(...)`; returns the names it added."""
    import hashlib
    import importlib.util

    from .errors import UserError

    before = set(VERIFIERS)
    name = "open_instruct2_user_verifiers_" + hashlib.sha1(path.encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"--verifier_module {path!r} is not a Python file; give a .py file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code: report it in one line
        raise UserError(f"--verifier_module {path!r} failed to load: {type(e).__name__}: {e}; fix the file") from None
    added = sorted(set(VERIFIERS) - before)
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
