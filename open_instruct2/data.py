"""Prompts: the dataset mixer, row validation, chat templates, prompt filtering, a resumable sampler.

Row formats, detected per source from its first row's columns (said once at start-up; every row must fit it):
- RLVR (open-instruct's): `messages` (a chat list; a trailing assistant turn is dropped from the prompt),
  `ground_truth` (a string, or a list for rows with several verifiers), `dataset` (the verifier name, or a list).
- TRL standard: `prompt` is a string (it becomes the user turn); TRL conversational: `prompt` is a list of messages.
  Any further columns (`solution`, `answer`, an id, ...) go to the reward functions; a verifier scores such a row
  with --verifier NAME and its ground truth from --ground_truth_column (default `ground_truth`).
Every column but the prompt's is carried to the reward functions (`Prompt.columns`).
Sources are hub datasets (`datasets.load_dataset`; `name:config` for a named configuration), local .jsonl / .json /
.parquet / .csv files (the split is ignored: a file is one split), a folder written by `datasets`' `save_to_disk`,
or `builtin:<name>`.
"""

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from .bootstrap import is_builtin, load_builtin_dataset
from .config import LOCAL_SUFFIXES, parse_mixer
from .errors import DataError
from .verifiers import opens_thinking

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


# Named chat templates for tokenizers without one (or to override it): --chat_template_name.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "tulu": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "simple": (
        "{% for message in messages %}{{ message['role'].capitalize() + ': ' + message['content'] + '\n\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}


@dataclass
class Prompt:
    """One tokenised prompt with what the rewards need."""

    prompt_ids: list[int]
    messages: list[dict]
    ground_truth: list[str]
    """One ground truth per verifier."""
    verifiers: list[str]
    """Verifier names from the row's `dataset` field."""
    source: str
    row: int = 0
    """1-based row number within its source, for error messages."""
    thinking_open: bool = False
    """The chat template's generation prompt opened a <think> block it did not close (the response starts inside
    the reasoning; verifiers.final_answer)."""
    columns: dict = field(default_factory=dict)
    """The row's other columns (all but `messages` / `prompt`), as in the file: passed to the reward functions."""
    text_prompt: str | None = None
    """A TRL standard row's prompt string (its completions are then strings too); None for chat rows."""


@dataclass
class PromptBatch:
    """The prompts of one rollout batch (each is sampled num_samples_per_prompt_rollout times)."""

    prompts: list[Prompt]
    indices: list[int]


# ---------------------------------------------------------------- loading


def _read_local(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"dataset file {path!r} not found; check the path in --dataset_mixer_list")
    try:
        if path.endswith(".jsonl"):
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path} line {n}: not valid JSON ({e.msg}); fix or remove the line") from None
            return rows
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); a .json file holds a list of rows") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json dataset must hold a list of rows, found {type(data).__name__}")
            return data
        if path.endswith(".csv"):
            import csv

            with open(path, encoding="utf-8", newline="") as f:  # every value stays the text it is ("2", not 2.0)
                try:
                    return list(csv.DictReader(f))
                except csv.Error as e:
                    raise DataError(f"{path}: not valid CSV ({e}); fix the file") from None
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e}); check the file") from None


def _read_saved(path: str, split: str) -> list[dict]:
    """A folder written by `datasets`' save_to_disk: a Dataset, or a DatasetDict (then the split is taken)."""
    import datasets

    try:
        saved = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: a folder source must be one written by datasets' save_to_disk ({str(e).splitlines()[0][:200]})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{path} has splits {', '.join(saved)}, not {split!r}; choose one with --dataset_mixer_list_splits")
        saved = saved[split]
    return saved.to_list()


def _read_hub(name: str, split: str) -> list[dict]:
    import datasets

    name, _, config = name.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split).to_list()
    except Exception as e:  # network, unknown name, unknown split: all are the user's to fix
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"cannot load hub dataset {name!r} split {split!r}: {reason[:300]}; check the name and split, the network, or use a local .jsonl file"
        ) from None


def load_rows(source: str, split: str) -> list[dict]:
    if is_builtin(source):
        return load_builtin_dataset(source, split)
    if source.endswith(LOCAL_SUFFIXES):
        return _read_local(source)
    if os.path.isdir(source):
        return _read_saved(source, split)
    return _read_hub(source, split)


def take(rows: list[dict], amount: float | int) -> list[dict]:
    """open-instruct mixer semantics: a float is a fraction of the rows (above 1.0 repeats them), an int a
    row count (repeating when larger than the source). Rows are taken in order; the sampler shuffles."""
    n = int(round(amount * len(rows))) if isinstance(amount, float) else amount
    if not rows or n <= 0:
        return []
    return [rows[i % len(rows)] for i in range(n)]


def mix(mixer_list: list[str], splits: list[str], flag: str = "dataset_mixer_list") -> list[tuple[str, int, dict]]:
    """(source, row number within its source, row) for every row of the mix, sources in order."""
    out = []
    for source, amount, split in parse_mixer(mixer_list, splits, flag):
        rows = load_rows(source, split)
        if not rows:
            raise DataError(f"{source!r} split {split!r} has no rows; check --{flag}")
        chosen = take(rows, amount)
        out.extend((source, i % len(rows) + 1, row) for i, row in enumerate(chosen))
        log.info("data: %s [%s]: %d of %d rows", source, split, len(chosen), len(rows))
    return out


# ---------------------------------------------------------------- validation


def validate_row(row: dict, where: str) -> tuple[list[dict], list[str], list[str]]:
    """Check one row; return (messages, ground truths, verifier names). Raises DataError naming the row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object with messages, ground_truth, dataset; got {type(row).__name__}")
    missing = [k for k in ("messages", "ground_truth", "dataset") if k not in row]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}; each row needs messages, ground_truth and dataset")
    messages = check_messages(row["messages"], where, "messages")
    truths, names = row["ground_truth"], row["dataset"]
    truths = truths if isinstance(truths, list) else [truths]
    names = names if isinstance(names, list) else [names]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{where}: 'dataset' must be a verifier name or a list of names, got {row['dataset']!r}")
    if not all(isinstance(t, (str, int, float)) for t in truths):
        raise DataError(f"{where}: 'ground_truth' must be a string or a list of strings, got {str(row['ground_truth'])[:80]}")
    if len(names) > 1 and len(truths) not in (1, len(names)):
        raise DataError(f"{where}: {len(names)} verifiers in 'dataset' but {len(truths)} ground truths; give one per verifier (or one for all)")
    truths = [str(t) for t in truths]
    if len(names) > 1 and len(truths) == 1:
        truths = truths * len(names)  # one ground truth shared by every verifier of the row
    return messages, truths, names


FORMATS = {"rlvr": "RLVR rows (messages, ground_truth, dataset)", "standard": "TRL standard prompts (prompt is a string)",
           "conversational": "TRL conversational prompts (prompt is a list of messages)"}


def detect_format(row, where: str, prompt_column: str = "prompt") -> str:
    """A row's format from its columns (module docstring); DataError for a row that fits none."""
    if not isinstance(row, dict) or "messages" in row or (prompt_column not in row and {"ground_truth", "dataset"} & set(row)):
        return "rlvr"  # validate_row says what such a row lacks
    if isinstance(row.get(prompt_column), str):
        return "standard"
    if isinstance(row.get(prompt_column), list):
        return "conversational"
    columns = ", ".join(map(str, row))
    raise DataError(f"{where}: fits no dataset format (found {columns}); a row needs messages, ground_truth and dataset (RLVR), "
                    f"or a {prompt_column!r} column holding a string or a list of messages (TRL; --prompt_column names another)")


def check_messages(messages, where: str, column: str) -> list[dict]:
    """A chat list of {role, content}, with a user turn; a trailing assistant turn (a reference answer) is dropped."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {column!r} must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {column}[{i}] must be {{'role': one of {'/'.join(ROLES)}, 'content': a string}}, got {str(m)[:80]}")
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # a reference answer in the chat is not part of the prompt
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: {column!r} has no user turn")
    return messages


@dataclass
class RowSettings:
    """How TRL-format rows get a verifier (--verifier, --ground_truth_column); RLVR rows name their own."""

    verifier: str | None = None
    ground_truth_column: str | None = None
    prompt_column: str = "prompt"
    """The column holding a TRL row's prompt (--prompt_column)."""


def row_settings(cfg) -> RowSettings:
    return RowSettings(cfg.reward.verifier, cfg.reward.ground_truth_column, cfg.data.prompt_column)


def parse_row(row, where: str, fmt: str, settings: RowSettings) -> tuple[list[dict], list[str], list[str], dict, str | None]:
    """(messages, ground truths, verifier names, the other columns, the prompt string of a standard row)."""
    key = settings.prompt_column
    found = detect_format(row, where, key)
    if found != fmt:
        raise DataError(f"{where}: is a row of {FORMATS[found]}, but its source's first row is one of {FORMATS[fmt]}; one format per source")
    if fmt == "rlvr":
        messages, truths, names = validate_row(row, where)
        return messages, truths, names, {k: v for k, v in row.items() if k != "messages"}, None
    text = row[key] if fmt == "standard" else None
    if text is not None and not text.strip():
        raise DataError(f"{where}: {key!r} is empty")
    messages = [{"role": "user", "content": text}] if text is not None else check_messages(row[key], where, key)
    columns = {k: v for k, v in row.items() if k != key}
    if settings.verifier is None:
        return messages, [], [], columns, text
    column = settings.ground_truth_column or "ground_truth"
    if row.get(column) is None:
        raise DataError(f"{where}: no {column!r} column for --verifier {settings.verifier} (columns: {', '.join(columns)}); "
                        "name the ground-truth column with --ground_truth_column")
    truth = row[column]
    truths = [str(t) for t in truth] if isinstance(truth, list) else [str(truth)]
    return messages, truths, [settings.verifier], columns, text  # several ground truths: any of them is accepted


# ---------------------------------------------------------------- tokenisation


def set_chat_template(tokenizer, chat_template_name: str | None) -> None:
    """Install the named template, or check that the tokenizer has its own."""
    if chat_template_name is not None:
        if chat_template_name not in CHAT_TEMPLATES:
            raise DataError(f"--chat_template_name {chat_template_name!r} is unknown; choose one of {', '.join(CHAT_TEMPLATES)}")
        tokenizer.chat_template = CHAT_TEMPLATES[chat_template_name]
    elif not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer has no chat template; set --chat_template_name ({', '.join(CHAT_TEMPLATES)})")


def read_system_prompt(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise DataError(f"--system_prompt_file {path!r}: cannot read it ({e.strerror}); check the path") from None


def read_few_shot(path: str | None) -> list[dict]:
    """--few_shot_file: a JSON list of worked example turns, user first, alternating with assistant, ending with an
    assistant turn ([] without the flag). DataError naming what is wrong."""
    if path is None:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            turns = json.load(f)
    except OSError as e:
        raise DataError(f"--few_shot_file {path!r}: cannot read it ({e.strerror}); check the path") from None
    except ValueError as e:
        raise DataError(f"--few_shot_file {path!r}: not JSON ({e}); it holds a list of {{role, content}} turns") from None
    expected = ["user", "assistant"]
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise DataError(f"--few_shot_file {path!r}: want a non-empty list of user/assistant turn pairs, "
                        f"e.g. [{{\"role\": \"user\", \"content\": \"...\"}}, {{\"role\": \"assistant\", \"content\": \"...\"}}]")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") != expected[i % 2] or not isinstance(turn.get("content"), str) or set(turn) - {"role", "content"}:
            raise DataError(f"--few_shot_file {path!r}: turn {i} must be {{'role': {expected[i % 2]!r}, 'content': a string}} "
                            f"(user and assistant alternate, user first), got {str(turn)[:80]}")
    return turns


def with_frame(messages: list[dict], system_prompt: str | None, few_shot: list[dict]) -> list[dict]:
    """A row's turns with --system_prompt_file's system message (replacing every one of the row's) and the worked
    examples after the system message(s) that open the chat; the row's other turns keep their order."""
    if system_prompt is not None:
        return [{"role": "system", "content": system_prompt}] + few_shot + [m for m in messages if m["role"] != "system"]
    lead = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return messages[:lead] + few_shot + messages[lead:]


def tokenize_prompt(tokenizer, messages: list[dict], add_bos: bool = False, template_kwargs: dict | None = None) -> list[int]:
    """The chat template applied with a generation prompt; template_kwargs (--chat_template_kwargs) are
    passed to the template, e.g. enable_thinking=False for Qwen3."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False, **(template_kwargs or {}))
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = list(ids)
    if add_bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def generation_prompt_opens_thinking(tokenizer, template_kwargs: dict | None = None) -> bool:
    """Whether the text the chat template adds as the generation prompt (rendered with it, minus rendered without it)
    opens a <think> block it does not close: R1-style templates start the response inside the reasoning. Only that
    suffix is looked at, so a user message that ends in a literal <think> changes nothing."""
    chat = [{"role": "user", "content": "x"}]
    try:
        with_prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **(template_kwargs or {}))
        without = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False, **(template_kwargs or {}))
    except Exception:  # noqa: BLE001 - a template that cannot render this: the rows' own rendering reports it
        return False
    suffix = with_prompt[len(without):] if with_prompt.startswith(without) else with_prompt[-200:]
    return opens_thinking(suffix)


def build_prompts(
    mixer_list: list[str],
    splits: list[str],
    tokenizer,
    max_prompt_token_length: int,
    system_prompt: str | None = None,
    add_bos: bool = False,
    flag: str = "dataset_mixer_list",
    template_kwargs: dict | None = None,
    settings: RowSettings | None = None,
    few_shot: list[dict] | None = None,
) -> list[Prompt]:
    """Load, validate and tokenise the mix; drop prompts over the length limit (counted in the log)."""
    prompts, too_long, formats = [], 0, {}
    settings = settings or RowSettings()
    thinking = generation_prompt_opens_thinking(tokenizer, template_kwargs)
    for source, row_number, row in mix(mixer_list, splits, flag):
        where = f"{source} row {row_number}"
        if source not in formats:
            formats[source] = detect_format(row, where, settings.prompt_column)
            extra = sorted(set(row) - {"messages", settings.prompt_column}) if isinstance(row, dict) else []
            log.info("data: %s: %s; columns for the reward functions: %s", source, FORMATS[formats[source]], ", ".join(extra) or "none")
        messages, truths, names, columns, text = parse_row(row, where, formats[source], settings)
        if system_prompt is not None or few_shot:
            messages = with_frame(messages, system_prompt, few_shot or [])
        ids = tokenize_prompt(tokenizer, messages, add_bos, template_kwargs)
        if len(ids) > max_prompt_token_length:
            too_long += 1
            continue
        prompts.append(Prompt(ids, messages, truths, names, source, row_number, thinking, columns, text))
    if too_long:
        log.info("data: dropped %d prompts longer than max_prompt_token_length=%d", too_long, max_prompt_token_length)
    if not prompts:
        raise DataError(
            f"no prompts left: all {too_long} are longer than --max_prompt_token_length {max_prompt_token_length}; raise it or use shorter prompts"
        )
    return prompts


# ---------------------------------------------------------------- sampler


class PromptSampler:
    """Seeded, resumable sampling without replacement: a new permutation per epoch over the prompts.

    Its whole state is (epoch, position); save it with `state_dict` and restore with `load_state_dict`
    to continue the exact same sequence of batches.
    """

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts < 1:
            raise DataError("the dataset has no prompts")
        self.num_prompts, self.seed = num_prompts, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def next_indices(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take_n = min(k - len(out), self.num_prompts - self.position)
            out.extend(int(i) for i in self._order[self.position : self.position + take_n])
            self.position += take_n
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts or state["seed"] != self.seed:
            raise DataError("sampler state is from a different dataset or seed; resume with the same data flags")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def next_batch(prompts: list[Prompt], sampler: PromptSampler, k: int) -> PromptBatch:
    indices = sampler.next_indices(k)
    return PromptBatch([prompts[i] for i in indices], indices)
