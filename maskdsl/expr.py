"""Mask expressions from text, parsed safely: ``parse_mask("Window(256) | Global([0, 4096])")``.

The text is read with Python's own parser (``ast``) and then *interpreted*, never
evaluated: only the primitives below, integer literals (``-3`` too), lists and tuples
of them, ``range(...)``, and the operators ``|``, ``&``, ``~`` and parentheses are
accepted. Anything else (names, attributes, other calls, arithmetic, strings) is an
error that points at the offending part of the text, as are a primitive's own
complaints about its arguments::

    maskdsl: bad mask expression: Window(256) | Globl([0])
                                                ^^^^^
    unknown primitive 'Globl'; use one of Causal, Dilated, Document, Full, Global, Prefix, Tree, Window
"""
from __future__ import annotations

import ast
import inspect

from . import masks

__all__ = ["parse_mask", "MaskSyntaxError", "PRIMITIVES"]

PRIMITIVES = {cls.__name__: cls for cls in (masks.Full, masks.Causal, masks.Window, masks.Dilated, masks.Global,
                                            masks.Document, masks.Prefix, masks.Tree)}
_MAX_RANGE = 1 << 24  # range(...) may build lists of at most this many integers


class MaskSyntaxError(ValueError):
    """A mask expression that cannot be read; ``str()`` shows the text with the problem marked."""

    def __init__(self, text: str, message: str, start: int = 0, end: int | None = None):
        self.text, self.message, self.start = text, message, start
        self.end = max(start + 1, end if end is not None else start + 1)
        line = text.replace("\n", " ")
        caret = " " * start + "^" * min(self.end - start, max(1, len(line) - start))
        super().__init__(f"bad mask expression: {line}\n{' ' * len('bad mask expression: ')}{caret}\n{message}")


def parse_mask(text: str) -> masks.Mask:
    """The Mask that ``text`` describes (see the module docstring); MaskSyntaxError otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise MaskSyntaxError(str(text), "the expression is empty; for example: Window(256) | Global([0, 4096])")
    src = " ".join(text.split("\n"))
    lead = len(src) - len(src.lstrip())  # the parser refuses leading blanks; columns count from the text
    try:
        tree = ast.parse(src[lead:], mode="eval")
    except SyntaxError as e:
        col = lead + max(0, (e.offset or 1) - 1)
        raise MaskSyntaxError(src, f"not a valid expression ({e.msg})", col) from None
    return _Reader(src, lead).mask(tree.body)


class _Reader:
    def __init__(self, text: str, lead: int):
        self.text, self.lead = text, lead

    def fail(self, node, message: str):
        end = getattr(node, "end_col_offset", None)
        raise MaskSyntaxError(self.text, message, self.lead + getattr(node, "col_offset", 0),
                              None if end is None else self.lead + end)

    def mask(self, node) -> masks.Mask:
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
            a, b = self.mask(node.left), self.mask(node.right)
            return a | b if isinstance(node.op, ast.BitOr) else a & b
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
            return ~self.mask(node.operand)
        if isinstance(node, ast.Call):
            return self.primitive(node)
        if isinstance(node, ast.Name) and node.id in PRIMITIVES:
            self.fail(node, f"call the primitive: {node.id}(...)")
        if isinstance(node, ast.BinOp):
            self.fail(node, "masks combine with | (union), & (intersection) and ~ (complement) only")
        self.fail(node, "expected a mask: a primitive such as Causal() or Window(256), combined with |, & and ~")

    def primitive(self, node: ast.Call) -> masks.Mask:
        if not isinstance(node.func, ast.Name):
            self.fail(node.func, "only the primitives can be called: " + ", ".join(sorted(PRIMITIVES)))
        name = node.func.id
        cls = PRIMITIVES.get(name)
        if cls is None:
            self.fail(node.func, f"unknown primitive {name!r}; use one of {', '.join(sorted(PRIMITIVES))}")
        params = list(inspect.signature(cls).parameters)
        args = [self.value(a) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None or kw.arg not in params:
                self.fail(kw, f"{name} takes no argument {kw.arg!r}; its arguments are {', '.join(params) or 'none'}")
            kwargs[kw.arg] = self.value(kw.value)
        if len(args) > len(params):
            self.fail(node, f"{name} takes at most {len(params)} argument(s) ({', '.join(params) or 'none'}), "
                            f"got {len(args)}")
        try:
            return cls(*args, **kwargs)
        except (TypeError, ValueError) as e:
            self.fail(node, str(e))

    def value(self, node):
        """An int, a (nested) list of ints, or range(...) as a list."""
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.value(node.operand)
            if isinstance(v, int):
                return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.value(e) for e in node.elts]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range" \
                and not node.keywords and 1 <= len(node.args) <= 3:
            bounds = [self.value(a) for a in node.args]
            if all(isinstance(b, int) for b in bounds):
                if bounds[-1] == 0 and len(bounds) == 3:
                    self.fail(node, "range() step must not be zero")
                r = range(*bounds)
                if len(r) > _MAX_RANGE:
                    self.fail(node, f"range() of {len(r)} integers is too long (at most {_MAX_RANGE})")
                return list(r)
        self.fail(node, "arguments must be integers, lists of integers or range(...)")
