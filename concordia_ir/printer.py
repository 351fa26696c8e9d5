"""IR text printer. `parse(print_module(m)) == m` for every module (see parser.py)."""
from __future__ import annotations

import json
import math
import struct

import numpy as np

from .ops import Block, Kernel, Loc, Module, Op, Value
from .types import f32


def float_from_bits(bits: int, bits_wide: int) -> float:
    if bits_wide == 32:
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def float_to_bits(value: float, bits_wide: int) -> int:
    """IEEE round-to-nearest: a literal beyond f32's range becomes an infinity, as in C."""
    if bits_wide == 32:
        with np.errstate(over="ignore"):
            return int(np.float32(value).view(np.uint32))
    return struct.unpack("<Q", struct.pack("<d", value))[0]


def _const_text(op: Op) -> str:
    """Float constants are kept as bit patterns; print them as decimals when that is exact."""
    t = op.result.type
    bits = op.attr("bits")
    value = float_from_bits(bits, t.bits)
    if not math.isnan(value):
        text = repr(value if t != f32 else float(value))
        if float_to_bits(float(text), t.bits) == bits:
            return f"value = {text}"
    return f"bits = {bits:#x}"


def _attr_text(op: Op) -> str:
    parts = []
    for key, value in op.attrs:
        if op.name == "const" and key == "bits":
            parts.append(_const_text(op))
        elif isinstance(value, str):
            parts.append(f"{key} = {json.dumps(value)}")
        else:
            parts.append(f"{key} = {value!r}")
    return f" [{', '.join(parts)}]" if parts else ""


def _loc(loc: Loc | None) -> str:
    return f" loc({json.dumps(loc.file)}:{loc.line})" if loc else ""


def _values(values: tuple[Value, ...]) -> str:
    return ", ".join(f"%{v.name}" for v in values)


def _typed(values: tuple[Value, ...]) -> str:
    return ", ".join(f"%{v.name}: {v.type}" for v in values)


def _op_lines(op: Op, indent: str) -> list[str]:
    head = f"{_values(op.results)} = " if op.results else ""
    head += op.name
    if op.operands:
        head += " " + _values(op.operands)
    head += _attr_text(op)
    if op.results:
        head += " : " + ", ".join(str(v.type) for v in op.results)
    head += _loc(op.loc)
    if not op.regions:
        return [indent + head]
    lines = []
    for i, region in enumerate(op.regions):
        opener = f" ^({_typed(region.args)}) {{" if region.args else " {"
        if i == 0:
            lines.append(indent + head + opener)
        else:
            lines[-1] += opener
        lines.extend(_block_lines(region, indent + "  "))
        lines.append(indent + "}")
    return lines


def _block_lines(block: Block, indent: str) -> list[str]:
    out = []
    for op in block.ops:
        out.extend(_op_lines(op, indent))
    return out


def print_kernel(k: Kernel) -> str:
    lines = [f"kernel @{k.name}({_typed(k.params)}){_loc(k.loc)} {{"]
    lines.extend(_block_lines(k.body, "  "))
    lines.append("}")
    return "\n".join(lines) + "\n"


def print_module(m: Module) -> str:
    return "\n".join(print_kernel(k) for k in m.kernels)
