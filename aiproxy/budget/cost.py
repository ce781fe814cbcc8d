# -*- test-case-name: tests.test_budget -*-
"""
C{cost_expr}: what a request costs, as arithmetic over the upstream's raw
usage fields (C{input_tokens + cache_creation_input_tokens + output_tokens}).

The expression is parsed once, at config time, into a tree of closures:
numbers, field names (a missing or non-numeric field is 0), C{+ - * /},
unary signs and parentheses, nothing else. It is never given to C{eval}.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CostExpressionError", "compile_cost"]

Cost = Callable[[Mapping[str, Any]], float]

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: lambda a, b: a / b if b else 0.0,
}

#: The largest cost of one request (a huge or infinite result is charged
#: this much: it spends any budget).
MAX_COST = float(2**53)

#: The longest expression accepted, in characters.
MAX_LENGTH = 1000


class CostExpressionError(ValueError):
    """
    A C{cost_expr} that is not arithmetic over usage fields.
    """


def _field(name: str) -> Cost:
    def value(usage: Mapping[str, Any]) -> float:
        found = usage.get(name)
        if isinstance(found, bool) or not isinstance(found, (int, float)):
            return 0.0
        return float(found)

    return value


def _compile(node: ast.AST) -> Cost:
    """
    The closure computing one node of a parsed expression.

    @raise CostExpressionError: for anything but numbers, names and
        C{+ - * /}.
    """
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CostExpressionError(f"{node.value!r} is not a number")
        constant = float(node.value)
        return lambda usage: constant
    if isinstance(node, ast.Name):
        return _field(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        apply = _BINARY[type(node.op)]
        left, right = _compile(node.left), _compile(node.right)
        return lambda usage: apply(left(usage), right(usage))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        operand = _compile(node.operand)
        if isinstance(node.op, ast.USub):
            return lambda usage: -operand(usage)
        return operand
    what = type(node).__name__
    if isinstance(node, ast.BinOp):
        what = type(node.op).__name__
    raise CostExpressionError(
        f"unsupported {what}: only numbers, usage field names, + - * / and parentheses"
    )


def compile_cost(expression: str) -> Cost:
    """
    Compile a C{cost_expr}.

    @return: a function of a usage mapping giving the cost (never negative).
    @raise CostExpressionError: with the reason, for an expression that is
        not arithmetic over field names.
    """
    if len(expression) > MAX_LENGTH:
        raise CostExpressionError(f"longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise CostExpressionError(f"invalid expression: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise CostExpressionError("invalid expression") from None
    try:
        cost = _compile(tree.body)
    except RecursionError:
        raise CostExpressionError("nested too deeply") from None

    def evaluate(usage: Mapping[str, Any]) -> float:
        try:
            value = cost(usage)
        except (OverflowError, RecursionError):
            return MAX_COST
        if value != value:  # NaN: inf - inf
            return 0.0
        return min(max(0.0, value), MAX_COST)

    return evaluate
