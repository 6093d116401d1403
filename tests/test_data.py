"""Dataset mixer semantics, row validation, chat templates, prompt filtering, the resumable sampler."""

import json

import pytest

from conftest import REPO
from open_instruct2 import data
from open_instruct2.errors import ConfigError, DataError


def rows(n, tag):
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}"}], "ground_truth": str(i), "dataset": "gsm8k"} for i in range(n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def test_fraction_vs_count_and_several_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows(10, "a"))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(rows(4, "b")))
    mixed = data.mix([a, "0.5", str(b), "6"], ["train"])
    sources = [s for s, _, _ in mixed]
    assert sources.count(a) == 5  # '0.5' has a dot: half of 10 rows
    assert sources.count(str(b)) == 6  # '6' has none: six rows, repeating the 4-row source
    assert [r["ground_truth"] for s, _, r in mixed if s == str(b)] == ["0", "1", "2", "3", "0", "1"]
    assert len(data.mix([a, "2.0"], ["train"])) == 20  # a fraction above 1 repeats
    assert len(data.mix([a, "1"], ["train"])) == 1  # '1' is one row, '1.0' is all of them
    assert len(data.mix([a, "1.0"], ["train"])) == 10


def test_parquet_and_builtin_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows(3, "p")), path)
    mixed = data.mix([str(path), "1.0", "builtin:arithmetic", "100"], ["train"])
    assert len(mixed) == 103
    test_rows = data.mix(["builtin:arithmetic", "1.0"], ["test"])
    assert {r["messages"][0]["content"] for _, _, r in test_rows}.isdisjoint(r["messages"][0]["content"] for _, _, r in mixed)


def test_per_source_splits():
    mixed = data.mix(["builtin:arithmetic", "5", "builtin:arithmetic", "5"], ["train", "test"])
    from open_instruct2.bootstrap import arithmetic_rows

    assert [r for _, _, r in mixed] == arithmetic_rows("train")[:5] + arithmetic_rows("test")[:5]


@pytest.mark.parametrize(
    "row,needle",
    [
        ({"ground_truth": "1", "dataset": "gsm8k"}, "missing messages"),
        ({"messages": [], "ground_truth": "1", "dataset": "gsm8k"}, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}], "ground_truth": "1", "dataset": "gsm8k"}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}], "ground_truth": "1", "dataset": "gsm8k"}, "messages[0]"),
        ({"messages": [{"role": "system", "content": "x"}], "ground_truth": "1", "dataset": "gsm8k"}, "no user turn"),
        ({"messages": [{"role": "user", "content": "x"}], "ground_truth": ["1", "2"], "dataset": ["gsm8k", "math", "ifeval"]}, "one per verifier"),
        ({"messages": [{"role": "user", "content": "x"}], "ground_truth": "1", "dataset": ""}, "verifier name"),
        ({"messages": [{"role": "user", "content": "x"}], "ground_truth": {"a": 1}, "dataset": "gsm8k"}, "ground_truth"),
        ("just a string", "must be an object"),
    ],
)
def test_malformed_rows_name_file_and_row(tmp_path, tokenizer, row, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", rows(2, "ok") + [row])
    with pytest.raises(DataError) as err:
        data.build_prompts([path, "1.0"], ["train"], tokenizer, 256)
    assert f"{path} row 3" in str(err.value) and needle in str(err.value)


def test_invalid_json_line_and_missing_file(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(rows(1, "x")[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="broken.jsonl line 2: not valid JSON"):
        data.mix([str(path), "1.0"], ["train"])
    with pytest.raises(DataError, match="not found"):
        data.mix([str(tmp_path / "gone.jsonl"), "1.0"], ["train"])
    with pytest.raises(ConfigError, match="pairs"):
        data.mix(["builtin:arithmetic"], ["train"])


def test_worked_examples_sit_after_the_system_message_and_before_the_row(tmp_path, tokenizer):
    items = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2 + 2?"}], "ground_truth": "4", "dataset": "gsm8k"}]
    path = write_jsonl(tmp_path / "d.jsonl", items)
    shots = tmp_path / "shots.json"
    shots.write_text(json.dumps([{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "#### 2"}]))
    [prompt] = data.build_prompts([path, "1.0"], ["train"], tokenizer, 256, few_shot=data.read_few_shot(str(shots)))
    assert [m["content"] for m in prompt.messages] == ["Be terse.", "What is 1 + 1?", "#### 2", "What is 2 + 2?"]
    assert tokenizer.decode(prompt.prompt_ids).endswith("<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n#### 2<|im_end|>\n"
                                                        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    [framed] = data.build_prompts([path, "1.0"], ["train"], tokenizer, 256, system_prompt="Show the steps.", few_shot=data.read_few_shot(str(shots)))
    assert [m["content"] for m in framed.messages] == ["Show the steps.", "What is 1 + 1?", "#### 2", "What is 2 + 2?"]
    shot = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    middle = [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}]
    assert data.with_frame(middle, None, shot) == shot + middle  # a system turn inside the chat stays where it is
    assert data.with_frame([{"role": "user", "content": "q"}], None, shot) == shot + [{"role": "user", "content": "q"}]
    assert data.read_few_shot(None) == [] and len(data.read_few_shot(str(REPO / "examples" / "calculator_few_shot.json"))) == 4
    for bad, says in [("[]", "non-empty list"), ('[{"role": "user", "content": "q"}]', "pairs"), ("{", "not JSON"),
                      ('[{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]', "turn 0 must be"),
                      ('[{"role": "user", "content": "q"}, {"role": "assistant", "content": 4}]', "turn 1 must be")]:
        shots.write_text(bad)
        with pytest.raises(DataError, match=says):
            data.read_few_shot(str(shots))


def test_hub_failure_is_a_clear_error():
    # HF_DATASETS_OFFLINE=1 (conftest): the real hub path runs and fails fast without a network.
    with pytest.raises(DataError, match="cannot load hub dataset 'ai2-adapt-dev/rlvr_gsm8k_zs'"):
        data.mix(["ai2-adapt-dev/rlvr_gsm8k_zs", "1.0"], ["train"])


def test_chat_template_system_prompt_and_trailing_assistant(tmp_path, tokenizer):
    items = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}], "ground_truth": "4", "dataset": "gsm8k"}]
    path = write_jsonl(tmp_path / "d.jsonl", items)
    (tmp_path / "sys.txt").write_text("Answer briefly.\n")
    [prompt] = data.build_prompts([path, "1.0"], ["train"], tokenizer, 256, system_prompt=data.read_system_prompt(str(tmp_path / "sys.txt")))
    text = tokenizer.decode(prompt.prompt_ids)
    assert text == "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.ground_truth == ["4"] and prompt.verifiers == ["gsm8k"]


def test_a_template_that_opens_think_marks_its_prompts(tmp_path, tokenizer):
    """A generation prompt ending in <think> (R1-style templates): its responses start inside the reasoning."""
    import copy

    items = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}], "ground_truth": "4", "dataset": "gsm8k"}]
    path = write_jsonl(tmp_path / "d.jsonl", items)
    [plain] = data.build_prompts([path, "1.0"], ["train"], tokenizer, 256)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = data.CHAT_TEMPLATES["chatml"].replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    [opened] = data.build_prompts([path, "1.0"], ["train"], tok, 256)
    assert tok.decode(opened.prompt_ids).endswith("<think>\n") and opened.thinking_open and not plain.thinking_open
    tok.chat_template = data.CHAT_TEMPLATES["chatml"].replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n\n</think>\n\n'")
    [closed] = data.build_prompts([path, "1.0"], ["train"], tok, 256)  # Qwen3 with thinking off: the block is closed
    assert not closed.thinking_open
    literal = write_jsonl(tmp_path / "l.jsonl", [{**items[0], "messages": [{"role": "user", "content": "Explain the tag <think>"}]}])
    [mentions] = data.build_prompts([literal, "1.0"], ["train"], tokenizer, 256)  # a message that ends in the tag: not the template's
    assert not mentions.thinking_open


def test_named_chat_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    data.set_chat_template(tok, "simple")
    ids = data.tokenize_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(ids) == "User: Hi\n\nAssistant:"
    with pytest.raises(DataError, match="chat_template_name 'nope' is unknown"):
        data.set_chat_template(tok, "nope")
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        data.set_chat_template(tok, None)


def test_long_prompts_dropped_and_empty_result_is_an_error(tmp_path, tokenizer, caplog):
    items = rows(3, "short") + [{"messages": [{"role": "user", "content": "word " * 300}], "ground_truth": "1", "dataset": "gsm8k"}]
    path = write_jsonl(tmp_path / "d.jsonl", items)
    with caplog.at_level("INFO"):
        prompts = data.build_prompts([path, "1.0"], ["train"], tokenizer, 64)
    assert len(prompts) == 3 and "dropped 1 prompts" in caplog.text
    with pytest.raises(DataError, match="no prompts left"):
        data.build_prompts([path, "1.0"], ["train"], tokenizer, 5)


def test_sampler_is_seeded_covers_each_epoch_and_resumes():
    s = data.PromptSampler(10, seed=3)
    first_epoch = s.next_indices(10)
    assert sorted(first_epoch) == list(range(10))
    assert data.PromptSampler(10, seed=3).next_indices(10) == first_epoch
    assert data.PromptSampler(10, seed=4).next_indices(10) != first_epoch
    s = data.PromptSampler(10, seed=3)
    s.next_indices(7)
    state = s.state_dict()
    expected = s.next_indices(9)  # crosses into the second epoch
    resumed = data.PromptSampler(10, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.next_indices(9) == expected
    with pytest.raises(DataError, match="different dataset"):
        data.PromptSampler(11, seed=3).load_state_dict(state)


def test_builtin_rephrased_split_holds_the_test_problems_in_new_words():
    from open_instruct2.bootstrap import arithmetic_rows

    test, rephrased, train = arithmetic_rows("test"), arithmetic_rows("test_rephrased"), arithmetic_rows("train")
    assert len(test) == len(rephrased) and [r["ground_truth"] for r in test] == [r["ground_truth"] for r in rephrased]
    train_questions = {r["messages"][0]["content"] for r in train}
    starts = {r["messages"][0]["content"].split()[0] for r in train}
    assert all(r["messages"][0]["content"] not in train_questions for r in rephrased)
    assert {"Compute", "Calculate"} <= {r["messages"][0]["content"].split()[0] for r in rephrased} and not {"Compute", "Calculate"} & starts
    assert all(r["messages"][0]["content"].endswith("Put the final answer after ####.") for r in rephrased)


# ---------------------------------------------------------------- TRL formats and more file types


TRL_ROWS = [
    {"prompt": "What is 2 + 3?", "answer": "Add them. #### 5", "id": 7},
    {"prompt": "What is 4 + 4?", "answer": "#### 8", "id": 8},
]


def _formats(tmp_path):
    """The same two standard rows as .jsonl, .json, .csv, .parquet and a save_to_disk folder (a DatasetDict)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    paths["jsonl"] = tmp_path / "rows.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in TRL_ROWS))
    paths["json"] = tmp_path / "rows.json"
    paths["json"].write_text(json.dumps(TRL_ROWS))
    paths["csv"] = tmp_path / "rows.csv"
    paths["csv"].write_text("prompt,answer,id\n" + "".join(f"\"{r['prompt']}\",\"{r['answer']}\",{r['id']}\n" for r in TRL_ROWS))
    paths["parquet"] = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(TRL_ROWS), paths["parquet"])
    paths["saved"] = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TRL_ROWS)}).save_to_disk(str(paths["saved"]))
    return paths


def test_trl_standard_rows_from_every_file_type_with_a_verifier(tmp_path, tokenizer, caplog):
    settings = data.RowSettings(verifier="gsm8k", ground_truth_column="answer")
    for kind, path in _formats(tmp_path).items():
        with caplog.at_level("INFO"):
            prompts = data.build_prompts([str(path), "1.0"], ["train"], tokenizer, 256, settings=settings, system_prompt="Be brief.")
        assert [p.ground_truth for p in prompts] == [["Add them. #### 5"], ["#### 8"]], kind
        assert all(p.verifiers == ["gsm8k"] for p in prompts), kind
        first = prompts[0]
        assert first.text_prompt == "What is 2 + 3?" and first.messages == [{"role": "system", "content": "Be brief."},
                                                                           {"role": "user", "content": "What is 2 + 3?"}], kind
        # every column but the prompt, as in the file (a CSV holds text: its values stay text)
        assert first.columns == {"answer": "Add them. #### 5", "id": "7" if kind == "csv" else 7}, kind
        assert "TRL standard prompts (prompt is a string); columns for the reward functions: answer, id" in caplog.text, kind
        caplog.clear()
    from open_instruct2.verifiers import VERIFIERS

    assert VERIFIERS["gsm8k"]("so #### 5", prompts[0].ground_truth[0]) == 1.0  # the gsm8k answer column is a ground truth as it is


def test_trl_conversational_rows_and_the_refusals(tmp_path, tokenizer):
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi?"}], "solution": "4"}) + "\n")
    [p] = data.build_prompts([str(conv), "1.0"], ["train"], tokenizer, 256)
    assert p.text_prompt is None and p.messages[-1] == {"role": "user", "content": "Hi?"} and p.verifiers == [] and p.columns == {"solution": "4"}
    cases = {
        "nothing": ({"question": "x", "answer": "1"}, "fits no dataset format (found question, answer)"),
        "mixed": ([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}], "row 2: is a row of TRL conversational prompts"),
        "no user": ({"prompt": [{"role": "system", "content": "s"}]}, "'prompt' has no user turn"),
        "bad message": ({"prompt": [{"role": "robot", "content": "s"}]}, "prompt[0] must be"),
        "empty": ({"prompt": "  "}, "'prompt' is empty"),
    }
    for name, (rows, needle) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in (rows if isinstance(rows, list) else [rows])))
        with pytest.raises(DataError) as e:
            data.build_prompts([str(path), "1.0"], ["train"], tokenizer, 256)
        assert str(path) in str(e.value) and needle in str(e.value), (name, str(e.value))
    with pytest.raises(DataError, match="row 1: no 'answer' column for --verifier gsm8k"):
        data.build_prompts([str(conv), "1.0"], ["train"], tokenizer, 256, settings=data.RowSettings("gsm8k", "answer"))
    saved = _formats(tmp_path)["saved"]
    with pytest.raises(DataError, match="has splits train, not 'test'"):
        data.build_prompts([str(saved), "1.0"], ["test"], tokenizer, 256)


def test_a_hub_source_with_a_configuration_name(monkeypatch):
    """name:config reaches datasets.load_dataset as (name, config) (no hub here: the loader is replaced)."""
    import datasets

    calls = []

    class Rows:
        def to_list(self):
            return TRL_ROWS

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or Rows())
    assert data.load_rows("openai/gsm8k:main", "test") == TRL_ROWS
    assert data.load_rows("openai/gsm8k", "train") == TRL_ROWS
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"}), (("openai/gsm8k", None), {"split": "train"})]
