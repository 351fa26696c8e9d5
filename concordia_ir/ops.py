"""IR nodes: small frozen dataclasses. What each op means is declared in opdefs.py.

A kernel is a Block of Ops in SSA form with structured control flow: `if`, `for` and
`while` own regions (Blocks with arguments) that end in `yield`, `condition` or `return`.
Loop-carried values are region arguments, so every value live at a loop head is explicit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .types import Type


@dataclass(frozen=True)
class Loc:
    file: str
    line: int


@dataclass(frozen=True)
class Value:
    name: str
    type: Type


@dataclass(frozen=True)
class Op:
    name: str
    operands: tuple[Value, ...] = ()
    results: tuple[Value, ...] = ()
    attrs: tuple[tuple[str, object], ...] = ()
    regions: tuple["Block", ...] = ()
    loc: Loc | None = None
    # Line in an IR text file, for errors on parsed modules; not part of the op's identity.
    textloc: Loc | None = field(default=None, compare=False, repr=False)

    def attr(self, key: str, default=None):
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def where(self) -> Loc | None:
        return self.loc or self.textloc

    @property
    def result(self) -> Value:
        return self.results[0]


@dataclass(frozen=True)
class Block:
    args: tuple[Value, ...] = ()
    ops: tuple[Op, ...] = ()


@dataclass(frozen=True)
class Kernel:
    name: str
    params: tuple[Value, ...]
    body: Block
    loc: Loc | None = None
    textloc: Loc | None = field(default=None, compare=False, repr=False)

    def walk(self) -> Iterator[Op]:
        return walk(self.body)


@dataclass(frozen=True)
class Module:
    kernels: tuple[Kernel, ...] = ()

    def kernel(self, name: str) -> Kernel:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(name)

    def __str__(self) -> str:
        from .printer import print_module
        return print_module(self)


def walk(block: Block) -> Iterator[Op]:
    """Every op of a block, depth first, parents before the ops of their regions."""
    for op in block.ops:
        yield op
        for region in op.regions:
            yield from walk(region)
