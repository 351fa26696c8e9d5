"""Which values may differ between the work-items of one group.

Used by the verifier to refuse barriers in divergent control flow. The analysis is a small
fixed point because loop-carried values are uniform only if every value fed back is.
"""
from __future__ import annotations

from .opdefs import OPS
from .ops import Block, Kernel


def nonuniform_values(kernel: Kernel) -> set[str]:
    varying: set[str] = set()
    while True:
        before = len(varying)
        _visit(kernel.body, varying, divergent=False)
        if len(varying) == before:
            return varying


def _visit(block: Block, varying: set[str], divergent: bool):
    for op in block.ops:
        ins_vary = any(v.name in varying for v in op.operands)
        if op.name == "if":
            div = divergent or ins_vary
            for r in op.regions:
                _visit(r, varying, div)
            if div or any(_yield_varies(r, varying) for r in op.regions):
                varying.update(r.name for r in op.results)
        elif op.name == "for" and op.regions:   # a malformed for is the verifier's to refuse
            body = op.regions[0]
            bounds_vary = any(v.name in varying for v in op.operands[:3])
            div = divergent or bounds_vary
            _visit(body, varying, div)
            fed = _terminator_operands(body)
            for i, (init, arg) in enumerate(zip(op.operands[3:], body.args[1:])):
                back = fed[i] if i < len(fed) else None
                if div or init.name in varying or (back is not None and back.name in varying):
                    varying.add(arg.name)
                    varying.add(op.results[i].name)
            if div:
                varying.add(body.args[0].name)
        elif op.name == "while" and len(op.regions) == 2:
            before, after = op.regions
            cond = _terminator_operands(before)
            div = divergent or bool(cond and cond[0].name in varying)
            _visit(before, varying, div)
            _visit(after, varying, div)
            fed = _terminator_operands(after)
            for i, arg in enumerate(before.args):
                if div or op.operands[i].name in varying or (i < len(fed) and fed[i].name in varying):
                    varying.add(arg.name)
            for i, arg in enumerate(after.args):
                fwd = cond[1 + i] if 1 + i < len(cond) else None
                if div or (fwd is not None and fwd.name in varying):
                    varying.add(arg.name)
                    varying.add(op.results[i].name)
        elif ins_vary or (op.name in OPS and OPS[op.name].varying):
            # A load at a group-uniform index reads one value for the whole group.
            varying.update(r.name for r in op.results)


def _terminator_operands(block: Block):
    return block.ops[-1].operands if block.ops else ()


def _yield_varies(block: Block, varying: set[str]) -> bool:
    return any(v.name in varying for v in _terminator_operands(block))
