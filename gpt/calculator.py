"""The calculator tool the chat model calls while it generates.

The model writes ``<|python_start|>EXPR<|python_end|>``; the engine passes EXPR
to :func:`evaluate` and, when the answer is not None, forces
``<|output_start|>ANSWER<|output_end|>`` into the sequence.

    >>> evaluate("(12*3)+4.5")
    '40.5'
    >>> evaluate('"strawberry".count("r")')
    '3'
    >>> evaluate("__import__('os')") is None
    True

Safety comes from never running the text: it is parsed with
``ast.parse(expr, mode="eval")`` and the tree is walked by a small interpreter
that knows only numbers, strings, the four operations and friends, ``len`` and
a whitelist of side-effect-free string methods. Everything else (names,
attributes outside the whitelist, imports, lambdas, comprehensions, f-strings,
subscripts of anything but a string...) is refused. Sizes are checked *before*
each operation, so ``9**9**9`` or ``"a"*10**9`` are refused without ever being
computed, and every step is charged to a small work budget.
"""

from __future__ import annotations

import ast
import math
import operator
import re

MAX_EXPR_CHARS = 500
MAX_NODES = 1_000
MAX_INT = 10**30            # every intermediate int must satisfy abs(x) < MAX_INT
MAX_STR_CHARS = 10_000      # every intermediate string must be at most this long
MAX_WORK = 200_000          # budget in "operations": one per node, one per character handled

# Methods that only read their string (or return a bounded new one) and take
# plain str/int arguments. replace() is the only one whose output can grow by
# more than a constant factor, so it gets its own size check below.
STRING_METHODS = frozenset({
    "count", "find", "rfind", "index", "rindex", "startswith", "endswith",
    "upper", "lower", "title", "capitalize", "swapcase",
    "strip", "lstrip", "rstrip", "replace",
    "isdigit", "isalpha", "isalnum", "isupper", "islower", "isspace",
})

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}

# "1,234,567" -> "1234567": models (and GSM8K) write thousands separators.
# Only commas between a digit and exactly three digits are dropped, so commas
# inside string arguments such as "a,b".count(",") survive.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Refused(Exception):
    """The expression is outside what the calculator agrees to compute."""


def evaluate(expr: str) -> str | None:
    """Evaluate a calculator expression; return the text to feed back, or None.

    None means "no output": the expression was refused (not whitelisted, too
    big, too much work) or failed (division by zero, bad syntax...).
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    text = _THOUSANDS.sub("", expr.strip())
    try:
        tree = ast.parse(text, mode="eval")
        if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
            return None
        value = _Interpreter().run(tree.body)
    except (Refused, ArithmeticError, ValueError, TypeError, IndexError,
            SyntaxError, RecursionError, MemoryError):
        return None
    return format_value(value)


def format_value(value) -> str:
    """Text for a result: ints as ints, floats without float noise, strings as-is."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return str(value)
    # A float: integral values read as ints ("48/2" -> "24", like GSM8K's own
    # annotations), others are rounded to 6 decimals so 0.1+0.2 gives "0.3";
    # tiny values keep 6 significant digits instead of collapsing to 0.
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    rounded = round(value, 6)
    if rounded == 0:
        return format(value, ".6g")
    return repr(rounded)


class _Interpreter:
    """Walks an expression tree, checking every value and charging the budget."""

    def __init__(self):
        self.work = 0

    def charge(self, units: int) -> None:
        self.work += units
        if self.work > MAX_WORK:
            raise Refused("work budget exhausted")

    def run(self, node):
        self.charge(1)
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            raise Refused(f"{type(node).__name__} is not allowed")
        return _check(method(node))

    def visit_Constant(self, node):
        # type() not isinstance(): bool, bytes, complex, None and Ellipsis are refused.
        if type(node.value) not in (int, float, str):
            raise Refused("constant type")
        return node.value

    def visit_UnaryOp(self, node):
        op = _UNARY.get(type(node.op))
        operand = self.run(node.operand)
        if op is None or not _is_number(operand):
            raise Refused("unary operator")
        return op(operand)

    def visit_BinOp(self, node):
        op = _BINARY.get(type(node.op))
        if op is None:
            raise Refused("operator")
        left, right = self.run(node.left), self.run(node.right)
        if _is_number(left) and _is_number(right):
            if isinstance(node.op, ast.Pow):
                _check_power(left, right)
            return op(left, right)
        if isinstance(node.op, ast.Add) and isinstance(left, str) and isinstance(right, str):
            _check_length(len(left) + len(right))
            self.charge(len(left) + len(right))
            return left + right
        if isinstance(node.op, ast.Mult):
            # str * int in either order; the size is known before building it.
            text, times = (left, right) if isinstance(left, str) else (right, left)
            if isinstance(text, str) and type(times) is int:
                _check_length(len(text) * max(times, 0))
                self.charge(len(text) * max(times, 0))
                return text * times
        # Notably refused: str % x (printf formatting can pad to any width).
        raise Refused("operand types")

    def visit_Subscript(self, node):
        value = self.run(node.value)
        if not isinstance(value, str):
            raise Refused("only strings can be indexed")
        if isinstance(node.slice, ast.Slice):
            parts = [None if p is None else self._index(p)
                     for p in (node.slice.lower, node.slice.upper, node.slice.step)]
            self.charge(len(value))
            return value[slice(*parts)]
        return value[self._index(node.slice)]

    def _index(self, node) -> int:
        index = self.run(node)
        if type(index) is not int:
            raise Refused("index must be an int")
        return index

    def visit_Call(self, node):
        if node.keywords:
            raise Refused("keyword arguments")
        func = node.func
        if isinstance(func, ast.Name) and func.id == "len":
            if len(node.args) != 1:
                raise Refused("len takes one argument")
            arg = self.run(node.args[0])
            if not isinstance(arg, str):
                raise Refused("len of a non-string")
            return len(arg)
        if isinstance(func, ast.Attribute) and func.attr in STRING_METHODS:
            receiver = self.run(func.value)
            if not isinstance(receiver, str):
                raise Refused("methods only on strings")
            args = [self.run(a) for a in node.args]
            if len(args) > 3 or any(type(a) not in (int, str) for a in args):
                raise Refused("method arguments")
            if func.attr == "replace":
                _check_replace(receiver, args)
            self.charge(len(receiver) + sum(len(a) for a in args if isinstance(a, str)))
            return getattr(receiver, func.attr)(*args)
        raise Refused("call")


def _is_number(value) -> bool:
    return type(value) in (int, float)


def _check(value):
    """Every intermediate value must be a small number or a short string."""
    if type(value) is int:
        if abs(value) >= MAX_INT:
            raise Refused("int too large")
    elif type(value) is float:
        if not math.isfinite(value):
            raise Refused("float not finite")
    elif type(value) is str:
        _check_length(len(value))
        # A "\ud800" escape makes a lone surrogate: not text any tokenizer can
        # encode, so feeding it back would end the generation with an error.
        if _SURROGATE.search(value):
            raise Refused("lone surrogate in string")
    elif type(value) is not bool:  # e.g. complex from (-8)**0.5
        raise Refused("result type")
    return value


def _check_length(n: int) -> None:
    if n > MAX_STR_CHARS:
        raise Refused("string too long")


def _check_power(base, exponent) -> None:
    """Refuse a power whose result would be too large, before computing it."""
    if isinstance(base, float) or isinstance(exponent, float):
        # Float pow is constant time; overflow raises OverflowError and a
        # negative base with a fractional exponent gives complex (refused by _check).
        return
    if exponent < 0 or abs(base) <= 1:
        return  # int ** negative is a float <= 1; 0, 1, -1 stay tiny
    if exponent * math.log2(abs(base)) >= math.log2(MAX_INT):
        raise Refused("power too large")


def _check_replace(text: str, args: list) -> None:
    """replace() can multiply a string's length: check the final size first."""
    if len(args) < 2 or not all(isinstance(a, str) for a in args[:2]):
        raise Refused("replace arguments")
    old, new = args[0], args[1]
    hits = text.count(old) if old else len(text) + 1
    if len(args) == 3:
        if type(args[2]) is not int:
            raise Refused("replace count")
        if args[2] >= 0:
            hits = min(hits, args[2])
    _check_length(len(text) + hits * max(len(new) - len(old), 0))
