"""Parser for the IR text form written by printer.py. Errors name file:line of the text."""
from __future__ import annotations

import json
import re

from .errors import IRParseError
from .opdefs import OPS
from .ops import Block, Kernel, Loc, Module, Op, Value
from .printer import float_to_bits
from .types import ADDRESS_SPACES, SCALARS, PtrType, Type

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+) | (?P<nl>\n) | (?P<comment>//[^\n]*)
  | (?P<value>%[A-Za-z0-9_.$]+) | (?P<symbol>@[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<number>-?(?:0x[0-9a-fA-F]+|inf|nan|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[(){}\[\],:=<>^])
""", re.VERBOSE)


class _Tok:
    __slots__ = ("kind", "text", "line")

    def __init__(self, kind, text, line):
        self.kind, self.text, self.line = kind, text, line


def _tokenize(text: str, file: str) -> list[_Tok]:
    toks, line, pos = [], 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise IRParseError(f"{file}:{line}: unexpected character {text[pos]!r}")
        kind = m.lastgroup
        if kind == "nl":
            line += 1
        elif kind not in ("ws", "comment"):
            toks.append(_Tok(kind, m.group(), line))
        pos = m.end()
    toks.append(_Tok("eof", "", line))
    return toks


class _Parser:
    def __init__(self, text: str, file: str):
        self.file = file
        self.toks = _tokenize(text, file)
        self.i = 0
        self.scopes: list[dict[str, Value]] = []

    # -- token helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def error(self, msg: str, tok: _Tok | None = None):
        tok = tok or self.tok
        found = repr(tok.text) if tok.kind != "eof" else "end of file"
        raise IRParseError(f"{self.file}:{tok.line}: {msg} (found {found})")

    def next(self) -> _Tok:
        t = self.tok
        self.i += 1
        return t

    def accept(self, text: str, same_line: int | None = None) -> bool:
        t = self.tok
        if t.text == text and t.kind != "string" and (same_line is None or t.line == same_line):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> _Tok:
        if self.tok.text != text or self.tok.kind == "string":
            self.error(f"expected {text!r}")
        return self.next()

    def expect_kind(self, kind: str, what: str) -> _Tok:
        if self.tok.kind != kind:
            self.error(f"expected {what}")
        return self.next()

    # -- values and types
    def define(self, name: str, type_: Type) -> Value:
        v = Value(name, type_)
        self.scopes[-1][name] = v
        return v

    def use(self, tok: _Tok) -> Value:
        name = tok.text[1:]
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        self.error(f"use of undefined value %{name}", tok)

    def parse_type(self) -> Type:
        t = self.expect_kind("ident", "a type")
        if t.text == "ptr":
            self.expect("<")
            space = self.expect_kind("ident", "an address space").text
            if space not in ADDRESS_SPACES:
                self.error(f"unknown address space {space!r}; expected global or local", t)
            elem = self.parse_type()
            if not isinstance(elem, type(SCALARS["i32"])):
                self.error("pointer element must be a scalar type", t)
            self.expect(">")
            return PtrType(elem, space)
        if t.text not in SCALARS:
            self.error(f"unknown type {t.text!r}", t)
        return SCALARS[t.text]

    def parse_typed_list(self, close: str) -> list[tuple[str, Type]]:
        items = []
        while not self.accept(close):
            if items:
                self.expect(",")
            name = self.expect_kind("value", "a %value").text[1:]
            self.expect(":")
            items.append((name, self.parse_type()))
        return items

    def parse_loc(self, line: int) -> Loc | None:
        if not self.accept("loc", line):
            return None
        self.expect("(")
        f = json.loads(self.expect_kind("string", "a quoted file name").text)
        self.expect(":")
        n = int(self.expect_kind("number", "a line number").text)
        self.expect(")")
        return Loc(f, n)

    def parse_attr_value(self):
        t = self.next()
        if t.kind == "string":
            return json.loads(t.text)
        if t.kind != "number":
            self.error("expected a number or string attribute", t)
        s = t.text
        if s.lstrip("-").startswith("0x"):
            return int(s, 16)
        if any(c in s for c in ".eEn") or "inf" in s:
            return float(s)
        return int(s)

    # -- structure
    def parse_module(self) -> Module:
        kernels = []
        while self.tok.kind != "eof":
            kernels.append(self.parse_kernel())
        return Module(tuple(kernels))

    def parse_kernel(self) -> Kernel:
        start = self.expect("kernel")
        name = self.expect_kind("symbol", "@kernel_name").text[1:]
        self.expect("(")
        self.scopes = [{}]
        params = tuple(self.define(n, t) for n, t in self.parse_typed_list(")"))
        loc = self.parse_loc(start.line)
        self.expect("{")
        ops = self.parse_ops()
        self.expect("}")
        return Kernel(name, params, Block((), ops), loc, textloc=Loc(self.file, start.line))

    def parse_ops(self) -> tuple[Op, ...]:
        ops = []
        while self.tok.text != "}" and self.tok.kind != "eof":
            ops.append(self.parse_op())
        return tuple(ops)

    def parse_op(self) -> Op:
        first = self.tok
        result_names = []
        if first.kind == "value":
            while True:
                result_names.append(self.expect_kind("value", "a result %value").text[1:])
                if not self.accept(","):
                    break
            self.expect("=")
        name_tok = self.expect_kind("ident", "an op name")
        if name_tok.text not in OPS:
            self.error(f"unknown op {name_tok.text!r}", name_tok)
        line = name_tok.line
        operands = []
        if self.tok.kind == "value" and self.tok.line == line:
            operands.append(self.use(self.next()))
            while self.accept(",", line):
                operands.append(self.use(self.expect_kind("value", "an operand")))
        attrs = []
        if self.accept("[", line):
            while not self.accept("]"):
                if attrs:
                    self.expect(",")
                key = self.expect_kind("ident", "an attribute name").text
                self.expect("=")
                attrs.append((key, self.parse_attr_value()))
        types = []
        if self.accept(":", line):
            types.append(self.parse_type())
            while self.accept(",", line):
                types.append(self.parse_type())
        if len(types) != len(result_names):
            self.error(f"{len(result_names)} result(s) but {len(types)} result type(s)", name_tok)
        loc = self.parse_loc(line)
        regions = []
        while self.tok.line == line or (regions and self.tok.text in ("{", "^")):
            if self.tok.text not in ("{", "^"):
                break
            regions.append(self.parse_region())
        if name_tok.text == "const" and types:
            attrs = self._const_attrs(attrs, types[0], name_tok)
        results = tuple(self.define(n, t) for n, t in zip(result_names, types))
        return Op(name_tok.text, tuple(operands), results, tuple(attrs), tuple(regions), loc,
                  textloc=Loc(self.file, line))

    def _const_attrs(self, attrs, type_, tok):
        """Float constants are stored as bits; text may give them as a decimal `value`."""
        if getattr(type_, "is_float", False):
            out = []
            for k, v in attrs:
                if k == "value":
                    if not isinstance(v, (int, float)):
                        self.error("float constant needs a numeric value", tok)
                    k, v = "bits", float_to_bits(float(v), type_.bits)
                out.append((k, v))
            return out
        return attrs

    def parse_region(self) -> Block:
        self.scopes.append({})
        args = ()
        if self.accept("^"):
            self.expect("(")
            args = tuple(self.define(n, t) for n, t in self.parse_typed_list(")"))
        self.expect("{")
        ops = self.parse_ops()
        self.expect("}")
        self.scopes.pop()
        return Block(args, ops)


def parse_module(text: str, file: str = "<ir>") -> Module:
    return _Parser(text, file).parse_module()


def parse_file(path: str) -> Module:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise IRParseError(f"{path}: cannot read: {e.strerror}") from None
    return parse_module(text, path)


