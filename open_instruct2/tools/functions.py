"""Tools from a user's Python file (--tool_module): each public function defined in it (name not starting with "_")
becomes a tool, its argument schema read from its type hints and Google-style docstring by transformers'
`get_json_schema`. A call is `fn(**arguments)`; the result becomes text (str as is, dict / list as JSON, anything else
through str).

Errors: problems with the file (missing, not importable, a function without hints or docstring, no functions) are a
UserError at start-up. At call time, argument names that do not fit the schema and any exception the function
raises both become a ToolError, the latter as "TypeName: message" (the exception kept as its __cause__), so the
model reads one short line and the runner counts the call in tools/errors."""

import importlib.util
import inspect
import itertools
import json
import sys
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .base import Tool, ToolError

_module_numbers = itertools.count()
HINTS_FIX = "add a type hint to every argument and a Google-style docstring (a summary line, then 'Args:' with one 'name: description' line per argument), or rename it with a leading _ to keep it out"


def module_tools(path: str) -> list[Tool]:
    """The tools of a Python file: one per public function defined in it; UserError when there are none."""
    module = import_file(path)
    functions = public_functions(module)
    if not functions:
        raise UserError(f"--tool_module {path}: defines no public function; write functions with type hints and a docstring (names not starting with _)")
    return [function_tool(fn, path) for fn in functions]


def import_file(path: str):
    """The file imported as a module under a name of its own; UserError when it is missing or raises."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--tool_module {path}: no such file; pass the path of a Python file whose public functions become tools")
    name = f"open_instruct2_tool_module_{next(_module_numbers)}_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UserError(f"--tool_module {path}: not a Python source file; pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so dataclasses, pickle and typing can find the module while it runs
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[name]
        raise UserError(f"--tool_module {path}: importing it raised {type(e).__name__}: {e}; run `python {path}` to see the traceback") from None
    return module


def public_functions(module) -> list[Callable]:
    """The module's own functions not starting with "_", in the order they are defined."""
    return [fn for name, fn in vars(module).items() if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == module.__name__]


def function_tool(fn: Callable, path: str) -> Tool:
    """One function as a tool; UserError naming it when its schema cannot be read."""
    from transformers.utils import get_json_schema

    where = f"--tool_module {path}: function {fn.__name__}"
    variadic = [p.name for p in inspect.signature(fn).parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if variadic:
        raise UserError(f"{where}: *{variadic[0]} cannot be described to the model; give it named arguments instead")
    try:
        schema = get_json_schema(fn)["function"]
    except Exception as e:
        raise UserError(f"{where}: {e}; {HINTS_FIX}") from None
    parameters = {"required": [], **schema["parameters"]}
    return Tool(schema["name"], schema.get("description") or "", parameters, lambda arguments: call(fn, parameters, arguments))


def call(fn: Callable, parameters: dict, arguments: dict) -> str:
    """fn(**arguments) as text; ToolError for arguments that do not fit the schema or an exception from fn."""
    check_argument_names(fn.__name__, parameters, arguments)
    try:
        result = fn(**arguments)
    except Exception as e:
        raise ToolError(f"{type(e).__name__}: {e}") from e
    return as_text(result)


def check_argument_names(name: str, parameters: dict, arguments: dict) -> None:
    """ToolError naming the missing and unknown arguments, if any."""
    if not isinstance(arguments, dict):
        raise ToolError(f"{name}: the arguments must be a JSON object, got {type(arguments).__name__}")
    known = parameters.get("properties", {})
    missing = [a for a in parameters.get("required", []) if a not in arguments]
    unknown = [a for a in arguments if a not in known]
    problems = ([f"missing required argument(s) {', '.join(missing)}"] if missing else []) + (
        [f"unknown argument(s) {', '.join(unknown)}"] if unknown else []
    )
    if problems:
        raise ToolError(f"{name}: {'; '.join(problems)}; it takes {', '.join(known) or 'no arguments'}")


def as_text(result) -> str:
    """A function's result as the text the model reads."""
    if isinstance(result, str):
        return result
    if isinstance(result, (dict, list)):
        return json.dumps(result, ensure_ascii=False, default=str)
    return str(result)
