"""Verifiers on real-looking model outputs (a table), time bounds, and verifier plumbing."""

import json
import time

import pytest

from open_instruct2 import verifiers as V
from open_instruct2.errors import DataError, UserError

IF = lambda ids, kwargs: json.dumps({"instruction_id": ids, "kwargs": kwargs})  # noqa: E731

CASES = [
    # ---- gsm8k
    ("gsm8k", "Natalia sold 48 clips in April and 24 in May.\n48 + 24 = 72\n#### 72", "72", 1.0),
    ("gsm8k", "The total is 1,234 dollars.\n#### 1,234", "1234", 1.0),
    ("gsm8k", "She pays $18.00 in total. #### $18.", "18", 1.0),
    ("gsm8k", "The temperature dropped to -5 degrees.\n#### -5", "-5", 1.0),
    ("gsm8k", "The temperature dropped to 5 degrees.\n#### 5", "-5", 0.0),
    ("gsm8k", "So he has 12 apples left.", "12", 1.0),  # no ####: the last number
    ("gsm8k", "First 3 + 4 = 7, then 7 x 2 = 14 apples", "14", 1.0),
    ("gsm8k", "#### 10\nWait, I made a mistake. #### 12", "12", 1.0),  # the last ####
    ("gsm8k", "#### 12\nSo the answer was 10 before I checked.", "12", 1.0),  # number right after the last ####
    ("gsm8k", "The answer is twelve.", "12", 0.0),  # words score 0 (documented)
    ("gsm8k", "", "12", 0.0),
    ("gsm8k", "What is 7 + 5? Put the final answer after ####.", "12", 0.0),  # repeats the question
    ("gsm8k", "It takes 2.50 hours.\n#### 2.5", "2.5", 1.0),
    ("gsm8k", "#### 3.0", "3", 1.0),
    ("gsm8k", "The final answer is 42 km.", "42", 1.0),  # units
    ("gsm8k", "He ran 5 km each day for 7 days, so 35 km. #### 35 km", "35", 1.0),
    ("gsm8k", "10 + 20 = 30 #### The answer is", "30", 0.0),  # nothing after the last ####
    ("gsm8k", "The cost is 1,000,000 dollars. #### 1000000", "1,000,000", 1.0),
    ("gsm8k", "#### 0.5", "1/2", None),  # a ground truth that is not a number is a verifier error
    # ---- math
    ("math", "We simplify to get $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", 1.0),
    ("math", "So the probability is \\boxed{0.5}.", "\\frac{1}{2}", 1.0),
    ("math", "Therefore \\boxed{1/2}", "\\frac12", 1.0),
    ("math", "The answer is $\\boxed{\\dfrac{3}{4}}$", "\\frac{3}{4}", 1.0),
    ("math", "The solution set is $\\boxed{\\left( -2, 3 \\right)}$.", "(-2,3)", 1.0),
    ("math", "Thus $x \\in \\boxed{[0, 1)}$.", "[0,1)", 1.0),
    ("math", "Solving gives \\boxed{x = 3}.", "3", 1.0),
    ("math", "The correct option is \\boxed{\\text{(B)}}.", "B", 1.0),
    ("math", "The correct option is \\boxed{\\text{(C)}}.", "B", 0.0),
    ("math", "First \\boxed{5}, but rechecking, the result is \\boxed{7}.", "7", 1.0),  # the last box
    ("math", "We get \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("math", "Area is \\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("math", "\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("math", "The answer is 42.", "42", 1.0),  # final-answer phrase without a box
    ("math", "I think it is probably 41 or so", "42", 0.0),
    ("math", "", "42", 0.0),
    ("math", "\\boxed{10\\%}", "10\\%", 1.0),
    ("math", "So the sum is $\\boxed{-7}$.", "-7", 1.0),
    ("math", "The final answer is $\\frac{7}{2}$. I hope it is correct.", "3.5", 1.0),
    ("math", "Compute $\\frac{1}{2} + \\frac{1}{3}$.", "\\frac{5}{6}", 0.0),  # repeats the question
    ("math", "The roots are \\boxed{2, 3}", "2,3", 1.0),
    ("math", "Hence \\boxed{\\pi}", "\\pi", 1.0),
    # ---- strict_math
    ("strict_math", "Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "0.5", 1.0),
    ("strict_math", "Final Answer: The final answer is 12. I hope it is correct.", "12", 1.0),
    ("strict_math", "The final answer is \\boxed{12}.", "12", 0.0),  # not the Minerva form
    ("strict_math", "Final Answer: The final answer is 13. I hope it is correct.", "12", 0.0),
    # ---- string_matching / string_f1
    ("string_matching", "The capital of France is Paris.\nAnswer: Paris", "paris", 1.0),
    ("string_matching", "Answer: The Eiffel Tower.", "eiffel tower", 1.0),
    ("string_matching", "Answer: London", "Paris", 0.0),
    ("string_matching", "paris!", "Paris", 1.0),
    ("string_f1", "Answer: the quick brown fox", "quick brown dog", 2 / 3),
    ("string_f1", "Answer: Barack Obama", "Barack Obama", 1.0),
    ("string_f1", "Answer: nothing in common", "Barack Obama", 0.0),
    ("string_f1", "", "Barack Obama", 0.0),
    # ---- length budgets (words)
    ("max_length", "one two three four five", "5", 1.0),
    ("max_length", "one two three four five six seven eight nine ten", "5", 0.0),
    ("max_length", "one two three four", "5", 0.8),
    ("up_to_max_length", "one two three", "5", 1.0),
    ("up_to_max_length", "one two three four five six", "5", 0.8),
    # ---- ifeval
    ("ifeval", "hello world, this is all lowercase.", IF(["change_case:english_lowercase"], [{}]), 1.0),
    ("ifeval", "Hello world.", IF(["change_case:english_lowercase"], [{}]), 0.0),
    ("ifeval", "THIS IS LOUD", IF(["change_case:english_capital"], [None]), 1.0),
    ("ifeval", "No commas here at all", IF(["punctuation:no_comma"], [{}]), 1.0),
    ("ifeval", "One, two", IF(["punctuation:no_comma"], [{}]), 0.0),
    ("ifeval", "Short answer here.", IF(["length_constraints:number_words"], [{"relation": "less than", "num_words": 5}]), 1.0),
    ("ifeval", "This answer has six words total.", IF(["length_constraints:number_words"], [{"relation": "at least", "num_words": 7}]), 0.0),
    ("ifeval", "One. Two! Three?", IF(["length_constraints:number_sentences"], [{"relation": "at least", "num_sentences": 3}]), 1.0),
    ("ifeval", "First part.\n***\nSecond part.", IF(["length_constraints:number_paragraphs"], [{"num_paragraphs": 2}]), 1.0),
    ("ifeval", "Only one paragraph.", IF(["length_constraints:number_paragraphs"], [{"num_paragraphs": 2}]), 0.0),
    ("ifeval", "I love Python and Rust.", IF(["keywords:existence"], [{"keywords": ["python", "rust"]}]), 1.0),
    ("ifeval", "I love Python.", IF(["keywords:forbidden_words"], [{"forbidden_words": ["python"]}]), 0.0),
    ("ifeval", "cat cat dog cat", IF(["keywords:frequency"], [{"keyword": "cat", "frequency": 3, "relation": "at least"}]), 1.0),
    ("ifeval", '```json\n{"name": "Ada", "age": 36}\n```', IF(["detectable_format:json_format"], [{}]), 1.0),
    ("ifeval", "name: Ada", IF(["detectable_format:json_format"], [{}]), 0.0),
    ("ifeval", "<<My Poem>>\nRoses are red.", IF(["detectable_format:title"], [{}]), 1.0),
    ("ifeval", "Any other questions?", IF(["startend:end_checker"], [{"end_phrase": "Any other questions?"}]), 1.0),
    ("ifeval", "* one\n* two\n* three", IF(["detectable_format:number_bullet_lists"], [{"num_bullets": 3}]), 1.0),
    ("ifeval", "* one\n* two", IF(["detectable_format:number_bullet_lists"], [{"num_bullets": 3}]), 0.0),
    ("ifeval", "Dear [name], meet me at [address].", IF(["detectable_content:number_placeholders"], [{"num_placeholders": 2}]), 1.0),
    # two constraints, one kept: partial credit
    ("ifeval", "Hello, world", IF(["punctuation:no_comma", "keywords:existence"], [{}, {"keywords": ["world"]}]), 0.5),
    ("ifeval", "", IF(["keywords:existence"], [{"keywords": ["world"], "num_words": None}]), 0.0),
]


@pytest.mark.parametrize("name,response,truth,expected", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_verifier_table(name, response, truth, expected):
    if expected is None:
        with pytest.raises(ValueError):
            V.VERIFIERS[name](response, truth)
        return
    assert V.VERIFIERS[name](response, truth) == pytest.approx(expected)


def test_table_is_large_and_covers_every_builtin_verifier():
    assert len(CASES) >= 60
    assert {c[0] for c in CASES} == {"gsm8k", "math", "strict_math", "string_matching", "string_f1", "max_length", "up_to_max_length", "ifeval"}


def test_pathological_math_returns_in_bounded_time():
    start = time.perf_counter()
    score = V.VERIFIERS["math"]("\\boxed{9^{9^{9^{9^{9}}}}}", "1")
    elapsed = time.perf_counter() - start
    assert score == 0.0
    assert elapsed < 30  # the 1-second alarms hold; a hang would not return at all (bound is loose on purpose)
    assert V.VERIFIERS["math"]("\\boxed{" + "x+" * 5000 + "1}", "1") == 0.0  # too long to be an answer: not parsed


def test_ifeval_ground_truths_are_checked_up_front():
    with pytest.raises(DataError, match="rows.jsonl row 4: ifeval instruction 'language:response_language' is not supported"):
        V.check_ground_truths([("rows.jsonl row 4", ["ifeval"], [IF(["language:response_language"], [{"language": "fr"}])])])
    with pytest.raises(DataError, match="must be a whole number of words"):
        V.check_ground_truths([("f row 1", ["max_length"], ["many"])])
    V.check_ground_truths([("f row 1", ["ifeval", "gsm8k"], [IF(["punctuation:no_comma"], [{}]), "3"])])


def test_unknown_names_remap_and_user_module(tmp_path):
    with pytest.raises(DataError, match="unknown verifier\\(s\\) mystery.*--remap_verifier"):
        V.check_known({"gsm8k", "mystery"})
    assert V.resolve_names(["math", "gsm8k"], V.parse_remap(["math=strict_math"])) == ["strict_math", "gsm8k"]
    module = tmp_path / "mine.py"
    module.write_text("from open_instruct2.verifiers import register\n"
                      "@register('yes_no', 'yes or no')\n"
                      "def yes_no(response, truth):\n    return float(response.strip().lower() == truth)\n")
    assert V.load_verifier_module(str(module)) == ["yes_no"]
    assert V.VERIFIERS["yes_no"]("Yes", "yes") == 1.0
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match="failed to load: RuntimeError: boom"):
        V.load_verifier_module(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(UserError, match="registered no verifier"):
        V.load_verifier_module(str(empty))


# ---------------------------------------------------------------- one answer extraction (rewards.verify) and the defects it fixed


@pytest.mark.parametrize("name,response,truth,expected", [
    # tags around the answer are not part of it (string verifiers could never pay with the R1 format on)
    ("string_matching", "<answer>Paris</answer>", "Paris", 1.0),
    ("string_matching", "<think>France's capital... maybe Lyon?</think>Paris", "Paris", 1.0),
    ("string_f1", "<think>x</think><answer>the Eiffel tower</answer>", "Eiffel tower", 1.0),
    ("string_matching", "<think>it is Paris</think> Lyon", "Paris", 0.0),  # the thinking is not the answer
    ("gsm8k", "<think>7 + 5 = 13? no</think><answer>#### 12</answer>", "12", 1.0),
    ("gsm8k", "<think>the answer is 12</think>#### 13", "12", 0.0),
    # math: the brace-less LaTeX form, and a brace-less last \boxed never borrows a later {...}
    ("math", "so the result is \\boxed 7.", "7", 1.0),
    ("math", "\\boxed{5} first, then \\boxed x where {5} appears", "5", 0.0),
    ("math", "<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", 1.0),
    # ifeval: IFEval strips the quotes before the end check
    ("ifeval", '"I am done. Is there anything else I can help with?"',
     json.dumps({"instruction_id": ["startend:end_checker"], "kwargs": [{"end_phrase": "Is there anything else I can help with?"}]}), 1.0),
    # a title needs text between << and >>, on one span
    ("ifeval", "<<>> and then >> words", json.dumps({"instruction_id": ["detectable_format:title"], "kwargs": [{}]}), 0.0),
    ("ifeval", "<<A Title>>\nbody", json.dumps({"instruction_id": ["detectable_format:title"], "kwargs": [{}]}), 1.0),
    # a forbidden word that starts with a symbol is still found
    ("ifeval", "It costs $5 today.", json.dumps({"instruction_id": ["keywords:forbidden_words"], "kwargs": [{"forbidden_words": ["$5"]}]}), 0.0),
    ("ifeval", "It costs $50 today.", json.dumps({"instruction_id": ["keywords:forbidden_words"], "kwargs": [{"forbidden_words": ["$5"]}]}), 1.0),
])
def test_shared_answer_extraction_and_fixed_defects(name, response, truth, expected):
    from open_instruct2.rewards import verify

    assert verify(response, [name], [truth]) == pytest.approx(expected)


def test_final_answer():
    from open_instruct2.verifiers import final_answer

    assert final_answer("<think>a</think><think>b</think> c") == "c"  # after the LAST </think>
    assert final_answer("x <answer>1</answer> y <answer>2</answer> z") == "2"  # the last block
    assert final_answer("<answer>unfinished") == "unfinished"
    assert final_answer("  plain text ") == "plain text"


def test_a_response_cut_off_inside_think_has_no_final_answer():
    """Truncated mid-thought (Qwen3's thinking template at 256 tokens truncates most responses): scoring the
    reasoning paid for stopping next to a number. No `</think>` after the last `<think>`: no answer, score 0."""
    from open_instruct2.rewards import verify
    from open_instruct2.verifiers import final_answer

    cut = "<think>The sum is 40 + 2, which is 42, but let me verify"
    assert final_answer(cut) == ""
    assert verify(cut, ["gsm8k"], ["42"]) == 0.0  # it scored 1.0: the last number of the reasoning
    assert verify("<think>40 + 2 is 42.</think> The answer is 42", ["gsm8k"], ["42"]) == 1.0
    assert final_answer("<think>a</think> b <think> it is 42") == ""  # opened again and never closed
    # a template whose generation prompt opened the block: the response is reasoning until its </think>
    assert final_answer("so it is 42, but", thinking_open=True) == "" and final_answer("it is 4 </think> 42", thinking_open=True) == "42"
    assert verify("so it is 42, but", ["gsm8k"], ["42"], thinking_open=True) == 0.0


def test_gsm8k_strict_and_shaped():
    strict, shaped = V.VERIFIERS["gsm8k_strict"], V.VERIFIERS["gsm8k_shaped"]
    assert strict("7 + 5 = 12\n#### 12", "12") == 1.0 and shaped("7 + 5 = 12\n#### 12", "12") == 1.0
    assert strict("7 + 5 = 12", "12") == 0.0 and shaped("7 + 5 = 12", "12") == 0.5  # right number, not where asked: half
    assert strict("#### 13 (no, 12)", "12") == 0.0 and shaped("#### 13 (no, 12)", "12") == 0.5  # the last number is right
    assert strict("#### 1,234.", "1234") == 1.0
    assert shaped("#### 11", "12") == 0.0 and shaped("no number", "12") == 0.0  # no credit for the format alone


def test_gsm8k_format_pays_the_format_once_and_the_right_number_most():
    fmt = V.VERIFIERS["gsm8k_format"]
    assert fmt("7 + 5 = 12\n#### 12", "12") == 1.0
    assert fmt("#### 1,234.", "1234") == 1.0
    assert fmt("7 + 5 = 13\n#### 13", "12") == 0.2  # the asked-for format with a wrong number: a little
    assert fmt("7 + 5 = 12", "12") == 0.0  # right number without the format: nothing
    assert fmt("#### 12\n#### 13", "12") == 0.0 and fmt("#### 11\n#### 12", "12") == 0.0  # lists of guesses: nothing
    assert fmt("#### twelve", "12") == 0.0 and fmt("####", "12") == 0.0


def test_a_verifier_module_loads_again_in_the_same_process(tmp_path):
    """An in-process resume (or a notebook's second run) loads --verifier_module again: it registers the same names,
    which is not "registered no verifier"."""
    from test_train_e2e import VERIFIER

    path = tmp_path / "v.py"
    path.write_text(VERIFIER)
    assert V.load_verifier_module(str(path)) == ["even_length"]
    assert V.load_verifier_module(str(path)) == ["even_length"]
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    from open_instruct2.errors import UserError

    with pytest.raises(UserError, match="registered no verifier"):
        V.load_verifier_module(str(empty))
