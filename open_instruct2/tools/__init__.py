"""Tool use in rollouts (--tools, --tool_module, --mcp_server_command; README "Tools").

The one module the rest of the trainer imports: `build_tools` turns the flags into a `ToolUse` at start-up (every
problem with a corpus, a module or an MCP server is a UserError here, before anything is written), and
`rollouts_with_tools` (loop.py) is the multi-turn rollout over an engine. The parts:
base.py (the Tool type), calculator.py / python_tool.py / search.py (the builtins), functions.py (your own Python
functions), mcp_tools.py (an MCP server's tools), parsers.py (tags / json call formats), runner.py (running a
round's calls, counting faults), loop.py (the rounds)."""

import jsonschema

from ..config import Config, chat_template_kwargs, tools_wanted
from ..errors import UserError
from .base import Tool
from .loop import ToolUse, rollouts_with_tools
from .parsers import make_parser
from .runner import ToolRunner

__all__ = ["ToolUse", "build_tools", "rollouts_with_tools", "template_tools"]


def builtin_tools(cfg: Config) -> list[Tool]:
    t = cfg.tools
    made = []
    for name in t.tools or []:
        if name == "calculator":
            from .calculator import calculator_tool

            made.append(calculator_tool())
        elif name == "python":
            from .python_tool import python_tool

            made.append(python_tool(t.tool_timeout_s, t.python_tool_memory_mb, t.tool_max_output_chars))
        elif name == "search":
            from .search import search_tool

            made.append(search_tool(t.search_corpus, t.search_top_k))
    return made


def build_tools(cfg: Config, tokenizer) -> ToolUse | None:
    """The run's tools, parser and runner; None without tools. Raises UserError (one line) for anything unusable."""
    t = cfg.tools
    if not tools_wanted(t):
        return None
    made = builtin_tools(cfg)
    if t.tool_module:
        from .functions import module_tools

        made += module_tools(t.tool_module)
    try:
        if t.mcp_server_command:
            from .mcp_tools import mcp_tools

            made += mcp_tools(t.mcp_server_command, t.tool_timeout_s)
        tools = unique_names(made)
        runner = ToolRunner(tools, t.tool_timeout_s, t.tool_max_concurrency, t.tool_max_output_chars)
        check_schemas(tools)
        parser = make_parser(t.tool_parser, tools, tokenizer, chat_template_kwargs(cfg.model))
    except BaseException:
        for tool in made:
            tool.close()
        raise
    return ToolUse(parser, runner, tokenizer, t.max_tool_calls, t.mask_tool_use)


def check_schemas(tools: dict[str, Tool]) -> None:
    """Every tool's argument schema is a valid JSON schema (an MCP server or a module could advertise a broken one)."""
    for tool in tools.values():
        try:
            jsonschema.validators.validator_for(tool.parameters).check_schema(tool.parameters)
        except jsonschema.SchemaError as e:
            raise UserError(f"tool {tool.name!r} describes its arguments with an invalid JSON schema ({e.message}); fix the tool's signature or server") from None


def unique_names(tools: list[Tool]) -> dict[str, Tool]:
    names = [tool.name for tool in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two tools are named {twice[0]!r} (from --tools, --tool_module and the MCP server); rename one")
    return {tool.name: tool for tool in tools}


def template_tools(tool_use: ToolUse | None, parser: str) -> dict:
    """chat template kwargs that describe the tools to the model: `tools=` for the json parser (the template renders
    them into the prompt); nothing for tags (say the format in the system prompt)."""
    if tool_use is None or parser != "json":
        return {}
    return {"tools": [tool.schema() for tool in tool_use.runner.tools.values()]}
