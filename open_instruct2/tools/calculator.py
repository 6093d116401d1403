"""The calculator tool: an arithmetic expression -> its value. The text is parsed by Python's own parser
(`ast.parse(mode="eval")`) and only number literals, + - * / // % **, unary signs and parentheses are evaluated;
anything else (names, calls, attributes, strings) is refused. Text is never passed to `eval`."""

import ast
import math
import operator

from .base import Tool, ToolError, string_tool

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64
"""`a ** b` with |b| above this is refused (2 ** 10**9 would take the process's memory)."""
MAX_MAGNITUDE = 1e30
"""Results beyond this are refused: far outside any arithmetic a policy needs, and a guard against blow-ups."""


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ToolError naming what is not allowed or what failed."""
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    if not text:
        raise ToolError("empty expression: write one like 19 + 24 * 3")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression.strip()[:80]!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        try:
            result = BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE or (isinstance(result, float) and not math.isfinite(result)):
            raise ToolError("the result is not a finite real number of reasonable size")
        return result
    raise ToolError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")


def format_number(value: int | float) -> str:
    """Integers as integers (7.0 -> 7), other values to 10 significant digits."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, int) else format(value, ".10g")


def calculator_tool() -> Tool:
    return string_tool("calculator", "Evaluates an arithmetic expression (numbers, + - * / // % ** and parentheses) and returns its value.",
                       "expression", "the expression, e.g. 19 + 24 * 3", lambda e: format_number(evaluate(e)))
