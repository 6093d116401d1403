"""What a tool is, for the rollout loop: a name, a description, a JSON schema of its arguments, and a function
from the parsed arguments to the text the model sees. Every source of tools (the builtins, --tool_module, an MCP
server) produces these; the parsers and the runner know nothing else about them."""

from dataclasses import dataclass, field
from typing import Callable


class ToolError(Exception):
    """A call that failed in a way the model should read about (bad arguments, a tool's own error): its message is
    the tool output, and the call is counted in tools/errors. Any other exception from a tool is treated the same."""


class ToolTimeout(ToolError):
    """A call that ran past --tool_timeout_s (raised by a tool that enforces the timeout itself, e.g. the python tool
    after killing its process); counted in tools/timeouts."""


@dataclass
class Tool:
    name: str
    """What the model writes to call it (the tag name of the tags parser, "name" of the json parser)."""
    description: str
    """One paragraph for the model (the json parser passes it to the chat template's `tools=`)."""
    parameters: dict
    """JSON schema of the arguments: {"type": "object", "properties": {...}, "required": [...]}."""
    run: Callable[[dict], str]
    """One call: the arguments (checked against `parameters` by the runner) -> the output text; raises on failure."""
    close: Callable[[], None] = field(default=lambda: None)
    """Frees what the tool holds (an MCP session, a process); called once at the end of the run, on errors too."""
    own_timeout: bool = False
    """True when `run` enforces --tool_timeout_s itself (the python tool kills its process); else the runner stops
    waiting for it after the timeout (a Python function cannot be interrupted: its thread runs on to its end)."""

    @property
    def text_argument(self) -> str | None:
        """The argument that the tags parser's `<name>text</name>` fills: the one required string parameter (None
        when the tool has several required arguments: then the text between the tags must be a JSON object)."""
        props, required = self.parameters.get("properties", {}), self.parameters.get("required", [])
        strings = [n for n in required if props.get(n, {}).get("type") == "string"]
        return strings[0] if len(required) == 1 and len(strings) == 1 else None

    def schema(self) -> dict:
        """The OpenAI / chat-template function description (transformers' `tools=` takes a list of these)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def string_tool(name: str, description: str, argument: str, argument_doc: str, run: Callable[[str], str], **kwargs) -> Tool:
    """A tool of one required string argument (the builtins)."""
    parameters = {"type": "object", "properties": {argument: {"type": "string", "description": argument_doc}}, "required": [argument]}
    return Tool(name, description, parameters, lambda args: run(args[argument]), **kwargs)
