"""IR -> source for each target. `render_source(kernel, "cuda")` gives the CUDA C++ text.

The stages (ir -> verified -> source -> binary), Target, Options and Program live in
`lowering.target`; the compilers themselves in `lowering.compile`.
"""
from __future__ import annotations

import os

from .cstyle import CStyleRenderer
from .dialects import DIALECTS, Dialect

__all__ = ["render_source", "DIALECTS", "Dialect", "CStyleRenderer", "INCLUDE_DIR"]

INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


def render_source(kernel, target: str) -> str:
    """Source text of one IR kernel for a C-family target ('opencl', 'cuda' or 'hip').
    A renderer holds per-kernel state, so each call has its own (safe from many threads)."""
    if target not in DIALECTS:
        raise KeyError(f"unknown target {target!r}; known: {', '.join(DIALECTS)}")
    return CStyleRenderer(DIALECTS[target]).render(kernel)
