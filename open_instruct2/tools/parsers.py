"""How a tool call is written in the model's text and how its result is written back (--tool_parser).

A parser gives the rollout loop three things: the stop strings that end a segment at a finished call, the call at
the end of a segment (or None), and the text appended after it, the tool's output. The loop is the same for both.

- tags (open-instruct's format): `<calculator>19 + 24</calculator>`, the closing tag a hard stop; the output is
  appended as `<output>\\n43\\n</output>\\n`. Works with any model that is told the format (a system prompt).
- json (the chat template's native tool calls, Hermes / Qwen2.5 / Qwen3 and others):
  `<tool_call>\\n{"name": "calculator", "arguments": {"expression": "19 + 24"}}\\n</tool_call>`; the result is a
  `tool`-role message, rendered by the model's own chat template (what follows the assistant's text when a tool
  message comes next: the end of the assistant turn, the tool turn, a new assistant header). The tools are described
  to the model through the template's `tools=` argument. For models trained on their template's tool format.
"""

import json
import re
from dataclasses import dataclass

from ..errors import UserError
from .base import Tool


@dataclass
class Call:
    name: str
    """The tool asked for (may be unknown: the runner says so to the model)."""
    arguments: dict | None
    """Parsed arguments; None when the call is malformed (then `problem` says why)."""
    problem: str | None = None
    """Why the call could not be parsed: the model reads it as the tool's output, and it counts in tools/errors."""


TRAILING_CHARS = 4
"""A segment stops on the token that completes a closing tag; that token may carry a few characters more."""


class TagsParser:
    """`<name>input</name>` -> a call of tool `name`; the output is appended as <output>...</output>."""

    def __init__(self, tools: dict[str, Tool]):
        self.tools = tools
        self.stop_strings = [f"</{name}>" for name in tools]

    def find_call(self, text: str) -> Call | None:
        """The call that `text` (one segment the model wrote, ended by a stop string) ends with: its last closing tag
        of a tool, followed by at most what the tag's last token carried (TRAILING_CHARS; e.g. '><' or '>\n')."""
        ends = [(text.rfind(f"</{name}>"), name) for name in self.tools]
        at, name = max(ends)
        if at < 0 or len(text) - (at + len(name) + 3) > TRAILING_CHARS:
            return None
        opening = text.rfind(f"<{name}>", 0, at)
        if opening < 0:
            return Call(name, None, f"a call is written <{name}>...</{name}>: the opening tag <{name}> is missing")
        inner = text[opening + len(name) + 2 : at].strip()
        argument = self.tools[name].text_argument
        if argument is not None:
            return Call(name, {argument: inner})
        try:
            arguments = json.loads(inner)
        except json.JSONDecodeError as e:
            return Call(name, None, f"{name} takes a JSON object of its arguments between the tags ({e.msg})")
        return Call(name, arguments, None if isinstance(arguments, dict) else f"{name} takes a JSON object of its arguments")

    def output_text(self, output: str) -> str:
        return f"<output>\n{output}\n</output>\n"


TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>\s*$", re.DOTALL)


class JsonParser:
    """The chat template's `<tool_call>{...}</tool_call>`; the output is rendered by the template as a tool message."""

    stop_strings = ["</tool_call>"]

    def __init__(self, tools: dict[str, Tool], tokenizer, template_kwargs: dict | None = None):
        self.tools = tools
        self.continuation = tool_message_continuation(tokenizer, template_kwargs)

    def find_call(self, text: str) -> Call | None:
        match = TOOL_CALL.search(text)
        if match is None:
            return None
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError as e:
            return Call("?", None, f"the tool call is not valid JSON ({e.msg}): write {{\"name\": ..., \"arguments\": {{...}}}}")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return Call("?", None, 'a tool call is {"name": ..., "arguments": {...}}')
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        return Call(call["name"], arguments, None if isinstance(arguments, dict) else '"arguments" must be a JSON object')

    def output_text(self, output: str) -> str:
        return self.continuation(output)


MARK = "\x00OI2-TOOL-OUTPUT\x00"


def tool_message_continuation(tokenizer, template_kwargs: dict | None = None):
    """output -> the text the chat template puts after an assistant message when a tool message with that output
    follows, up to and including the next assistant header (rendered with the prompts' --chat_template_kwargs, e.g.
    Qwen3's enable_thinking). Found once, by rendering a conversation with a marker."""
    said = "I will call the tool."
    base = [{"role": "user", "content": "Compute it."}, {"role": "assistant", "content": said}]
    try:
        rendered = tokenizer.apply_chat_template([*base, {"role": "tool", "content": MARK}], tokenize=False, add_generation_prompt=True,
                                                 **(template_kwargs or {}))
    except Exception as e:  # noqa: BLE001 - a template without tool messages
        raise UserError(f"--tool_parser json: the model's chat template cannot render a tool message ({type(e).__name__}: {str(e)[:120]}); "
                        "use --tool_parser tags, or a model whose template supports tools") from None
    start, mark = rendered.rfind(said), rendered.find(MARK)
    if start < 0 or mark < start:
        raise UserError("--tool_parser json: the model's chat template does not render a tool message after the assistant's; use --tool_parser tags")
    before, after = rendered[start + len(said) : mark], rendered[mark + len(MARK) :]
    return lambda output: before + output + after


def make_parser(kind: str, tools: dict[str, Tool], tokenizer, template_kwargs: dict | None = None):
    return TagsParser(tools) if kind == "tags" else JsonParser(tools, tokenizer, template_kwargs)
