"""Tool flags (multi-turn rollouts where the policy calls tools; README "Tools") and the checks that read only them.
The files and programs they name (a corpus, a tool module, an MCP server) are checked when the tools are built, at
start-up, before anything is written (tools/__init__.py)."""

from typing import Literal, Optional

from .base import documented, require

BUILTIN_TOOLS = ("calculator", "python", "search")


@documented("tools")
class ToolsConfig:
    tools: Optional[list[str]] = None
    """Builtin tools the policy may call during a rollout: calculator (arithmetic, parsed safely), python (code run in a separate, limited process), search (BM25 over --search_corpus). Tools of --tool_module and --mcp_server_command are added to these. Default: none (one uninterrupted generation per response). New."""
    tool_parser: Literal["tags", "json"] = "tags"
    """How calls are written. tags: open-instruct's <name>input</name>, the closing tag a hard stop, the result appended as <output>...</output> (any model; say the format in the system prompt). json: the chat template's native tool calls (Hermes / Qwen: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, results as tool-role messages rendered by the template, the tools described through its tools= argument; for models trained on it). New."""
    max_tool_calls: int = 5
    """Most tool calls per response; a response that asks for one more ends there with finish reason 'tool_limit'. New (open-instruct's flag)."""
    mask_tool_use: bool = True
    """Tool output tokens are in the sequence the policy conditions on but carry no loss, KL or log-prob terms (open-instruct's default); false trains on them as if the policy had written them. New."""
    tool_timeout_s: float = 10.0
    """Seconds one call may take; then the model reads an error and the call counts in tools/timeouts. New."""
    tool_max_concurrency: int = 8
    """Tool calls run at once across the batch. New."""
    tool_max_output_chars: int = 2000
    """A tool's output is cut to this many characters (with a note saying so) before it is appended. New."""
    search_corpus: Optional[str] = None
    """search tool: a .jsonl file with one document per line ({"text": ...}, optionally "title" / "id"); indexed with BM25 at start-up. New."""
    search_top_k: int = 3
    """search tool: documents returned per query. New."""
    tool_module: Optional[str] = None
    """A Python file whose public functions (with type hints and a docstring) become tools; their argument schema comes from the signature. New."""
    mcp_server_command: Optional[str] = None
    """A command (one shell-quoted string) that starts an MCP server over stdio; its tools are listed and called through the official mcp SDK, and it is stopped at the end of the run. New."""
    python_tool_memory_mb: int = 512
    """python tool: address-space limit of the process, MiB. New."""


def validate_tools(t: ToolsConfig) -> None:
    unknown = [n for n in (t.tools or []) if n not in BUILTIN_TOOLS]
    require(not unknown, f"--tools {' '.join(unknown)}: unknown builtin tool; use {', '.join(BUILTIN_TOOLS)} (your own: --tool_module, --mcp_server_command)")
    require(len(set(t.tools or [])) == len(t.tools or []), f"--tools {' '.join(t.tools or [])}: a tool is named twice")
    require(t.max_tool_calls >= 1, f"--max_tool_calls must be >= 1, got {t.max_tool_calls}")
    require(t.tool_timeout_s > 0, f"--tool_timeout_s must be > 0, got {t.tool_timeout_s}")
    require(t.tool_max_concurrency >= 1, f"--tool_max_concurrency must be >= 1, got {t.tool_max_concurrency}")
    require(t.tool_max_output_chars >= 16, f"--tool_max_output_chars must be >= 16, got {t.tool_max_output_chars}")
    require(t.search_top_k >= 1, f"--search_top_k must be >= 1, got {t.search_top_k}")
    require(t.python_tool_memory_mb >= 64, f"--python_tool_memory_mb must be >= 64, got {t.python_tool_memory_mb}")
    require("search" in (t.tools or []) or t.search_corpus is None, "--search_corpus is for the search tool: add --tools search, or drop the flag")
    require("search" not in (t.tools or []) or t.search_corpus is not None, "--tools search needs --search_corpus docs.jsonl (one {\"text\": ...} per line)")


def tools_wanted(t: ToolsConfig) -> bool:
    """Whether rollouts are multi-turn with tools."""
    return bool(t.tools or t.tool_module or t.mcp_server_command)
